"""periodic_neighbor_list against ASE's neighbour list (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets.neighbors import check_neighbor_count, describe_structure, periodic_neighbor_list


def _f32(x: np.ndarray) -> np.ndarray:
    """Round to float32 and back, so both libraries see exactly the values a sample holds."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def random_cell(rng: np.random.Generator, num_atoms: int, skew: float) -> np.ndarray:
    """A random triclinic cell of about 12 Å^3 per atom; ``skew`` scales the off-diagonal parts."""
    lengths = rng.uniform(1.0, 2.0, 3)
    cell = np.diag(lengths) + skew * np.tril(rng.uniform(-1.0, 1.0, (3, 3)), -1) * lengths[:, None]
    cell += 0.3 * np.triu(rng.uniform(-1.0, 1.0, (3, 3)), 1)
    cell = cell @ _random_rotation(rng)
    volume = abs(np.linalg.det(cell))
    return cell * (num_atoms * rng.uniform(10.0, 16.0) / volume) ** (1.0 / 3.0)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def random_atoms(rng: np.random.Generator, num_atoms: int, skew: float = 0.5, pbc=(True, True, True)) -> Atoms:
    cell = _f32(random_cell(rng, num_atoms, skew))
    frac = rng.uniform(-0.2, 1.2, (num_atoms, 3))  # some atoms outside the home cell on purpose
    pos = _f32(frac @ cell)
    return Atoms(numbers=rng.integers(1, 80, num_atoms), positions=pos, cell=cell, pbc=pbc)


def edge_set(i, j, shifts) -> set[tuple[int, int, int, int, int]]:
    shifts = np.asarray(shifts).round().astype(int)
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts)}


def ours(atoms: Atoms, cutoff: float, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return periodic_neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, **kwargs)


def assert_same_as_ase(atoms: Atoms, cutoff: float, backend: str) -> int:
    ei, shifts = ours(atoms, cutoff, backend=backend)
    expected = edge_set(*neighbor_list("ijS", atoms, cutoff))
    got = edge_set(ei[0].numpy(), ei[1].numpy(), shifts.numpy())
    assert ei.shape[1] == len(got), "duplicate edges"
    assert got == expected, f"missing {sorted(expected - got)[:5]}, extra {sorted(got - expected)[:5]}"
    return len(got)


#: The compiled kernels; "ase" itself is the oracle (and checked for identity below).
KERNELS = pytest.mark.parametrize("backend", ["vesin", "pymatgen"])

CASES = [
    # (seed, number of atoms, skew, cutoff)
    (0, 1, 0.3, 5.0),
    (1, 2, 0.8, 6.0),
    (2, 5, 0.5, 6.0),
    (3, 8, 1.5, 5.0),
    (4, 13, 0.1, 4.0),
    (5, 20, 2.5, 5.0),
    (6, 40, 0.5, 5.0),
    (7, 33, 3.0, 4.0),
    (8, 3, 3.0, 6.0),
    (9, 17, 0.0, 6.0),
    (10, 27, 1.0, 3.5),
    (11, 1, 3.0, 6.0),
    (12, 9, 2.0, 6.0),
    (13, 24, 0.7, 5.5),
    (14, 4, 1.2, 7.0),
    (15, 36, 0.4, 4.5),
    (16, 11, 2.8, 5.0),
    (17, 6, 0.9, 6.0),
    (18, 30, 1.8, 4.0),
    (19, 15, 3.5, 5.0),
    (20, 2, 0.2, 8.0),
    (21, 39, 1.1, 4.0),
]


@pytest.mark.parametrize("seed,num_atoms,skew,cutoff", CASES)
@KERNELS
def test_random_triclinic_cells_match_ase(seed, num_atoms, skew, cutoff, backend):
    atoms = random_atoms(np.random.default_rng(seed), num_atoms, skew)
    assert assert_same_as_ase(atoms, cutoff, backend) > 0


