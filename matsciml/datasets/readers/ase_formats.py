"""Readers for the formats ASE parses: extended XYZ / XYZ, ASE trajectories and ASE databases.

The whole file is read into memory (these formats hold small data sets); each record
goes through :func:`~matsciml.datasets.readers.common.atoms_to_sample`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matsciml.common.errors import DataError
from matsciml.datasets.readers.common import atoms_to_sample

__all__ = ["read_xyz", "read_traj", "read_ase_db", "read_atoms_file", "db_row_to_atoms"]


def _xyz_format(path: Path) -> str:
    """``extxyz`` when the first comment line holds ``key=value`` pairs, else plain ``xyz``.

    ASE's extended-XYZ parser turns the bare words of a plain comment line into boolean
    ``info`` entries, which would then pose as targets; plain XYZ files are therefore
    read with ASE's simple ``xyz`` parser (no ``info``).
    """
    if path.suffix.lower() == ".extxyz":
        return "extxyz"
    with open(path, encoding="utf-8", errors="replace") as handle:
        handle.readline()
        comment = handle.readline()
    return "extxyz" if "=" in comment else "xyz"


def read_atoms_file(path: str | Path, fmt: str) -> list[Any]:
    """Read every frame of ``path`` with ASE, naming the failing record in errors.

    Parameters
    ----------
    path
        The file.
    fmt
        ASE format name (``"extxyz"``, ``"xyz"``, ``"traj"``, ``"cif"``).

    Returns
    -------
    list[ase.Atoms]

    Raises
    ------
    DataError
        The file cannot be opened, a frame cannot be parsed (truncated or corrupt file),
        or an element symbol is unknown. The message names the file and record index.
    """
    import ase.io

    path = Path(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err}); check the path and permissions") from None
    frames: list[Any] = []
    try:
        for atoms in ase.io.iread(str(path), index=":", format=fmt):
            frames.append(atoms)
    except KeyError as err:
        raise DataError(
            f"{path}: record {len(frames)}: key 'species': unknown element symbol {err.args[0]!r}; "
            "use chemical symbols H..Og (or atomic numbers 1-118) and fix the record"
        ) from None
    except Exception as err:  # any parser failure is a data problem
        raise DataError(
            f"{path}: record {len(frames)}: cannot parse it as {fmt} ({type(err).__name__}: {err}); "
            f"the file looks truncated or corrupt after {len(frames)} good record(s): re-export or repair it"
        ) from None
    return frames


def read_xyz(path: str | Path) -> list[dict[str, Any]]:
    """Read an extended XYZ (``.extxyz``) or XYZ (``.xyz``) file into samples.

    Raises
    ------
    DataError
        See :func:`read_atoms_file`.
    """
    path = Path(path)
    return [atoms_to_sample(a, path, i) for i, a in enumerate(read_atoms_file(path, _xyz_format(path)))]


def read_traj(path: str | Path) -> list[dict[str, Any]]:
    """Read an ASE trajectory (``.traj``) into samples.

    Raises
    ------
    DataError
        See :func:`read_atoms_file`.
    """
    path = Path(path)
    return [atoms_to_sample(a, path, i) for i, a in enumerate(read_atoms_file(path, "traj"))]


def db_row_to_atoms(row: Any) -> Any:
    """Return an ``ase.Atoms`` of one ASE database row with its labels attached.

    ``key_value_pairs`` go to ``atoms.info``; entries of ``row.data`` go to ``info``
    (scalars) or ``arrays`` (arrays with one row per atom); calculator results
    (energy, forces, stress, ...) stay on ``atoms.calc``.
    """
    import numpy as np

    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    data = row.get("data") or {}
    for key, value in data.items():
        arr = np.asarray(value)
        if arr.ndim == 0:
            atoms.info.setdefault(key, value)
        elif arr.shape[0] == len(atoms) and key not in atoms.arrays:
            atoms.arrays[key] = arr
    return atoms


def read_ase_db(path: str | Path, db_type: str | None = None) -> list[dict[str, Any]]:
    """Read every row of an ASE database (``.db`` SQLite, or ASE's JSON database) into samples.

    Records are in row order; the record index is the 0-based position, not ASE's row id.

    Raises
    ------
    DataError
        The database cannot be opened or a row cannot be converted.
    """
    import ase.db

    path = Path(path)
    samples: list[dict[str, Any]] = []
    try:
        db = ase.db.connect(str(path), type=db_type or "extract_from_name", create_indices=False)
        rows = db.select()
        for row in rows:
            samples.append(atoms_to_sample(db_row_to_atoms(row), path, len(samples)))
    except DataError:
        raise
    except Exception as err:  # sqlite/json errors are data problems here
        raise DataError(
            f"{path}: record {len(samples)}: cannot read the ASE database ({type(err).__name__}: {err}); "
            "check that the file is a complete ASE database (ase db PATH lists it)"
        ) from None
    return samples
