"""Readers of structure files into samples (see :mod:`matsciml.datasets.schema`), and the LMDB writer.

One module per format: :mod:`~.ase_formats` (extended XYZ / XYZ, ASE trajectories and
databases), :mod:`~.pymatgen_json`, :mod:`~.cif_folder`, :mod:`~.lmdb_format` (reader and
writer); :mod:`~.common` holds the ``ase.Atoms`` -> sample conversion and the rules for
finding targets; :mod:`~.formats` picks a reader from a path.
"""

from __future__ import annotations

from matsciml.datasets.readers.ase_formats import read_ase_db, read_traj, read_xyz
from matsciml.datasets.readers.cif_folder import read_cif_file, read_cif_folder
from matsciml.datasets.readers.common import atoms_to_sample, extract_targets
from matsciml.datasets.readers.formats import EXTENSIONS, FORMATS, detect_format, open_records
from matsciml.datasets.readers.lmdb_format import LMDBReader, write_lmdb
from matsciml.datasets.readers.pymatgen_json import read_pymatgen_json

__all__ = [
    "atoms_to_sample",
    "extract_targets",
    "read_xyz",
    "read_traj",
    "read_ase_db",
    "read_pymatgen_json",
    "read_cif_file",
    "read_cif_folder",
    "LMDBReader",
    "write_lmdb",
    "FORMATS",
    "EXTENSIONS",
    "detect_format",
    "open_records",
]
