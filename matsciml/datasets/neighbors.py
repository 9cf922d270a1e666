"""Neighbour lists of periodic, partly periodic and non-periodic structures.

:func:`periodic_neighbor_list` is the one function every graph of the package is
built with. It is a pure function of arrays (no sample dicts, no state) and
returns the edges in the convention of :mod:`matsciml.common.graph`:

* ``edge_index`` ``[2, num_edges]`` int64, row 0 the centre atom ``i``, row 1
  its neighbour ``j``; the list is *full* (``j -> i`` is present for every
  ``i -> j``);
* ``cell_shifts`` ``[num_edges, 3]`` float32, the integer lattice translation
  ``S`` of the neighbour, so that ``r_ij = pos[j] - pos[i] + S @ cell``;
* edges are sorted lexicographically by ``(i, j, S)``, so one structure always
  gives the same graph, whatever the backend, its version or the number of threads.

``(i, j, S)`` is an edge when ``|r_ij| < cutoff``, except the atom itself in the
home cell (``i == j`` and ``S == 0``, unless ``self_interaction``). Only the
directions where ``pbc`` is True are repeated; the cell vectors of the other
directions are ignored (zeros are fine: a molecule has an all-zero cell).

Three backends (kernels) give the same edges (checked against each other and
against ASE in the tests); they differ in speed only:

``"pymatgen"`` (default)
    the compiled cell-list kernel behind ``pymatgen``'s
    ``Structure.get_neighbor_list``
    (``pymatgen.optimization.neighbors.find_points_in_spheres``), called on
    plain arrays without building a ``Structure``. It also lists each atom
    itself, which is removed here.
``"vesin"``
    :class:`vesin.NeighborList` (cell lists; periodicity per direction). On the
    structures of ``benchmarks/graphs.py`` (1-64 atoms) the whole transform is
    1.5-2 times slower with it than with the pymatgen kernel, hence not the default.
``"ase"``
    :func:`ase.neighborlist.primitive_neighbor_list`, pure NumPy, 50-120 times
    slower; an independent cross-check.

Each kernel lists the candidates within ``cutoff + 1e-6`` Å; the pairs within
1e-6 Å of the cutoff are then decided by one shared computation of
``|pos[j] - pos[i] + S @ cell|``, made of separately rounded operations that
give ``(j, i, -S)`` exactly the negated vector. So distances that tie with the
cutoff to the last bit (ideal crystals, round cutoffs) are settled alike by all
backends, and ``(i, j, S)`` is an edge exactly when ``(j, i, -S)`` is.

For the compiled kernels a non-periodic direction gets a unit cell vector
orthogonal to the periodic ones (they need an invertible box; the vector does
not change the result there).

Cells smaller than the cutoff are fine: every periodic image within the cutoff
is found (a 2 Å cell with a 6 Å cutoff gives about 90 edges per atom). To stop
such a graph from exhausting memory, ``max_neighbors_per_atom`` (see
:func:`check_neighbor_count`) raises :class:`~matsciml.common.errors.DataError`
when the average number of edges per atom exceeds the limit. For fully periodic
cells a lower bound of that number is computed first (every lattice translate
of the cell that meets the sphere of radius ``cutoff - D``, ``D`` the longest
cell diagonal, lies inside the cutoff sphere), so a hopeless structure (e.g. a
cell given in nm instead of Å) is refused before its list is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from matsciml.common.errors import ConfigError, DataError, closest

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "periodic_neighbor_list",
    "check_neighbor_count",
    "describe_structure",
]

#: Names accepted by ``backend``.
BACKENDS = ("pymatgen", "vesin", "ase")
#: The backend used when none is named.
DEFAULT_BACKEND = "pymatgen"

StructureRef = str | Mapping[str, Any] | None


def describe_structure(sample: StructureRef) -> str:
    """Name a structure for error messages: its id and the file and record it came from.

    Parameters
    ----------
    sample
        A sample dict (see :mod:`matsciml.datasets.schema`), whose ``id`` and
        ``source = {"file", "index"}`` are used when present; a string is
        returned as it is.

    Returns
    -------
    str
        E.g. ``"structure 'train.xyz:12' (file train.xyz, record 12)"``, or
        ``"structure (no id)"``.
    """
    if isinstance(sample, str):
        return sample
    if not sample:
        return "structure (no id)"
    name = f"structure {sample['id']!r}" if sample.get("id") is not None else "structure (no id)"
    source = sample.get("source")
    if isinstance(source, Mapping) and source.get("file") is not None:
        where = f"file {source['file']}"
        if source.get("index") is not None:
            where += f", record {source['index']}"
        name += f" ({where})"
    return name


def check_neighbor_count(
    num_edges: float,
    num_atoms: int,
    cutoff: float,
    max_neighbors_per_atom: float | None,
    structure: StructureRef = None,
    lower_bound: bool = False,
) -> None:
    """Raise when a structure has more edges per atom than ``max_neighbors_per_atom``.

    Parameters
    ----------
    num_edges
        Number of (directed) edges of the structure, or a lower bound of it.
    num_atoms
        Number of atoms ``N``.
    cutoff
        Cutoff radius used, Å (for the message).
    max_neighbors_per_atom
        The limit on ``num_edges / num_atoms``; ``None`` disables the check.
    structure
        The sample, or its name (see :func:`describe_structure`).
    lower_bound
        Whether ``num_edges`` is a lower bound computed before the list is
        built (said in the message).

    Raises
    ------
    DataError
        When ``num_edges / num_atoms > max_neighbors_per_atom``. The message
        names the structure, the cutoff, the average number of edges per atom
        and the two fixes (lower the cutoff, raise the limit).
    """
    if max_neighbors_per_atom is None or num_atoms == 0:
        return
    per_atom = num_edges / num_atoms
    if per_atom > max_neighbors_per_atom:
        how = "at least " if lower_bound else ""
        raise DataError(
            f"{describe_structure(structure)}: the neighbour list at cutoff {cutoff:g} Å has {how}{per_atom:.1f} "
            f"edges per atom on average ({num_atoms} atoms), more than "
            f"max_neighbors_per_atom={max_neighbors_per_atom:g}. Check the cell and positions (units: Å; a cell "
            "much smaller than the cutoff gives many periodic images), then lower the cutoff "
            "(PeriodicPropertiesTransform(cutoff_radius=...)) or raise the limit (max_neighbors_per_atom=...)."
        )


# ----------------------------------------------------------------------------------------------
# Inputs. Structures are small, so the per-call cost of NumPy dominates: 3x3 work is plain Python.


def _to_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.numpy(force=True)  # detached, on the CPU
    return np.asarray(x, dtype=np.float64)


def _pbc_tuple(pbc: Any, structure: StructureRef) -> tuple[bool, bool, bool]:
    if isinstance(pbc, torch.Tensor | np.ndarray):
        pbc = pbc.tolist() if pbc.ndim == 1 else pbc.reshape(-1).tolist()
    if isinstance(pbc, bool | int | np.bool_):
        return (bool(pbc),) * 3
    if len(pbc) == 3:
        return (bool(pbc[0]), bool(pbc[1]), bool(pbc[2]))
    if len(pbc) == 1:
        return (bool(pbc[0]),) * 3
    raise DataError(f"{describe_structure(structure)}: key 'pbc' must hold 1 or 3 booleans, got {pbc!r}.")


def _det3(m: list[list[float]]) -> float:
    (a, b, c), (d, e, f), (g, h, k) = m
    return a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)


def _completed_box(cell: np.ndarray, pbc: tuple[bool, bool, bool]) -> np.ndarray:
    """Replace the vectors of non-periodic directions by unit vectors orthogonal to the periodic ones."""
    box = cell.copy()
    periodic = [k for k in range(3) if pbc[k]]
    free = [k for k in range(3) if not pbc[k]]
    if periodic:  # an orthonormal basis of the complement of span(periodic vectors)
        complement = np.linalg.svd(cell[periodic])[2][len(periodic) :]
    else:
        complement = np.eye(3)
    for row, k in zip(complement, free):
        box[k] = row
    if np.linalg.det(box) < 0:  # keep a right-handed box
        box[free[-1]] *= -1.0
    return box


def _check_inputs(
    pos: np.ndarray, cell: np.ndarray, pbc: tuple[bool, bool, bool], structure: StructureRef
) -> tuple[np.ndarray, list[list[float]]]:
    """Validate the arrays; return the box handed to the compiled kernels, and the cell as lists."""
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise DataError(
            f"{describe_structure(structure)}: key 'pos' must have shape [num_atoms, 3], got {list(pos.shape)}."
        )
    rows = cell.tolist()
    if not math.isfinite(float(pos.sum()) + sum(rows[0]) + sum(rows[1]) + sum(rows[2])):
        key = "pos" if not np.isfinite(pos).all() else "cell"
        raise DataError(
            f"{describe_structure(structure)}: key {key!r} holds NaN or infinite values; fix or drop this record."
        )
    if not (pbc[0] or pbc[1] or pbc[2]):
        return _IDENTITY, rows
    full = pbc[0] and pbc[1] and pbc[2]
    box = cell if full else _completed_box(cell, pbc)
    box_rows = rows if full else box.tolist()
    norms = [math.sqrt(x * x + y * y + z * z) for x, y, z in box_rows]
    zero = [k for k in range(3) if pbc[k] and norms[k] == 0.0]
    if zero:
        raise DataError(
            f"{describe_structure(structure)}: pbc is True along cell vector(s) {zero} but those vectors are zero "
            f"(cell={rows}). Give the lattice vectors (rows of 'cell', Å) or set pbc False along those "
            "directions (a molecule has pbc [False, False, False])."
        )
    if abs(_det3(box_rows)) < 1e-10 * norms[0] * norms[1] * norms[2]:
        raise DataError(
            f"{describe_structure(structure)}: the periodic cell vectors are linearly dependent (cell={rows}, "
            f"pbc={list(pbc)}); fix the lattice of this record."
        )
    return box, rows


def _edges_lower_bound(num_atoms: int, rows: list[list[float]], pbc: tuple[bool, bool, bool], cutoff: float) -> float:
    """A lower bound of the number of edges of a fully periodic structure (0 when not fully periodic).

    Each pair of atoms has at least ``4/3 pi (cutoff - D)^3 / V`` images within the
    cutoff, ``D`` being the longest diagonal of the cell and ``V`` its volume.
    """
    if not (pbc[0] and pbc[1] and pbc[2]) or num_atoms == 0:
        return 0.0
    (ax, ay, az), (bx, by, bz), (cx, cy, cz) = rows
    # the mean of the four squared diagonals is |a|^2 + |b|^2 + |c|^2, so D^2 is at least that
    if cutoff * cutoff <= ax * ax + ay * ay + az * az + bx * bx + by * by + bz * bz + cx * cx + cy * cy + cz * cz:
        return 0.0
    diagonal = max(
        math.hypot(ax + sb * bx + sc * cx, ay + sb * by + sc * cy, az + sb * bz + sc * cz)
        for sb, sc in ((1, 1), (1, -1), (-1, 1), (-1, -1))
    )
    if cutoff <= diagonal:
        return 0.0
    return num_atoms * num_atoms / abs(_det3(rows)) * (4.0 / 3.0) * math.pi * (cutoff - diagonal) ** 3 - num_atoms


# ----------------------------------------------------------------------------------------------
# Kernels. Each lists the candidate pairs within cutoff + _MARGIN as (i, j, shifts, distances). Pairs
# within _MARGIN of the cutoff are then settled by one shared computation (_settle), so that every backend
# keeps the same pairs, and (i, j, S) is kept exactly when (j, i, -S) is, even for distances that tie
# with the cutoff to the last bit (ideal crystals, "round" cutoffs).

_IDENTITY = np.eye(3)
_PBC_FLAGS: dict[tuple[bool, bool, bool], np.ndarray] = {}
_MARGIN = 1e-6  # Å
Candidates = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _pymatgen_pairs(pos: np.ndarray, box: np.ndarray, pbc: tuple[bool, bool, bool], cutoff: float) -> Candidates:
    from pymatgen.optimization.neighbors import find_points_in_spheres

    flags = _PBC_FLAGS.get(pbc)
    if flags is None:
        flags = _PBC_FLAGS[pbc] = np.array(pbc, dtype=np.int64)
    # keep pymatgen's tolerance (1e-8): with none, pairs at exactly a bin boundary go missing
    return find_points_in_spheres(pos, pos, r=cutoff + _MARGIN, pbc=flags, lattice=box, tol=1e-8)


def _vesin_pairs(pos: np.ndarray, box: np.ndarray, pbc: tuple[bool, bool, bool], cutoff: float) -> Candidates:
    import vesin

    # one thread: structures are small, and data-loader workers run in parallel already
    nl = vesin.NeighborList(cutoff=cutoff + _MARGIN, full_list=True, n_threads=1)
    return nl.compute(pos, box, np.array(pbc), quantities="ijSd")


def _ase_pairs(pos: np.ndarray, cell: np.ndarray, pbc: tuple[bool, bool, bool], cutoff: float) -> Candidates:
    from ase.neighborlist import primitive_neighbor_list

    return primitive_neighbor_list("ijSd", pbc, cell, pos, cutoff + _MARGIN, self_interaction=False)


def _settle(
    pos: np.ndarray,
    box: np.ndarray,
    cutoff: float,
    i: np.ndarray,
    j: np.ndarray,
    shifts: np.ndarray,
    dist: np.ndarray,
) -> tuple[np.ndarray | None, int]:
    """The mask of candidate pairs to leave out, and its count.

    Leaves out each atom itself (``i == j``, ``S == 0``: the pymatgen kernel lists it; an atom
    and its own image are a whole lattice vector apart, so ``d <= 1e-8`` with ``i == j`` finds
    exactly those), and decides the pairs within ``_MARGIN`` of the cutoff from
    ``|pos[j] - pos[i] + S @ cell| < cutoff``, computed with separately rounded operations that
    give ``(j, i, -S)`` exactly the negated vector.
    """
    near = np.flatnonzero(dist > cutoff - _MARGIN)
    itself = dist <= 1e-8
    if not near.size and not itself.any():
        return None, 0
    drop = itself & (i == j)
    if near.size:
        s = shifts[near].astype(np.float64)
        vec = pos[j[near]] - pos[i[near]]
        vec += s[:, 0:1] * box[0] + s[:, 1:2] * box[1] + s[:, 2:3] * box[2]
        drop[near] = vec[:, 0] * vec[:, 0] + vec[:, 1] * vec[:, 1] + vec[:, 2] * vec[:, 2] >= cutoff * cutoff
    return drop, int(np.count_nonzero(drop))


# Below this many pairs one lexsort is cheapest; above it, a stable sort of one float64 key.
_LEXSORT_MAX_PAIRS = 256


def _sort_order(
    num_atoms: int, i: np.ndarray, j: np.ndarray, shifts: np.ndarray, drop: np.ndarray | None, num_kept: int
) -> np.ndarray:
    """Indices that put the kept pairs in (i, j, S) order (dropped pairs left out)."""
    if len(i) > _LEXSORT_MAX_PAIRS:
        reach = int(np.abs(shifts).max())
        width = 2 * reach + 1
        if float(num_atoms) ** 2 * float(width) ** 3 < 2.0**52:
            # key = (i * N + j) * W^3 + s0 * W^2 + s1 * W + s2: the shifts are digits in [-reach, reach]
            # of a balanced base W = 2 * reach + 1, so the key orders like (i, j, s0, s1, s2), and it is
            # exact in float64. The kernels list pairs by centre, and the stable sort (timsort) profits.
            key = shifts @ np.array([width * width, width, 1.0])
            key += (i * num_atoms + j) * float(width**3)
            if drop is not None:
                key[drop] = np.inf
            return np.argsort(key, kind="stable")[:num_kept]
    s = shifts.T
    if drop is None:
        return np.lexsort((s[2], s[1], s[0], j, i))
    return np.lexsort((s[2], s[1], s[0], j, i, drop))[:num_kept]  # dropped pairs sort last


def _sorted_edges(
    num_atoms: int, i: np.ndarray, j: np.ndarray, shifts: np.ndarray, drop: np.ndarray | None, num_kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the kept edges by (i, j, S) and return them as torch tensors."""
    if num_kept == 0:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3)
    i = i.astype(np.int64, copy=False)
    j = j.astype(np.int64, copy=False)
    order = _sort_order(num_atoms, i, j, shifts, drop, num_kept)
    edge_index = np.concatenate((i.take(order), j.take(order))).reshape(2, num_kept)
    cell_shifts = shifts.take(order, axis=0).astype(np.float32)
    return torch.from_numpy(edge_index), torch.from_numpy(cell_shifts)


