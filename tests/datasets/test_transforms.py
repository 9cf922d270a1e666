"""PeriodicPropertiesTransform and PointCloudToGraphTransform against ASE (the oracle)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list
from torch_geometric.data import Data

from matsciml.common.errors import ConfigError, DataError
from matsciml.common.graph import cells, edge_vectors
from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform
from matsciml.datasets.transforms import graph as graph_module


def sample_from_atoms(atoms: Atoms, index: int = 0, **targets) -> dict:
    """A sample dict laid out as in matsciml.datasets.schema."""
    n = len(atoms)
    return {
        "pos": torch.tensor(atoms.positions, dtype=torch.float32),
        "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.long),
        "cell": torch.tensor(atoms.cell.array, dtype=torch.float32).reshape(1, 3, 3),
        "pbc": torch.tensor(atoms.pbc, dtype=torch.bool),
        "natoms": n,
        "id": f"test.xyz:{index}",
        "source": {"file": "test.xyz", "index": index},
        "targets": {k: torch.as_tensor(v, dtype=torch.float32) for k, v in targets.items()},
    }


def atoms_as_stored(atoms: Atoms) -> Atoms:
    """The structure exactly as the float32 sample holds it (the oracle's input)."""
    out = atoms.copy()
    out.cell = atoms.cell.array.astype(np.float32).astype(np.float64)
    out.positions = atoms.positions.astype(np.float32).astype(np.float64)
    return out


def random_structure(seed: int, num_atoms: int, pbc=(True, True, True)) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(1.0, 2.0, 3)) + np.tril(rng.uniform(-1.5, 1.5, (3, 3)), -1)
    cell *= (num_atoms * 12.0 / abs(np.linalg.det(cell))) ** (1 / 3)
    pos = rng.uniform(0, 1, (num_atoms, 3)) @ cell
    return atoms_as_stored(Atoms(numbers=rng.integers(1, 50, num_atoms), positions=pos, cell=cell, pbc=pbc))


def keyed(i, j, shifts, values=None) -> dict:
    shifts = np.asarray(shifts).round().astype(int)
    keys = [(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts)]
    return dict(zip(keys, values if values is not None else [None] * len(keys)))


STRUCTURES = [
    ("triclinic-1", lambda: random_structure(0, 1), 5.0),
    ("triclinic-7", lambda: random_structure(1, 7), 6.0),
    ("triclinic-30", lambda: random_structure(2, 30), 5.0),
    (
        "small-cell",
        lambda: atoms_as_stored(Atoms("Cu", positions=[[0.1, 0.2, 0.3]], cell=2.0 * np.eye(3), pbc=True)),
        6.0,
    ),
    ("slab", lambda: random_structure(3, 10, pbc=(True, True, False)), 5.0),
    ("wire", lambda: random_structure(4, 6, pbc=(False, False, True)), 5.0),
    ("molecule", lambda: atoms_as_stored(molecule("C6H6")), 4.0),
]


@pytest.mark.parametrize("name,make,cutoff", STRUCTURES, ids=[s[0] for s in STRUCTURES])
def test_graph_edges_and_vectors_match_ase(name, make, cutoff):
    atoms = make()
    sample = sample_from_atoms(atoms)
    sample = PeriodicPropertiesTransform(cutoff_radius=cutoff)(sample)
    sample = PointCloudToGraphTransform("pyg")(sample)
    graph = sample["graph"]

    i, j, shifts, vectors = neighbor_list("ijSD", atoms, cutoff)
    expected = keyed(i, j, shifts, vectors)
    ei = graph.edge_index
    got = keyed(ei[0], ei[1], graph.cell_shifts)
    assert set(got) == set(expected)
    assert len(got) == ei.shape[1]

    ours = edge_vectors(graph)
    order = [list(got).index(k) for k in expected]
    np.testing.assert_allclose(ours[order].numpy(), np.array(list(expected.values())), atol=1e-5)
    # in float64 the vectors agree to rounding
    ours64 = edge_vectors(graph, pos=graph.pos.double())
    np.testing.assert_allclose(ours64[order].numpy(), np.array(list(expected.values())), atol=1e-10)


