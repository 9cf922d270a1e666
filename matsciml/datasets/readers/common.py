"""Turn an ASE ``Atoms`` record into a sample laid out as in :mod:`matsciml.datasets.schema`.

Every reader except the LMDB one parses its file into ``ase.Atoms`` objects and hands them
to :func:`atoms_to_sample`, so the rules for finding targets live in one place:

* ``atoms.info``: every numeric scalar (``int``, ``float``, ``bool`` and their NumPy
  types; booleans and integers become float tensors). Strings and other objects are
  skipped. ``id`` and keys ending in ``_id`` name the record (they become ``sample["id"]``)
  and are not targets. A ``stress`` or ``virial`` entry with 6 (Voigt) or 9 numbers
  becomes a ``[3, 3]`` target.
* ``atoms.arrays``: every numeric per-atom array (``[N, ...]``) other than the structure
  (``positions``, ``numbers``) and the inputs ``ase.Atoms`` keeps there itself
  (``initial_magmoms``, ``initial_charges``, ``masses``, ``tags``, ``momenta``, and the
  CIF reader's ``spacegroup_kinds``).
* the attached calculator's stored results (``atoms.calc.results``; nothing is
  computed): ``energy``, ``free_energy`` and ``magmom`` as scalars, ``forces``,
  ``energies``, ``magmoms`` and ``charges`` per atom, ``stress`` as a full ``[3, 3]``
  tensor in the calculator's units (eV/Å\\ :sup:`3` for ASE).

When a key occurs in more than one place the calculator wins over ``info``, which wins
over ``arrays``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matsciml.datasets import schema

__all__ = [
    "atoms_to_sample",
    "extract_targets",
    "record_id",
    "make_sample",
    "copy_sample",
    "FLOAT_DTYPE",
]

#: dtype of positions, cells and targets in every sample.
FLOAT_DTYPE = torch.float32

_CALC_SCALARS = ("energy", "free_energy", "magmom")
_CALC_PER_ATOM = ("forces", "energies", "magmoms", "charges")
_STRESS_KEYS = ("stress", "virial")
#: Per-atom arrays that describe the structure or hold ``ase.Atoms`` inputs, never targets.
_STRUCTURE_ARRAYS = (
    "positions",
    "numbers",
    "spacegroup_kinds",
    "initial_magmoms",
    "initial_charges",
    "masses",
    "tags",
    "momenta",
)


def _is_numeric_scalar(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and (value.dtype.kind in "biuf")
    return isinstance(value, numbers.Real)


def _is_id_key(key: str) -> bool:
    return key == "id" or key.endswith("_id")


def _full_stress(value: Any) -> np.ndarray | None:
    """Return a ``[3, 3]`` array from a Voigt 6-vector, 9 numbers or a 3x3 array (else None)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        return None
    if arr.size == 6:
        xx, yy, zz, yz, xz, xy = arr.reshape(6).astype(np.float64)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    if arr.size == 9:
        return arr.reshape(3, 3).astype(np.float64)
    return None


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))


def record_id(info: Mapping[str, Any], file: str | Path, index: int) -> str:
    """Return the record's own name (``info["id"]`` or an ``*_id`` entry), else ``"<file name>:<index>"``."""
    if "id" in info and not isinstance(info["id"], (dict, list, np.ndarray)):
        return str(info["id"])
    for key in sorted(info):
        if _is_id_key(key) and not isinstance(info[key], (dict, list, np.ndarray)):
            value = info[key]
            return str(value.item() if isinstance(value, np.generic) else value)
    return f"{Path(file).name}:{index}"