def periodic_neighbor_list(
    pos: torch.Tensor | np.ndarray,
    cell: torch.Tensor | np.ndarray | None,
    pbc: torch.Tensor | np.ndarray | bool | tuple[bool, bool, bool],
    cutoff: float,
    self_interaction: bool = False,
    *,
    max_neighbors_per_atom: float | None = None,
    structure: StructureRef = None,
    backend: str = DEFAULT_BACKEND,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs of atoms closer than ``cutoff``, periodic images included.

    Parameters
    ----------
    pos
        Cartesian positions ``[num_atoms, 3]``, Å.
    cell
        Lattice vectors as rows, ``[3, 3]`` or ``[1, 3, 3]``, Å. Only the vectors
        of periodic directions are used; ``None`` or zeros for a molecule.
    pbc
        Periodicity per direction, ``[3]`` bools, or one bool for all three.
    cutoff
        Cutoff radius, Å: ``(i, j, S)`` is an edge when ``|r_ij| < cutoff``,
        except the atom itself in the home cell (``i == j``, ``S == 0``).
    self_interaction
        Also return the edges ``(i, i, S=0)`` (default False). Edges from an atom
        to its own periodic images (``S != 0``) are always returned.
    max_neighbors_per_atom
        Raise when the average number of edges per atom exceeds this
        (default None: no limit); see :func:`check_neighbor_count`.
    structure
        The sample these arrays come from, or its name: named in error messages
        (:func:`describe_structure`; only formatted when an error is raised).
    backend
        ``"pymatgen"`` (default), ``"vesin"`` or ``"ase"``: the same edges (see
        the module docstring).

    Returns
    -------
    edge_index : torch.Tensor
        int64 ``[2, num_edges]``: row 0 centre ``i``, row 1 neighbour ``j``.
    cell_shifts : torch.Tensor
        float32 ``[num_edges, 3]``: integer lattice shifts ``S`` with
        ``r_ij = pos[j] - pos[i] + S @ cell``.

    Edges are sorted by ``(i, j, S)`` lexicographically.

    Raises
    ------
    DataError
        Positions of the wrong shape or not finite, a periodic direction whose
        cell vector is zero, linearly dependent periodic cell vectors, or too
        many neighbours per atom. Messages start with the structure's name.
    ConfigError
        A non-positive cutoff or an unknown backend.

    Examples
    --------
    >>> import numpy as np
    >>> ei, s = periodic_neighbor_list(np.zeros((1, 3)), 2.5 * np.eye(3), True, 3.0)
    >>> ei.shape[1]  # the 6 face neighbours of a simple cubic lattice
    6
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown neighbour-list backend {backend!r}; {closest(str(backend), BACKENDS)}")
    try:
        cutoff = float(cutoff)
    except (TypeError, ValueError):
        cutoff = float("nan")
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise ConfigError(f"cutoff must be a positive number of Å, got {cutoff!r}.")
    pos_np = _to_float64(pos)
    cell_np = np.zeros((3, 3)) if cell is None else _to_float64(cell).reshape(3, 3)
    pbc_t = _pbc_tuple(pbc, structure)
    box, rows = _check_inputs(pos_np, cell_np, pbc_t, structure)
    num_atoms = pos_np.shape[0]

    if max_neighbors_per_atom is not None:
        bound = _edges_lower_bound(num_atoms, rows, pbc_t, cutoff)
        check_neighbor_count(bound, num_atoms, cutoff, max_neighbors_per_atom, structure, lower_bound=True)

    if num_atoms == 0:
        i = j = np.zeros(0, dtype=np.int64)
        shifts, drop, num_dropped = np.zeros((0, 3)), None, 0
    else:
        if backend == "pymatgen":
            i, j, shifts, dist = _pymatgen_pairs(pos_np, box, pbc_t, cutoff)
        elif backend == "vesin":
            i, j, shifts, dist = _vesin_pairs(pos_np, box, pbc_t, cutoff)
        else:
            i, j, shifts, dist = _ase_pairs(pos_np, cell_np, pbc_t, cutoff)
        drop, num_dropped = _settle(pos_np, box, cutoff, i, j, shifts, dist)

    if self_interaction and num_atoms:
        own = np.arange(num_atoms, dtype=np.int64)
        i = np.concatenate([i.astype(np.int64), own])
        j = np.concatenate([j.astype(np.int64), own])
        shifts = np.concatenate([shifts, np.zeros((num_atoms, 3), dtype=shifts.dtype)])
        if drop is not None:
            drop = np.concatenate([drop, np.zeros(num_atoms, dtype=bool)])

    num_kept = len(i) - num_dropped
    check_neighbor_count(num_kept, num_atoms, cutoff, max_neighbors_per_atom, structure)
    return _sorted_edges(num_atoms, i, j, shifts, drop, num_kept)