@pytest.mark.parametrize(
    "cell,num_atoms,cutoff",
    [
        (2.0 * np.eye(3), 1, 6.0),  # many images of a single atom
        (2.0 * np.eye(3), 3, 6.0),
        ([[2.0, 0.0, 0.0], [1.9, 0.6, 0.0], [0.4, 0.3, 1.7]], 2, 6.0),  # small and strongly skewed
        ([[1.5, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]], 4, 5.0),  # one short direction
    ],
)
@KERNELS
def test_cells_smaller_than_cutoff_match_ase(cell, num_atoms, cutoff, backend):
    rng = np.random.default_rng(num_atoms)
    cell = _f32(np.asarray(cell))
    atoms = Atoms(
        numbers=[6] * num_atoms, positions=_f32(rng.uniform(0, 1, (num_atoms, 3)) @ cell), cell=cell, pbc=True
    )
    n_edges = assert_same_as_ase(atoms, cutoff, backend)
    assert n_edges / num_atoms > 10  # many periodic images per atom


@pytest.mark.parametrize(
    "pbc,seed",
    [((True, True, False), 0), ((True, False, True), 1), ((False, True, False), 2), ((True, False, False), 3)],
)
@KERNELS
def test_mixed_pbc_match_ase(pbc, seed, backend):
    rng = np.random.default_rng(100 + seed)
    atoms = random_atoms(rng, 12, skew=1.0, pbc=pbc)
    # spread the atoms along the open directions, beyond the cell
    open_axes = [k for k in range(3) if not pbc[k]]
    frac = atoms.cell.scaled_positions(atoms.positions)
    frac[:, open_axes] *= 3.0
    atoms.positions = _f32(frac @ atoms.cell.array)
    assert_same_as_ase(atoms, 5.0, backend)
    _, shifts = ours(atoms, 5.0, backend=backend)
    assert torch.all(shifts[:, open_axes] == 0)


@KERNELS
def test_mixed_pbc_with_zero_vector_along_open_direction(backend):
    rng = np.random.default_rng(7)
    cell = _f32(np.array([[3.1, 0.0, 0.0], [0.8, 2.9, 0.0], [0.0, 0.0, 0.0]]))
    pos = _f32(rng.uniform(0, 1, (6, 3)) * [3.0, 3.0, 8.0])
    atoms = Atoms(numbers=[29] * 6, positions=pos, cell=cell, pbc=(True, True, False))
    assert assert_same_as_ase(atoms, 6.0, backend) > 0


@pytest.mark.parametrize("seed,num_atoms,cutoff", [(0, 2, 3.0), (1, 12, 4.0), (2, 40, 5.0), (3, 25, 20.0)])
@KERNELS
def test_molecules_without_cell_match_ase(seed, num_atoms, cutoff, backend):
    rng = np.random.default_rng(200 + seed)
    atoms = Atoms(numbers=[1] * num_atoms, positions=_f32(rng.uniform(-6, 6, (num_atoms, 3))), pbc=False)
    assert_same_as_ase(atoms, cutoff, backend)
    ei, shifts = periodic_neighbor_list(atoms.positions, None, False, cutoff, backend=backend)
    assert torch.all(shifts == 0)
    # a molecule: the oracle is the plain distance matrix
    d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    ii, jj = np.nonzero((d < cutoff) & ~np.eye(num_atoms, dtype=bool))
    assert edge_set(ei[0], ei[1], shifts) == edge_set(ii, jj, np.zeros((len(ii), 3)))


def test_edges_sorted_and_dtypes_and_backends_identical():
    atoms = random_atoms(np.random.default_rng(5), 20, skew=2.5)
    ei, shifts = ours(atoms, 5.0)
    assert ei.dtype == torch.int64 and shifts.dtype == torch.float32
    assert ei.shape[0] == 2 and shifts.shape == (ei.shape[1], 3)
    keys = [(int(a), int(b), *map(int, s)) for a, b, s in zip(ei[0], ei[1], shifts)]
    assert keys == sorted(keys)
    for backend in ("pymatgen", "ase"):
        ei_b, shifts_b = ours(atoms, 5.0, backend=backend)
        assert torch.equal(ei, ei_b) and torch.equal(shifts, shifts_b), backend
    # the same structure from torch float32 tensors gives the same graph
    ei_t, shifts_t = periodic_neighbor_list(
        torch.tensor(atoms.positions, dtype=torch.float32),
        torch.tensor(atoms.cell.array, dtype=torch.float32)[None],
        torch.tensor(atoms.pbc),
        5.0,
    )
    assert torch.equal(ei, ei_t) and torch.equal(shifts, shifts_t)


