"""collate_samples: batch layout, the batch vector, and edge vectors of the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list
from torch.utils.data import DataLoader

from matsciml.common.errors import DataError
from matsciml.common.graph import cells, edge_vectors, graph_index, num_graphs, num_nodes_per_graph
from matsciml.datasets.collate import collate_samples
from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform


def sample_from_atoms(atoms: Atoms, index: int, targets: dict) -> dict:
    """A sample dict laid out as in matsciml.datasets.schema."""
    return {
        "pos": torch.tensor(atoms.positions, dtype=torch.float32),
        "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.long),
        "cell": torch.tensor(atoms.cell.array, dtype=torch.float32).reshape(1, 3, 3),
        "pbc": torch.tensor(atoms.pbc, dtype=torch.bool),
        "natoms": len(atoms),
        "id": f"set.xyz:{index}",
        "source": {"file": "set.xyz", "index": index},
        "targets": {k: torch.as_tensor(v, dtype=torch.float32) for k, v in targets.items()},
    }


def graph_sample(atoms: Atoms, index: int, targets: dict, cutoff: float = 5.0) -> dict:
    sample = sample_from_atoms(atoms, index, targets)
    return PointCloudToGraphTransform()(PeriodicPropertiesTransform(cutoff_radius=cutoff)(sample))


@pytest.fixture
def three():
    rng = np.random.default_rng(0)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms
    cu.rattle(0.05, seed=1)
    nacl = bulk("NaCl", "rocksalt", a=5.6) * (1, 1, 3)  # 6 atoms, triclinic primitive cell
    mol = molecule("H2O")  # 3 atoms, not periodic
    structures = [cu, nacl, mol]
    samples = []
    for k, atoms in enumerate(structures):
        n = len(atoms)
        targets = {
            "energy": float(rng.normal()),
            "forces": rng.normal(size=(n, 3)),
            "stress": rng.normal(size=(3, 3)),
            "charges": rng.normal(size=n),
            "dipole": rng.normal(size=3),  # length 3 like H2O's atom count: stacked by name
        }
        if k != 1:
            targets["band_gap"] = 1.0  # missing from one sample: left out
        samples.append(graph_sample(atoms, k, targets))
    return structures, samples


def test_shapes_and_batch_vector(three):
    structures, samples = three
    batch = collate_samples(samples)
    g = batch["graph"]
    sizes = [len(a) for a in structures]
    assert batch["batch_size"] == 3 and num_graphs(g) == 3
    assert batch["ids"] == ["set.xyz:0", "set.xyz:1", "set.xyz:2"]
    assert batch["natoms"].dtype == torch.long and batch["natoms"].tolist() == sizes
    assert g.pos.shape == (sum(sizes), 3)
    assert torch.equal(graph_index(g), torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)))
    assert num_nodes_per_graph(g).tolist() == sizes
    assert g.natoms.tolist() == sizes
    assert cells(g).shape == (3, 3, 3)
    for k, s in enumerate(samples):
        assert torch.equal(cells(g)[k], s["cell"][0])
    n_edges = [s["graph"].edge_index.shape[1] for s in samples]
    assert g.edge_index.shape == (2, sum(n_edges)) and g.cell_shifts.shape == (sum(n_edges), 3)
    # edges stay within their own graph
    assert torch.equal(graph_index(g)[g.edge_index[0]], graph_index(g)[g.edge_index[1]])

    t = batch["targets"]
    assert set(t) == {"energy", "forces", "stress", "charges", "dipole"}
    assert t["energy"].shape == (3,)
    assert t["forces"].shape == (sum(sizes), 3)
    assert t["charges"].shape == (sum(sizes),)
    assert t["stress"].shape == (3, 3, 3)
    assert t["dipole"].shape == (3, 3)
    for k, s in enumerate(samples):
        assert t["energy"][k] == s["targets"]["energy"]
        assert torch.equal(t["stress"][k], s["targets"]["stress"])
    assert torch.equal(t["forces"], torch.cat([s["targets"]["forces"] for s in samples]))


def test_edge_vectors_of_batch_equal_per_sample_vectors(three):
    structures, samples = three
    batch = collate_samples(samples)
    per_sample = torch.cat([edge_vectors(s["graph"]) for s in samples])
    torch.testing.assert_close(edge_vectors(batch["graph"]), per_sample, rtol=0, atol=0)
    # and each block equals ASE's vectors for that structure (oracle)
    offset = 0
    for atoms, s in zip(structures, samples):
        n = s["graph"].edge_index.shape[1]
        d_ours = torch.sort(per_sample[offset : offset + n].double().norm(dim=1)).values.numpy()
        stored = atoms.copy()
        stored.positions = atoms.positions.astype(np.float32)
        stored.cell = atoms.cell.array.astype(np.float32)
        d_ase = np.sort(neighbor_list("d", stored, 5.0))
        np.testing.assert_allclose(d_ours, d_ase, atol=1e-5)
        offset += n


def test_gradient_flows_through_batched_edge_vectors(three):
    _, samples = three
    g = collate_samples(samples)["graph"]
    pos = g.pos.clone().requires_grad_(True)
    edge_vectors(g, pos=pos).norm(dim=1).sum().backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all()


def test_dataloader_uses_collate(three):
    _, samples = three
    loader = DataLoader(samples, batch_size=2, collate_fn=collate_samples)
    batches = list(loader)
    assert [b["batch_size"] for b in batches] == [2, 1]
    assert batches[1]["ids"] == ["set.xyz:2"]


def test_missing_graph_points_at_transform(three):
    _, samples = three
    bare = dict(samples[1])
    del bare["graph"]
    with pytest.raises(DataError, match=r"'set.xyz:1'.*PointCloudToGraphTransform"):
        collate_samples([samples[0], bare])


def test_mismatched_stacked_target_names_key():
    a = graph_sample(bulk("Cu", "fcc", a=3.6), 0, {"dipole": np.zeros(3)})
    b = graph_sample(bulk("Cu", "fcc", a=3.6), 1, {"dipole": np.zeros(4)})
    with pytest.raises(DataError, match="'dipole'.*set.xyz:0: \\[3\\].*set.xyz:1: \\[4\\]"):
        collate_samples([a, b])


def test_empty_list():
    with pytest.raises(DataError, match="empty"):
        collate_samples([])