def test_graph_contents():
    atoms = random_structure(5, 4)
    sample = sample_from_atoms(atoms, forces=np.ones((4, 3)), energy=1.5)
    sample = PointCloudToGraphTransform(node_keys=["pos", "atomic_numbers", "forces", "force"])(
        PeriodicPropertiesTransform(cutoff_radius=4.0)(sample)
    )
    g = sample["graph"]
    assert isinstance(g, Data)
    assert g.num_nodes == 4
    assert g.pos.dtype == torch.float32 and g.atomic_numbers.dtype == torch.long
    assert torch.equal(g.atomic_numbers, torch.tensor(atoms.numbers))
    assert torch.equal(g.edge_index, sample["edge_index"]) and torch.equal(g.cell_shifts, sample["cell_shifts"])
    assert g.cell.shape == (1, 3, 3) and torch.equal(cells(g)[0], sample["cell"][0])
    assert g.natoms.tolist() == [4]
    assert torch.equal(g.forces, torch.ones(4, 3))  # copied from the targets
    assert "force" not in g  # absent node keys are skipped
    assert sample["targets"]["energy"].item() == 1.5  # the sample keeps its other keys


def test_node_key_with_wrong_length_names_structure_and_key():
    sample = PeriodicPropertiesTransform(4.0)(sample_from_atoms(random_structure(6, 3)))
    sample["charges"] = torch.zeros(5)
    with pytest.raises(DataError, match=r"'test.xyz:0'.*'charges'.*first dimension 3"):
        PointCloudToGraphTransform(node_keys=["charges"])(sample)


def test_missing_keys_are_reported():
    sample = sample_from_atoms(random_structure(6, 3))
    del sample["atomic_numbers"]
    with pytest.raises(DataError, match="'atomic_numbers'"):
        PointCloudToGraphTransform()(sample)
    del sample["pos"]
    with pytest.raises(DataError, match="no 'pos'"):
        PeriodicPropertiesTransform()(sample)


def test_non_periodic_radius_graph_without_periodic_transform():
    atoms = atoms_as_stored(molecule("CH3CH2OH"))
    sample = PointCloudToGraphTransform(cutoff_dist=2.0)(sample_from_atoms(atoms))
    g = sample["graph"]
    d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    ii, jj = np.nonzero((d < 2.0) & ~np.eye(len(atoms), dtype=bool))
    assert set(keyed(g.edge_index[0], g.edge_index[1], g.cell_shifts)) == set(keyed(ii, jj, np.zeros((len(ii), 3))))
    assert torch.all(g.cell_shifts == 0)


