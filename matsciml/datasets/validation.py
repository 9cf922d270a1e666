"""Checks of structure data, run once when a dataset is set up.

:func:`validate_dataset` goes over every record and raises
:class:`~matsciml.common.errors.DataError` at the first problem, with a message that names
the file, the record index and id, the key at fault, and what to do:

=================================  ==========================================================
check                              key named
=================================  ==========================================================
the record has zero atoms          ``atomic_numbers``
an atomic number outside 1..118    ``atomic_numbers``
a non-finite position              ``pos``
a periodic axis with a zero or     ``cell``
singular cell
a requested target is missing      that target (the message lists the targets the record has)
a requested target is NaN or inf   that target (the message points to ``on_invalid="drop"``)
a per-atom target with the wrong   that target (``forces`` must be ``[N, 3]``)
number of rows
two atoms closer than 0.1 Å,       ``pos``
periodic images included
=================================  ==========================================================

Unreadable or truncated files, unknown extensions and unknown element symbols are caught
earlier, by the readers. Coordinates that all lie in [0, 1] (which may be fractional
coordinates read as Cartesian) are not an error here.

Element, position and target checks are vectorised over the whole data set; only the
distance check loops over records (one ``vesin`` neighbour list per record, searched to
1 Å, pairs below 0.1 Å reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from matsciml.common.errors import DataError, closest
from matsciml.datasets import schema

__all__ = ["validate_dataset", "invalid_target_records", "check_target_keys", "MIN_DISTANCE", "MAX_ATOMIC_NUMBER"]

#: Two atoms closer than this (Å) make a record invalid.
MIN_DISTANCE = 0.1
#: Largest atomic number accepted (oganesson).
MAX_ATOMIC_NUMBER = 118


def _where(sample: dict[str, Any], fallback_index: int) -> str:
    source = sample.get(schema.SOURCE) or {}
    file = source.get("file", "<dataset>")
    index = source.get("index", fallback_index)
    return f"{file}: record {index} (id {sample.get(schema.ID, '?')!r})"


def _getter(dataset: Any) -> Any:
    """``dataset.raw`` (no transforms) where the dataset offers it, else ``dataset.__getitem__``."""
    raw = getattr(dataset, "raw", None)
    return raw if callable(raw) else dataset.__getitem__


def check_target_keys(available: Iterable[str], target_keys: Sequence[str] | None, where: str) -> None:
    """Raise when a requested target occurs in no record at all (usually a typo).

    Parameters
    ----------
    available
        Every target key found in the data.
    target_keys
        The requested keys (``None``: nothing to check).
    where
        The file or dataset, for the message.

    Raises
    ------
    DataError
        Names the key and the closest available keys.
    """
    target_keys = schema.canonical_targets(target_keys)
    have = sorted(set(available))
    for key in target_keys or ():
        if key not in have:
            raise DataError(
                f"{where}: key {key!r}: no record has this target; {closest(key, have) if have else 'no targets found'}"
                "; fix target_keys"
            )


def _target_problem(sample: dict[str, Any], key: str) -> str | None:
    targets = sample.get(schema.TARGETS) or {}
    if key not in targets:
        have = sorted(targets)
        suggestion = closest(key, have) if have else ""
        hint = f"; {suggestion}" if suggestion.startswith("did you mean") else ""
        return (
            f"key {key!r}: requested target missing; this record has targets {have}{hint}. "
            "Add the value, change target_keys, or pass on_invalid='drop' to skip such records"
        )
    value = torch.as_tensor(targets[key])
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        flat = value.reshape(-1)
        bad = int((~torch.isfinite(flat)).nonzero()[0])
        at = f" at element {bad}" if flat.numel() > 1 else ""
        return (
            f"key {key!r}: target is {flat[bad].item()}{at} (not finite); fix the value, or pass "
            "on_invalid='drop' to skip records with missing or non-finite targets"
        )
    if key in schema.PER_ATOM_TARGETS:
        natoms = int(torch.as_tensor(sample[schema.ATOMIC_NUMBERS]).shape[0])
        if value.dim() < 1 or value.shape[0] != natoms:
            return (
                f"key {key!r}: per-atom target of shape {list(value.shape)} for {natoms} atoms; "
                f"it needs one row per atom ([{natoms}, 3] for forces)"
            )
    return None


def invalid_target_records(dataset: Any, target_keys: Sequence[str]) -> dict[int, str]:
    """Return ``{dataset index: reason}`` for records with a missing or non-finite requested target.

    Parameters
    ----------
    dataset
        Anything with ``__len__`` and ``raw(i)`` or ``__getitem__``.
    target_keys
        The requested targets.
    """
    target_keys = schema.canonical_targets(target_keys) or []
    out: dict[int, str] = {}
    get = _getter(dataset)
    for index in range(len(dataset)):
        sample = get(index)
        for key in target_keys:
            problem = _target_problem(sample, key)
            if problem is not None:
                out[index] = problem
                break
    return out


def _check_cell(sample: dict[str, Any], index: int) -> tuple[np.ndarray, np.ndarray]:
    cell = torch.as_tensor(sample.get(schema.CELL, torch.zeros(1, 3, 3))).reshape(3, 3).double().numpy()
    pbc = torch.as_tensor(sample.get(schema.PBC, torch.zeros(3, dtype=torch.bool))).reshape(3).numpy().astype(bool)
    if not np.isfinite(cell).all():
        raise DataError(f"{_where(sample, index)}: key 'cell': non-finite cell entries; fix the lattice")
    if pbc.any():
        norms = np.linalg.norm(cell, axis=1)
        if (norms[pbc] == 0).any():
            axis = int(np.nonzero(pbc & (norms == 0))[0][0])
            raise DataError(
                f"{_where(sample, index)}: key 'cell': periodic along axis {axis} but that cell vector is zero; "
                "give the lattice or set pbc False for that axis"
            )
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-8:
            raise DataError(
                f"{_where(sample, index)}: key 'cell': the cell is singular (zero volume); fix the lattice vectors"
            )
    return cell, pbc


def _close_pair(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> tuple | None:
    """First pair (i, j, shift, distance) closer than ``cutoff``, periodic images included."""
    if pos.shape[0] == 0:
        return None
    try:
        import vesin

        # vesin's cell list has bins of the cutoff's size: a 0.1 Å cutoff would make millions
        # of bins for a 10 Å cell, so search to 1 Å and keep the pairs below the cutoff.
        search = max(cutoff, 1.0)
        i, j, shifts, d = vesin.NeighborList(cutoff=search, full_list=False).compute(
            points=pos, box=cell, periodic=[bool(p) for p in pbc], quantities="ijSd"
        )
    except ImportError:
        from ase import Atoms
        from ase.neighborlist import neighbor_list

        i, j, shifts, d = neighbor_list("ijSd", Atoms(positions=pos, cell=cell, pbc=pbc), cutoff)
    if len(d) == 0 or float(np.min(d)) >= cutoff:
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), [int(s) for s in shifts[k]], float(d[k])


def _check_chunk(
    samples: list[dict[str, Any]], start: int, target_keys: Sequence[str] | None, min_distance: float
) -> None:
    """Run every check on ``samples`` (dataset indices ``start, start + 1, ...``); raise at the first problem."""
    z_list = [torch.as_tensor(s[schema.ATOMIC_NUMBERS]).reshape(-1) for s in samples]
    natoms = np.array([z.shape[0] for z in z_list])
    empty = np.nonzero(natoms == 0)[0]
    if empty.size:
        k = int(empty[0])
        raise DataError(
            f"{_where(samples[k], start + k)}: key 'atomic_numbers': the record has zero atoms; remove it from the file"
        )
    offsets = np.concatenate([[0], np.cumsum(natoms)])
    z_all = torch.cat(z_list).numpy()
    bad = np.nonzero((z_all < 1) | (z_all > MAX_ATOMIC_NUMBER))[0]
    if bad.size:
        atom = int(bad[0])
        k = int(np.searchsorted(offsets, atom, side="right") - 1)
        raise DataError(
            f"{_where(samples[k], start + k)}: key 'atomic_numbers': atom {atom - offsets[k]} has atomic number "
            f"{int(z_all[atom])}, not an element (valid: 1..{MAX_ATOMIC_NUMBER}); fix its species"
        )
    pos_all = torch.cat([torch.as_tensor(s[schema.POS]).reshape(-1, 3) for s in samples])
    bad_pos = np.nonzero(~torch.isfinite(pos_all).all(dim=1).numpy())[0]
    if bad_pos.size:
        atom = int(bad_pos[0])
        k = int(np.searchsorted(offsets, atom, side="right") - 1)
        raise DataError(
            f"{_where(samples[k], start + k)}: key 'pos': atom {atom - offsets[k]} has a non-finite position; fix the coordinates"
        )
    if target_keys:
        for key in target_keys:
            present = [key in (s.get(schema.TARGETS) or {}) for s in samples]
            if not all(present):
                k = present.index(False)
                raise DataError(f"{_where(samples[k], start + k)}: {_target_problem(samples[k], key)}")
            values = [torch.as_tensor(s[schema.TARGETS][key]) for s in samples]
            finite = torch.stack([torch.isfinite(v.double()).all() for v in values]).numpy()
            if not finite.all():
                k = int(np.nonzero(~finite)[0][0])
                raise DataError(f"{_where(samples[k], start + k)}: {_target_problem(samples[k], key)}")
            if key in schema.PER_ATOM_TARGETS:
                rows = np.array([v.shape[0] if v.dim() else -1 for v in values])
                wrong = np.nonzero(rows != natoms)[0]
                if wrong.size:
                    k = int(wrong[0])
                    raise DataError(f"{_where(samples[k], start + k)}: {_target_problem(samples[k], key)}")
    for k, sample in enumerate(samples):
        cell, pbc = _check_cell(sample, start + k)
        pos = pos_all[offsets[k] : offsets[k + 1]].double().numpy()
        pair = _close_pair(pos, cell, pbc, min_distance)
        if pair is not None:
            i, j, shift, dist = pair
            image = f" (periodic image shifted by {shift} cells)" if any(shift) else ""
            what = f"atom {i} and its own image{image}" if i == j else f"atoms {i} and {j}{image}"
            raise DataError(
                f"{_where(sample, start + k)}: key 'pos': {what} are {dist:.4f} Å apart, closer than {min_distance} Å; "
                "remove the duplicated atom, or check the units, the cell and whether coordinates are fractional"
            )


def validate_dataset(
    dataset: Any,
    target_keys: Sequence[str] | None = None,
    *,
    min_distance: float = MIN_DISTANCE,
    chunk_size: int = 4096,
) -> int:
    """Check every record of ``dataset``; raise at the first problem.

    Parameters
    ----------
    dataset
        Anything with ``__len__`` and ``raw(i)`` (e.g.
        :class:`~matsciml.datasets.StructureDataset`; used without transforms) or
        ``__getitem__`` returning samples.
    target_keys
        Targets every record must carry as finite values (default ``None``: targets are not
        checked).
    min_distance
        Smallest allowed interatomic distance in Å, periodic images included (default 0.1).
    chunk_size
        Records checked together (default 4096): the vectorised checks run per chunk, so
        memory stays bounded for large (LMDB) data sets.

    Returns
    -------
    int
        The number of records checked.

    Raises
    ------
    DataError
        Names the file, record index and id, the key, and what to do (see the module
        docstring for the list of checks).
    """
    target_keys = schema.canonical_targets(target_keys)
    n = len(dataset)
    if n == 0:
        raise DataError(f"{getattr(dataset, 'path', '<dataset>')}: the dataset has no records")
    get = _getter(dataset)
    available = getattr(dataset, "available_targets", None)
    if target_keys and available is not None:
        check_target_keys(available, target_keys, str(getattr(dataset, "path", "<dataset>")))
    for start in range(0, n, chunk_size):
        samples = [get(i) for i in range(start, min(n, start + chunk_size))]
        _check_chunk(samples, start, target_keys, min_distance)
    return n
