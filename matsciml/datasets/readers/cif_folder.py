"""Reader for a folder of CIF files (one structure per file), with optional targets in a CSV.

Layout::

    my_set/
      mp-1234.cif
      mp-5678.cif
      targets.csv        # optional, OR id_prop.csv

Records are the ``*.cif`` files sorted by name; each record's id is its file stem
(``mp-1234``). Targets, if any, come from one CSV file in the folder:

* ``targets.csv``: a header row; the column ``id`` (or, if none is named so, the first
  column) holds the file stem; every other column is a target named by its header.
  An empty cell means "no value" for that record.
* ``id_prop.csv`` (the CGCNN convention): no header; the first column is the file stem,
  the second the target ``target`` (further columns: ``target_1``, ``target_2``, ...).

Having both files is an error. A CSV row naming a stem without a ``.cif`` file is an
error (it usually means a wrong folder). A single ``.cif`` file (not a folder) can also
be read: every data block becomes one record.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from matsciml.common.errors import DataError
from matsciml.datasets.readers.ase_formats import read_atoms_file
from matsciml.datasets.readers.common import atoms_to_sample

__all__ = ["read_cif_folder", "read_cif_file", "read_targets_csv", "TARGET_FILES"]

#: CSV file names looked for in a CIF folder, in order.
TARGET_FILES = ("targets.csv", "id_prop.csv")


def _number(text: str, csv_path: Path, row: int, column: str) -> float | None:
    text = text.strip()
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise DataError(
            f"{csv_path}: row {row}: key {column!r}: {text!r} is not a number; targets must be numeric "
            "(leave the cell empty for a missing value)"
        ) from None


def read_targets_csv(csv_path: str | Path) -> dict[str, dict[str, float]]:
    """Read ``targets.csv`` or ``id_prop.csv`` into ``{stem: {target: value}}``.

    Raises
    ------
    DataError
        A non-numeric value, a duplicated id, or a header without target columns.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    out: dict[str, dict[str, float]] = {}
    if csv_path.name == "id_prop.csv":
        header = None
        body = rows
    else:
        if not rows:
            return out
        header = [h.strip() for h in rows[0]]
        body = rows[1:]
        if len(header) < 2:
            raise DataError(f"{csv_path}: row 0: the header {header} has no target column; write 'id,<target>,...'")
    id_col = header.index("id") if header and "id" in header else 0
    first_row = 1 if header else 0
    for offset, row in enumerate(body):
        line = first_row + offset
        names = header if header else ["id"] + ["target"] + [f"target_{k}" for k in range(1, len(row) - 1)]
        if len(row) != len(names):
            raise DataError(f"{csv_path}: row {line}: {len(row)} columns, expected {len(names)} ({names})")
        stem = row[id_col].strip()
        if stem in out:
            raise DataError(f"{csv_path}: row {line}: key 'id': {stem!r} appears twice; keep one row per CIF file")
        values = {}
        for col, (name, text) in enumerate(zip(names, row)):
            if col == id_col:
                continue
            value = _number(text, csv_path, line, name)
            if value is not None:
                values[name] = value
        out[stem] = values
    return out


def _folder_targets(folder: Path, stems: list[str]) -> dict[str, dict[str, float]]:
    found = [folder / name for name in TARGET_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"{folder}: holds both {TARGET_FILES[0]} and {TARGET_FILES[1]}; keep one of them "
            "(targets.csv has a header row, id_prop.csv does not)"
        )
    if not found:
        return {}
    table = read_targets_csv(found[0])
    known = set(stems)
    for stem in table:
        if stem not in known:
            raise DataError(
                f"{found[0]}: key 'id': {stem!r} has no file {stem}.cif in {folder}; remove the row or add the CIF file"
            )
    return table


def read_cif_file(path: str | Path) -> list[dict[str, Any]]:
    """Read every data block of one CIF file into samples (ids ``"<file name>:<block>"``).

    Raises
    ------
    DataError
        The file cannot be parsed.
    """
    path = Path(path)
    return [atoms_to_sample(a, path, i) for i, a in enumerate(read_atoms_file(path, "cif"))]


def read_cif_folder(folder: str | Path) -> list[dict[str, Any]]:
    """Read a folder of ``*.cif`` files (sorted by name) with targets from its CSV file.

    Each sample's ``source`` names its CIF file and its index in the sorted list.

    Raises
    ------
    DataError
        No CIF file, a CIF that cannot be parsed or holds several structures, or a bad
        targets CSV (see :func:`read_targets_csv`).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".cif" and p.is_file())
    if not files:
        raise DataError(f"{folder}: no *.cif file in this folder")
    table = _folder_targets(folder, [p.stem for p in files])
    samples = []
    for index, cif in enumerate(files):
        frames = read_atoms_file(cif, "cif")
        if len(frames) != 1:
            raise DataError(
                f"{cif}: record {index}: holds {len(frames)} structures (data blocks); a CIF folder needs "
                "exactly one structure per file: split the file"
            )
        atoms = frames[0]
        atoms.info["id"] = cif.stem
        for key, value in table.get(cif.stem, {}).items():
            atoms.info[key] = value
        samples.append(atoms_to_sample(atoms, cif, index))
    return samples
