"""Choose a reader from a path: by extension for files, by content for folders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets.readers.ase_formats import read_ase_db, read_traj, read_xyz
from matsciml.datasets.readers.cif_folder import read_cif_file, read_cif_folder
from matsciml.datasets.readers.lmdb_format import LMDBReader
from matsciml.datasets.readers.pymatgen_json import read_pymatgen_json
from matsciml.datasets.upstream.reader import UpstreamLMDBReader, is_upstream_lmdb
from matsciml.datasets.upstream.records import FORMATS as UPSTREAM_FORMATS

__all__ = ["FORMATS", "EXTENSIONS", "detect_format", "open_records"]

#: Format name -> function returning the records of a path (a list, or a lazy LMDBReader).
FORMATS: dict[str, Callable[[Path], Sequence[dict[str, Any]]]] = {
    "extxyz": read_xyz,
    "xyz": read_xyz,
    "traj": read_traj,
    "db": read_ase_db,
    "json": read_pymatgen_json,
    "cif": read_cif_file,
    "cif_folder": read_cif_folder,
    "lmdb": LMDBReader,
    # Open MatSciML Toolkit LMDBs (pickled records, read with an allowlist): the dataset
    # is detected from the first record, or named ("upstream:OQMDDataset").
    "upstream": UpstreamLMDBReader,
    **{f"upstream:{name}": (lambda path, _name=name: UpstreamLMDBReader(path, _name)) for name in UPSTREAM_FORMATS},
}

#: File extension -> format name.
EXTENSIONS = {
    ".extxyz": "extxyz",
    ".xyz": "xyz",
    ".traj": "traj",
    ".db": "db",
    ".json": "json",
    ".cif": "cif",
    ".lmdb": "lmdb",
}

_SUPPORTED = (
    "files ending in " + ", ".join(EXTENSIONS) + "; a folder ending in .lmdb (or holding data.mdb or *.lmdb "
    "files, this package's or the Open MatSciML Toolkit's); a folder of *.cif files"
)


def detect_format(path: str | Path) -> str:
    """Return the format name of ``path`` (a key of :data:`FORMATS`).

    Raises
    ------
    DataError
        ``path`` does not exist, or its extension / content is not a supported format
        (the message lists the supported ones).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path (supported: {_SUPPORTED})")
    if path.is_dir():
        if path.suffix == ".lmdb" or (path / "data.mdb").is_file() or any(path.glob("*.lmdb")):
            return "upstream" if is_upstream_lmdb(path) else "lmdb"
        if any(p.suffix.lower() == ".cif" for p in path.iterdir()):
            return "cif_folder"
        raise DataError(f"{path}: folder with no *.cif or LMDB files; supported: {_SUPPORTED}")
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt == "lmdb" and is_upstream_lmdb(path):
        return "upstream"
    if fmt is None:
        raise DataError(
            f"{path}: unknown extension {path.suffix!r}; supported: {_SUPPORTED}. "
            "Rename the file or pass format=... explicitly"
        )
    return fmt


def open_records(path: str | Path, format: str | None = None) -> Sequence[dict[str, Any]]:
    """Read (or, for LMDB, open lazily) the records at ``path``.

    Parameters
    ----------
    path
        File or folder.
    format
        A key of :data:`FORMATS` to bypass detection (``None``: detect from the path).

    Raises
    ------
    DataError
        Unsupported path or unreadable content, with file and record index.
    ConfigError
        ``format`` is not a known format name.
    """
    path = Path(path)
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise ConfigError(f"format {format!r} for {path} is not supported; {closest(format, FORMATS)}")
    elif not path.exists():
        raise DataError(f"{path}: no such file or directory; check the path")
    records = FORMATS[format](path)
    if len(records) == 0:
        raise DataError(f"{path}: holds no records (empty or cut-off file); check that it was written completely")
    return records