def test_periodic_sample_without_edges_warns_once(monkeypatch):
    monkeypatch.setattr(graph_module, "_NON_PERIODIC_WARNED", False)
    transform = PointCloudToGraphTransform(cutoff_dist=3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            transform(sample_from_atoms(random_structure(seed, 4)))
    messages = [str(w.message) for w in caught if "PeriodicPropertiesTransform" in str(w.message)]
    assert len(messages) == 1 and "non-periodic" in messages[0]


def test_dgl_backend_falls_back_to_pyg_and_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "dgl", None)  # `import dgl` raises ImportError
    monkeypatch.setattr(graph_module, "_DGL_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transforms = [PointCloudToGraphTransform(backend="dgl") for _ in range(3)]
        for t in transforms:
            t(PeriodicPropertiesTransform(5.0)(sample_from_atoms(random_structure(7, 3))))
    dgl_warnings = [w for w in caught if "DGL is not installed" in str(w.message)]
    assert len(dgl_warnings) == 1
    assert "PyG" in str(dgl_warnings[0].message)
    out = transforms[0](PeriodicPropertiesTransform(5.0)(sample_from_atoms(random_structure(7, 3))))
    assert isinstance(out["graph"], Data)


def test_unknown_graph_backend_lists_valid_names():
    with pytest.raises(ConfigError, match="'pyg', 'dgl'"):
        PointCloudToGraphTransform(backend="pyg2")
    with pytest.raises(ConfigError, match="cutoff_dist"):
        PointCloudToGraphTransform(cutoff_dist=0)
    with pytest.raises(ConfigError, match="lists of names"):
        PointCloudToGraphTransform(node_keys="pos")


def test_periodic_transform_config_errors_and_upstream_arguments():
    with pytest.raises(ConfigError, match="did you mean 'vesin'"):
        PeriodicPropertiesTransform(backend="vesim")
    with pytest.raises(ConfigError, match="cutoff_radius"):
        PeriodicPropertiesTransform(cutoff_radius=-1)
    with pytest.warns(UserWarning, match="max_neighbors=1000"):
        PeriodicPropertiesTransform(max_neighbors=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeriodicPropertiesTransform(cutoff_radius=6.5, adaptive_cutoff=True, backend="pymatgen", is_cartesian=True)


@pytest.mark.parametrize("backend", ["vesin", "ase", "pymatgen"])
def test_backends_give_identical_edges(backend):
    atoms = random_structure(8, 12)
    ref = PeriodicPropertiesTransform(5.0)(sample_from_atoms(atoms))
    out = PeriodicPropertiesTransform(5.0, backend=backend)(sample_from_atoms(atoms))
    assert torch.equal(ref["edge_index"], out["edge_index"]) and torch.equal(ref["cell_shifts"], out["cell_shifts"])


def test_allow_self_loops():
    atoms = random_structure(9, 5)
    out = PeriodicPropertiesTransform(4.0, allow_self_loops=True)(sample_from_atoms(atoms))
    expected = keyed(*neighbor_list("ijS", atoms, 4.0, self_interaction=True))
    assert set(keyed(out["edge_index"][0], out["edge_index"][1], out["cell_shifts"])) == set(expected)


def test_adaptive_cutoff_grows_until_every_atom_has_a_neighbour():
    # a dimer 3.2 Å apart in a 12 Å box plus an atom 7.3 Å away from both
    atoms = atoms_as_stored(
        Atoms("H3", positions=[[0, 0, 0], [3.2, 0, 0], [1.6, 7.3, 0.0]], cell=[30, 30, 30], pbc=True)
    )
    plain = PeriodicPropertiesTransform(4.0)(sample_from_atoms(atoms))
    assert torch.bincount(plain["edge_index"][0], minlength=3).tolist() == [1, 1, 0]
    out = PeriodicPropertiesTransform(4.0, adaptive_cutoff=True)(sample_from_atoms(atoms))
    # oracle: the first cutoff on the 0.5 Å grid above the isolated atom's nearest distance
    nearest = np.hypot(1.6, 7.3)  # 7.47 Å
    cutoff = 4.0 + 0.5 * np.ceil((nearest - 4.0) / 0.5)
    assert cutoff == 7.5
    expected = keyed(*neighbor_list("ijS", atoms, cutoff))
    assert set(keyed(out["edge_index"][0], out["edge_index"][1], out["cell_shifts"])) == set(expected)
    # structures that need no growth keep the given cutoff
    dense = random_structure(10, 8)
    assert torch.equal(
        PeriodicPropertiesTransform(5.0, adaptive_cutoff=True)(sample_from_atoms(dense))["edge_index"],
        PeriodicPropertiesTransform(5.0)(sample_from_atoms(dense))["edge_index"],
    )


def test_adaptive_cutoff_ceiling_and_single_atom():
    far = Atoms("H2", positions=[[0, 0, 0], [0, 0, 35.0]], pbc=False)
    with pytest.raises(DataError, match=r"'test.xyz:0'.*atom\(s\) \[0, 1\].*30 Å"):
        PeriodicPropertiesTransform(4.0, adaptive_cutoff=True)(sample_from_atoms(far))
    lone = PeriodicPropertiesTransform(4.0, adaptive_cutoff=True)(sample_from_atoms(Atoms("H", pbc=False)))
    assert lone["edge_index"].shape == (2, 0)


def test_max_neighbors_guard_through_transform():
    sample = sample_from_atoms(bulk("Cu", "fcc", a=3.6), index=4)
    with pytest.raises(DataError) as info:
        PeriodicPropertiesTransform(cutoff_radius=9.0, max_neighbors_per_atom=100)(sample)
    msg = str(info.value)
    count = len(neighbor_list("i", bulk("Cu", "fcc", a=3.6), 9.0))
    assert "'test.xyz:4' (file test.xyz, record 4)" in msg and "9 Å" in msg and f"{count:.1f} edges per atom" in msg
    PeriodicPropertiesTransform(cutoff_radius=9.0, max_neighbors_per_atom=None)(sample)


def test_fcc_coordination_shells():
    # analytic oracle: fcc has 12 neighbours at a/sqrt2 and 6 at a
    a = 3.6
    sample = PeriodicPropertiesTransform(cutoff_radius=3.7)(sample_from_atoms(bulk("Cu", "fcc", a=a, cubic=True)))
    g = PointCloudToGraphTransform()(sample)["graph"]
    d = edge_vectors(g).norm(dim=1)
    assert g.edge_index.shape[1] == 4 * 18
    assert int((abs(d - a / np.sqrt(2)) < 1e-4).sum()) == 4 * 12 and int((abs(d - a) < 1e-4).sum()) == 4 * 6