def test_symmetric_full_list():
    atoms = random_atoms(np.random.default_rng(8), 10, skew=1.0)
    ei, shifts = ours(atoms, 6.0)
    forward = edge_set(ei[0], ei[1], shifts)
    backward = edge_set(ei[1], ei[0], -shifts)
    assert forward == backward


def test_self_interaction_adds_home_cell_loops():
    atoms = random_atoms(np.random.default_rng(9), 7)
    ei, shifts = ours(atoms, 5.0)
    ei_self, shifts_self = ours(atoms, 5.0, self_interaction=True)
    expected = edge_set(*neighbor_list("ijS", atoms, 5.0, self_interaction=True))
    assert edge_set(ei_self[0], ei_self[1], shifts_self) == expected
    assert ei_self.shape[1] == ei.shape[1] + 7


def test_lattice_translation_of_an_atom_keeps_distances():
    rng = np.random.default_rng(11)
    atoms = random_atoms(rng, 9, skew=2.0)
    cell = atoms.cell.array

    def sorted_distances(positions):
        ei, shifts = periodic_neighbor_list(positions, cell, True, 5.5)
        vec = positions[ei[1].numpy()] - positions[ei[0].numpy()] + shifts.numpy().astype(np.float64) @ cell
        return np.sort(np.linalg.norm(vec, axis=1))

    moved = atoms.positions.copy()
    moved[3] += np.array([2, -1, 3]) @ cell
    moved[7] -= cell[1]
    before, after = sorted_distances(atoms.positions), sorted_distances(moved)
    assert before.shape == after.shape
    np.testing.assert_allclose(before, after, atol=1e-9)


def test_empty_structure():
    ei, shifts = periodic_neighbor_list(np.zeros((0, 3)), 3.0 * np.eye(3), True, 5.0)
    assert ei.shape == (2, 0) and shifts.shape == (0, 3)


def test_guard_message_names_structure_cutoff_count_and_fix():
    # one atom in a 2 Å cube at 6 Å: 92 neighbours (oracle: ASE)
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=2.0 * np.eye(3), pbc=True)
    count = len(neighbor_list("i", atoms, 6.0))
    sample = {"id": "bad-cell", "source": {"file": "train.xyz", "index": 12}}
    with pytest.raises(DataError) as info:
        periodic_neighbor_list(
            atoms.positions,
            atoms.cell.array,
            True,
            6.0,
            max_neighbors_per_atom=50,
            structure=describe_structure(sample),
        )
    msg = str(info.value)
    for part in (
        "'bad-cell'",
        "train.xyz",
        "record 12",
        "6 Å",
        f"{count:.1f} edges per atom",
        "max_neighbors_per_atom=50",
    ):
        assert part in msg, (part, msg)
    assert "lower the cutoff" in msg and "raise" in msg
    # under the limit: no error
    ei, _ = ours(atoms, 6.0, max_neighbors_per_atom=count)
    assert ei.shape[1] == count


def test_guard_refuses_hopeless_cell_before_building():
    # a cell in nm instead of Å: millions of images per atom; refused from a lower bound
    cell = 0.36 * np.eye(3)
    with pytest.raises(DataError, match="at least .* edges per atom"):
        periodic_neighbor_list(np.zeros((4, 3)), cell, True, 6.0, max_neighbors_per_atom=300)


def test_check_neighbor_count_directly():
    check_neighbor_count(300, 1, 6.0, 300)  # equal to the limit is fine
    check_neighbor_count(10**9, 1, 6.0, None)  # disabled
    with pytest.raises(DataError, match="150.0 edges per atom"):
        check_neighbor_count(300, 2, 6.0, 100, "structure 'x'")


def test_describe_structure():
    assert describe_structure({"id": "a:1", "source": {"file": "a.xyz", "index": 1}}) == (
        "structure 'a:1' (file a.xyz, record 1)"
    )
    assert describe_structure({}) == "structure (no id)"


