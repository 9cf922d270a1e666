"""Throughput of building periodic graphs: ours against ASE and pymatgen.

Usage::

    python benchmarks/graphs.py [--repeats N] [--alloys N] [--large N]

Sets of structures (generated here, deterministic seeds):

(a) random fcc alloy cells of 1-32 atoms (Cu, Ag, Au, Ni, Pd, Pt; random
    lattice constant, random supercell matrix, rattled), cutoff 5 Å;
(b) 64-atom fcc cells (4x4x4 primitive supercells, rattled), cutoff 6 Å;
(c) the real OQMD devset crystals (2-40 atoms) at 6 Å, when
    ``<repo>/tests/data/oqmd_devset.extxyz`` exists.

Columns, structures per second (best of ``--repeats`` passes over the set, one
process, one thread):

* ``ours``: :class:`~matsciml.datasets.transforms.PeriodicPropertiesTransform`
  on a sample dict holding float32 torch tensors (``pos``, ``cell``, ``pbc``):
  includes the conversion to float64 arrays, the checks, vesin, sorting the
  edges by ``(i, j, S)`` and building the ``edge_index``/``cell_shifts`` tensors;
* ``ours+graph``: the same followed by
  :class:`~matsciml.datasets.transforms.PointCloudToGraphTransform` (PyG ``Data``);
* ``vesin``: the bare ``vesin.NeighborList.compute(..., "ijS")`` call on float64
  arrays (the floor of ``ours``);
* ``ase``: ``ase.neighborlist.neighbor_list("ijS", atoms, r)`` on prebuilt
  ``Atoms`` (numpy out, no sorting, no torch);
* ``pymatgen``: ``Structure.get_neighbor_list(r)`` on prebuilt ``Structure``
  objects (numpy out, also returns distances; no sorting, no torch).

The peers get their input objects built outside the timed loop, and return
numpy arrays, so they do less work than ``ours``; the ratio ``ours / peer`` > 1
means ours is faster. Edge counts of all methods are compared as a check.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk, make_supercell  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402
from pymatgen.io.ase import AseAtomsAdaptor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark this checkout, installed or not

from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform  # noqa: E402

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt")
LATTICE = {"Cu": 3.61, "Ag": 4.09, "Au": 4.08, "Ni": 3.52, "Pd": 3.89, "Pt": 3.92}


def _three_factors(n: int, rng: np.random.Generator) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    first = int(rng.choice(divisors))
    rest = [d for d in divisors if (n // first) % d == 0]
    second = int(rng.choice(rest))
    return [first, second, n // (first * second)]


def alloy_cells(count: int, seed: int = 0) -> list[Atoms]:
    """Random fcc alloy cells of 1-32 atoms (uniform), from random integer supercell matrices."""
    rng = np.random.default_rng(seed)
    out: list[Atoms] = []
    for _ in range(count):
        elements = rng.choice(METALS, size=rng.integers(1, 4), replace=False)
        a = float(np.mean([LATTICE[e] for e in elements])) * rng.uniform(0.98, 1.02)
        n = int(rng.integers(1, 33))
        # upper-triangular integer matrix: det = product of the diagonal = n; skew from the off-diagonals
        matrix = np.diag(rng.permutation(_three_factors(n, rng))) + np.triu(rng.integers(-1, 2, (3, 3)), 1)
        atoms = make_supercell(bulk("Cu", "fcc", a=a), matrix)
        atoms.numbers = [int(Atoms(str(e)).numbers[0]) for e in rng.choice(elements, size=len(atoms))]
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def large_cells(count: int, seed: int = 1) -> list[Atoms]:
    """64-atom fcc Cu cells (4x4x4 supercells of the primitive cell), rattled."""
    out = []
    for k in range(count):
        atoms = bulk("Cu", "fcc", a=3.61) * (4, 4, 4)
        atoms.rattle(0.05, seed=seed * 1000 + k)
        out.append(atoms)
    return out


def oqmd_cells() -> list[Atoms] | None:
    path = REPO / "tests" / "data" / "oqmd_devset.extxyz"
    if not path.exists():
        return None
    from ase.io import read

    return list(read(path, ":"))


def to_sample(atoms: Atoms) -> dict:
    return {
        "pos": torch.tensor(atoms.positions, dtype=torch.float32),
        "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.long),
        "cell": torch.tensor(atoms.cell.array, dtype=torch.float32).reshape(1, 3, 3),
        "pbc": torch.tensor(atoms.pbc, dtype=torch.bool),
        "natoms": len(atoms),
    }


def best_time(fn: Callable[[], list[int]], passes: int, clock: Callable[[], float]) -> tuple[float, list[int]]:
    """Best of ``passes`` timed passes; the edge counts of the first."""
    best, counts = float("inf"), None
    for _ in range(max(passes, 1)):
        start = clock()
        result = fn()
        best = min(best, clock() - start)
        counts = result if counts is None else counts
    return best, counts


def run_set(name: str, structures: list[Atoms], cutoff: float, repeats: int, clock: Callable[[], float]) -> dict:
    samples = [to_sample(a) for a in structures]
    periodic = PeriodicPropertiesTransform(cutoff_radius=cutoff, max_neighbors_per_atom=None)
    periodic_vesin = PeriodicPropertiesTransform(cutoff_radius=cutoff, max_neighbors_per_atom=None, backend="vesin")
    to_graph = PointCloudToGraphTransform()
    ase_atoms = [a.copy() for a in structures]
    arrays = [(a.cell.array.copy(), a.numbers.copy(), a.positions.copy()) for a in structures]
    prebuilt = [AseAtomsAdaptor.get_structure(a) for a in structures]

    def ours() -> list[int]:
        return [periodic(dict(s))["edge_index"].shape[1] for s in samples]

    def ours_vesin() -> list[int]:
        return [periodic_vesin(dict(s))["edge_index"].shape[1] for s in samples]

    def ours_graph() -> list[int]:
        return [to_graph(periodic(dict(s)))["graph"].edge_index.shape[1] for s in samples]

    def ase() -> list[int]:
        return [len(neighbor_list("ijS", a, cutoff)[0]) for a in ase_atoms]

    def pymatgen_arrays() -> list[int]:
        out = []
        for cell, numbers, pos in arrays:
            structure = Structure(Lattice(cell), numbers, pos, coords_are_cartesian=True)
            out.append(len(structure.get_neighbor_list(cutoff)[0]))
        return out

    def pymatgen_prebuilt() -> list[int]:
        return [len(s.get_neighbor_list(cutoff)[0]) for s in prebuilt]

    methods = {
        "ours": (ours, repeats),
        "ours, vesin": (ours_vesin, repeats),
        "ours + graph": (ours_graph, repeats),
        "ase": (ase, 1),  # slow: one pass
        "pymatgen": (pymatgen_arrays, repeats),
        "pymatgen*": (pymatgen_prebuilt, repeats),
    }
    ours()  # warm-up (imports, caches)
    rates, counts = {}, {}
    for label, (fn, passes) in methods.items():
        seconds, counts[label] = best_time(fn, passes, clock)
        rates[label] = len(structures) / seconds
    reference = counts["ase"]
    for label, c in counts.items():
        if c != reference:
            bad = sum(x != y for x, y in zip(c, reference))
            print(f"  warning: {label} edge counts differ from ASE's on {bad} of {len(c)} structures")
    atoms = [len(a) for a in structures]
    edges = float(np.mean(np.array(reference) / np.array(atoms)))
    print(
        f"\n({name}) {len(structures)} structures, {min(atoms)}-{max(atoms)} atoms (mean {np.mean(atoms):.1f}), "
        f"cutoff {cutoff:g} Å, {edges:.1f} edges/atom"
    )
    header = f"  {'method':<13} {'structures/s':>13} {'ours / method':>14}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for label, rate in rates.items():
        print(f"  {label:<13} {rate:>13,.0f} {rates['ours'] / rate:>14.2f}")
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method and set (best is kept)")
    parser.add_argument("--alloys", type=int, default=500, help="number of alloy cells in set (a)")
    parser.add_argument("--large", type=int, default=50, help="number of 64-atom cells in set (b)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock instead of this process's CPU time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.perf_counter if args.wall else time.process_time

    import ase
    import pymatgen.core
    import vesin

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, vesin {vesin.__version__}, "
        f"ase {ase.__version__}, pymatgen {pymatgen.core.__version__}; {platform.machine()}, "
        f"{'wall-clock' if args.wall else 'CPU'} time, best of {args.repeats}"
    )
    start = time.perf_counter()
    results = {"a": run_set("a", alloy_cells(args.alloys), 5.0, args.repeats, clock)}
    results["b"] = run_set("b", large_cells(args.large), 6.0, args.repeats, clock)
    oqmd = oqmd_cells()
    if oqmd is None:
        print("\n(c) skipped: tests/data/oqmd_devset.extxyz not found")
    else:
        results["c"] = run_set("c: OQMD devset", oqmd, 6.0, args.repeats, clock)
    print(f"\ntotal {time.perf_counter() - start:.1f} s (wall)")
    for key, rates in results.items():
        print(
            f"set {key}: ours is {rates['ours'] / rates['pymatgen']:.2f}x pymatgen from arrays, "
            f"{rates['ours'] / rates['pymatgen*']:.2f}x pymatgen on prebuilt Structures"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
