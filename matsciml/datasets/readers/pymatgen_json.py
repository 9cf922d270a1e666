"""Reader for pymatgen ``Structure`` JSON files.

Accepted layouts of the file (``Structure.as_dict()`` output, e.g. from ``json.dump``):

* one Structure dict;
* a list whose items are Structure dicts or ``{"structure": <Structure dict>,
  "properties": {...}, "id": ...}`` entries;
* ``{"structures": [...]}`` with items as above, optionally with ``"properties": [...]``
  (one dict per structure, same order).

Targets come from the structure's own ``properties`` dict and the ``properties`` next to
it (the latter wins); numeric per-site properties (``site.properties``, e.g. ``forces``)
become per-atom targets. An ``id`` next to the structure, or an ``id`` / ``*_id``
property, names the record. A JSON file written by ``ase.db`` (ASE's JSON database) is
recognised and read as an ASE database.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from matsciml.common.errors import DataError
from matsciml.datasets.readers.common import atoms_to_sample

__all__ = ["read_pymatgen_json", "structure_to_atoms"]


def _is_structure_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and "lattice" in obj and "sites" in obj


def _entries(obj: Any, path: Path) -> list[tuple[dict, dict, Any]]:
    """Return ``(structure dict, extra properties, id or None)`` per record."""
    extra_props: list[Any] | None = None
    if isinstance(obj, dict) and "structures" in obj:
        items = obj["structures"]
        extra_props = obj.get("properties")
        if not isinstance(items, list):
            raise DataError(f"{path}: key 'structures' must hold a list of Structure dicts, got {type(items).__name__}")
        if extra_props is not None and (not isinstance(extra_props, list) or len(extra_props) != len(items)):
            raise DataError(
                f"{path}: key 'properties' must be a list with one dict per structure "
                f"({len(items)} structures); put per-structure properties in each structure's 'properties' instead"
            )
    elif isinstance(obj, list):
        items = obj
    elif _is_structure_dict(obj) or (isinstance(obj, dict) and "structure" in obj):
        items = [obj]
    else:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"{path}: not a pymatgen Structure JSON (top level: {keys}); expected a Structure dict, "
            "a list of them, or {'structures': [...]}"
        )
    out = []
    for index, item in enumerate(items):
        props: dict = {}
        rec_id = None
        if isinstance(item, dict) and "structure" in item and not _is_structure_dict(item):
            props.update(item.get("properties") or {})
            rec_id = item.get("id")
            item = item["structure"]
        if not _is_structure_dict(item):
            raise DataError(
                f"{path}: record {index}: key 'structure': not a pymatgen Structure dict (needs 'lattice' and "
                "'sites'); write structures with Structure.as_dict()"
            )
        if extra_props is not None:
            if not isinstance(extra_props[index], dict):
                raise DataError(f"{path}: record {index}: key 'properties': expected a dict of property values")
            props.update(extra_props[index])
        out.append((item, props, rec_id))
    return out


def structure_to_atoms(structure: Any, properties: dict | None = None, rec_id: Any = None) -> Any:
    """Convert a pymatgen ``Structure`` into an ``ase.Atoms`` carrying its labels.

    Parameters
    ----------
    structure
        An ordered ``pymatgen.core.Structure`` (every site fully occupied by one species).
    properties
        Extra structure-level properties (override ``structure.properties``).
    rec_id
        The record's id, if given next to the structure.

    Raises
    ------
    ValueError
        A disordered site (partial occupancy).
    """
    from ase import Atoms

    if not structure.is_ordered:
        raise ValueError("the structure has partially occupied (disordered) sites")
    numbers = [site.specie.Z for site in structure]
    atoms = Atoms(
        numbers=numbers,
        positions=structure.cart_coords,
        cell=structure.lattice.matrix,
        pbc=tuple(bool(p) for p in structure.lattice.pbc),
    )
    info = dict(getattr(structure, "properties", None) or {})
    info.update(properties or {})
    if rec_id is not None:
        info["id"] = rec_id
    atoms.info.update(info)
    for key, values in structure.site_properties.items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.ndim >= 1 and arr.shape[0] == len(atoms) and key not in ("positions", "numbers"):
            atoms.arrays[key] = arr
    return atoms


def read_pymatgen_json(path: str | Path) -> list[dict[str, Any]]:
    """Read a pymatgen Structure JSON file into samples.

    Raises
    ------
    DataError
        Invalid JSON (e.g. a truncated file), an unexpected layout, or a record that
        pymatgen cannot turn into an ordered Structure (unknown element, disordered site).
    """
    from pymatgen.core import Structure

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            obj = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
            "the file looks truncated or corrupt: re-export it"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file ({err})") from None
    if isinstance(obj, dict) and "ids" in obj and "nextid" in obj:
        from matsciml.datasets.readers.ase_formats import read_ase_db

        return read_ase_db(path, db_type="json")
    samples = []
    for index, (sdict, props, rec_id) in enumerate(_entries(obj, path)):
        try:
            structure = Structure.from_dict(sdict)
            atoms = structure_to_atoms(structure, props, rec_id)
        except Exception as err:  # pymatgen raises many types for bad input
            msg = str(err)
            key = "species" if ("element" in msg.lower() or "symbol" in msg.lower()) else "structure"
            raise DataError(
                f"{path}: record {index}: key {key!r}: cannot build a pymatgen Structure "
                f"({type(err).__name__}: {msg}); fix or remove the record"
            ) from None
        samples.append(atoms_to_sample(atoms, path, index))
    return samples