def test_bad_inputs():
    with pytest.raises(DataError, match="vectors .*zero"):
        periodic_neighbor_list(np.zeros((2, 3)), np.zeros((3, 3)), True, 5.0, structure="structure 'm'")
    with pytest.raises(DataError, match="linearly dependent"):
        periodic_neighbor_list(np.zeros((2, 3)), [[1, 0, 0], [0, 1, 0], [1, 1, 0]], True, 5.0)
    with pytest.raises(DataError, match="NaN"):
        periodic_neighbor_list(np.full((2, 3), np.nan), np.eye(3) * 4, True, 5.0)
    with pytest.raises(DataError, match=r"\[num_atoms, 3\]"):
        periodic_neighbor_list(np.zeros((2, 2)), np.eye(3) * 4, True, 5.0)
    with pytest.raises(ConfigError, match="cutoff"):
        periodic_neighbor_list(np.zeros((2, 3)), np.eye(3) * 4, True, -1.0)
    with pytest.raises(ConfigError, match="vesin"):
        periodic_neighbor_list(np.zeros((2, 3)), np.eye(3) * 4, True, 5.0, backend="vessin")


@pytest.mark.parametrize("backend", ["pymatgen", "vesin", "ase"])
def test_cutoff_is_strict_at_the_boundary(backend):
    # simple cubic, a = 2 Å: the 6 nearest neighbours sit exactly at 2 Å
    pos, cell = np.zeros((1, 3)), 2.0 * np.eye(3)
    assert periodic_neighbor_list(pos, cell, True, 2.0, backend=backend)[0].shape[1] == 0
    assert periodic_neighbor_list(pos, cell, True, 2.0 + 1e-9, backend=backend)[0].shape[1] == 6


@KERNELS
def test_cutoff_below_one_angstrom(backend):
    rng = np.random.default_rng(3)
    cell = _f32(np.array([[3.0, 0.0, 0.0], [0.4, 2.8, 0.0], [0.2, 0.3, 3.1]]))
    atoms = Atoms(numbers=[1] * 30, positions=_f32(rng.uniform(0, 1, (30, 3)) @ cell), cell=cell, pbc=True)
    assert assert_same_as_ase(atoms, 0.9, backend) > 0


@KERNELS
def test_coincident_atoms_are_kept_as_ase_does(backend):
    atoms = Atoms("H3", positions=[[0, 0, 0], [0, 0, 0], [1, 0, 0]], cell=4.0 * np.eye(3), pbc=True)
    assert assert_same_as_ase(atoms, 1.5, backend) == 6


def test_ties_with_the_cutoff_are_settled_alike_by_all_backends_and_symmetric():
    # ideal lattices, atoms on special positions, cutoffs on (or 1 ulp around) shell distances:
    # distances equal the cutoff to the last bit, where kernels round differently
    rng = np.random.default_rng(42)
    checked = 0
    while checked < 150:
        n = int(rng.integers(1, 5))
        a = float(rng.choice([1.0, 2.0, 2.5, 3.61]))
        cell = a * np.eye(3)
        if rng.random() < 0.5:
            cell[1, 0], cell[2, 0], cell[2, 1] = a * rng.choice([0, 0.5, 1.0]), a * rng.choice([0, 0.5]), a * 0.5
        pos = rng.choice([0.0, 0.25, 0.5, 1.0, -0.5], size=(n, 3)) @ cell
        pbc = rng.random(3) < 0.8
        if not pbc.any():
            continue
        cutoff = a * float(rng.choice([1.0, np.sqrt(2), 1.5, np.sqrt(3)])) * (1 + float(rng.choice([-1e-15, 0, 1e-15])))
        graphs = {b: ours_on(pos, cell, pbc, cutoff, b) for b in ("pymatgen", "vesin", "ase")}
        assert graphs["pymatgen"] == graphs["vesin"] == graphs["ase"], (n, a, pbc, cutoff)
        edges = graphs["pymatgen"]
        assert edges == {(j, i, -x, -y, -z) for i, j, x, y, z in edges}
        checked += 1


def ours_on(pos, cell, pbc, cutoff, backend) -> set:
    ei, shifts = periodic_neighbor_list(pos, cell, pbc, cutoff, backend=backend)
    return edge_set(ei[0], ei[1], shifts)