def extract_targets(atoms: Any) -> dict[str, torch.Tensor]:
    """Collect the labels of one ``ase.Atoms`` (see the module docstring for the rules).

    Parameters
    ----------
    atoms
        An ``ase.Atoms``; its calculator, when present, is read through ``calc.results``.

    Returns
    -------
    dict[str, torch.Tensor]
        float32 tensors: 0-d for scalars, ``[N, ...]`` per atom, ``[3, 3]`` for stress.
    """
    natoms = len(atoms)
    targets: dict[str, torch.Tensor] = {}
    for key, value in atoms.arrays.items():
        if key in _STRUCTURE_ARRAYS:
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf" and arr.ndim >= 1 and arr.shape[0] == natoms:
            targets[key] = _tensor(arr)
    for key, value in atoms.info.items():
        if _is_id_key(key):
            continue
        if key in _STRESS_KEYS:
            full = _full_stress(value)
            if full is not None:
                targets[key] = _tensor(full)
            continue
        if _is_numeric_scalar(value):
            targets[key] = _tensor(value)
    calc = getattr(atoms, "calc", None)
    results = getattr(calc, "results", None) or {}
    for key, value in results.items():
        if value is None:
            continue
        if key in _CALC_SCALARS and _is_numeric_scalar(value):
            targets[key] = _tensor(value)
        elif key in _CALC_PER_ATOM:
            arr = np.asarray(value)
            if arr.dtype.kind in "biuf" and arr.ndim >= 1 and arr.shape[0] == natoms:
                targets[key] = _tensor(arr)
        elif key == "stress":
            full = _full_stress(value)
            if full is not None:
                targets[key] = _tensor(full)
    return targets


def make_sample(
    pos: Any,
    atomic_numbers: Any,
    cell: Any,
    pbc: Any,
    targets: dict[str, torch.Tensor],
    sample_id: str,
    file: str | Path,
    index: int,
) -> dict[str, Any]:
    """Assemble a sample dict with the schema's dtypes and shapes.

    Parameters
    ----------
    pos
        ``[N, 3]`` Cartesian positions, Å.
    atomic_numbers
        ``[N]`` integers.
    cell
        ``[3, 3]`` (or ``[1, 3, 3]``) lattice vectors as rows, Å; ``None`` gives zeros.
    pbc
        Three booleans (or one, broadcast).
    targets
        Labels, already float tensors.
    sample_id
        The record's id.
    file, index
        Where the record came from (kept in ``sample["source"]``).
    """
    pos_t = torch.from_numpy(np.array(pos, dtype=np.float32).reshape(-1, 3))
    z = torch.from_numpy(np.array(atomic_numbers, dtype=np.int64).reshape(-1))
    cell_arr = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    cell_t = torch.from_numpy(cell_arr.astype(np.float32).reshape(1, 3, 3))
    pbc_t = torch.from_numpy(np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy())
    return {
        schema.POS: pos_t,
        schema.ATOMIC_NUMBERS: z,
        schema.CELL: cell_t,
        schema.PBC: pbc_t,
        schema.NATOMS: int(z.shape[0]),
        schema.ID: str(sample_id),
        schema.SOURCE: {"file": str(file), "index": int(index)},
        schema.TARGETS: targets,
    }


def atoms_to_sample(atoms: Any, file: str | Path, index: int) -> dict[str, Any]:
    """Convert one ``ase.Atoms`` into a sample.

    Parameters
    ----------
    atoms
        The record. Positions are taken as Cartesian Å, the cell rows as lattice vectors.
    file
        The file it was read from (recorded in ``sample["source"]`` and used in ids).
    index
        Its 0-based position in the file.

    Returns
    -------
    dict
        A sample as laid out in :mod:`matsciml.datasets.schema`.
    """
    return make_sample(
        atoms.get_positions(),
        atoms.get_atomic_numbers(),
        atoms.cell.array,
        atoms.pbc,
        extract_targets(atoms),
        record_id(atoms.info, file, index),
        file,
        index,
    )


def copy_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Return a copy whose tensors, ``targets`` and ``source`` can be changed without touching ``sample``."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.clone()
        elif isinstance(value, dict):
            out[key] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            out[key] = value
    return out
