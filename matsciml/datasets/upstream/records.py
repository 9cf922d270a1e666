"""Map the records of each Open MatSciML Toolkit dataset to this package's samples.

One function per dataset family turns an unpickled record (a dict) into a sample laid out
as in :mod:`matsciml.datasets.schema`: Cartesian positions and cell rows in Å, ``pbc``,
atomic numbers, float targets. Where the toolkit reads its own records wrongly, the
mapping here does what the data mean:

=================== =========================================================================
dataset             record -> sample
=================== =========================================================================
OQMDDataset         ``cart_coords`` are **fractional** (all in [0, 1]): ``pos = frac @ cell``
                    (the toolkit uses them as Cartesian Å). Targets: ``energy`` and
                    ``delta_e`` (formation energy, eV/atom; also as
                    ``formation_energy_per_atom``), ``band_gap`` (eV), ``stability`` (eV/atom
                    above the hull; also as ``energy_above_hull``).
LiPSDataset         tensors ``pos``, ``cell``, ``pbc``, ``atomic_numbers``; ``energy`` (eV,
                    total), ``forces`` (eV/Å; the record's ``force``).
CMDataset           Carolina: ``cart_coords`` are fractional and there is no cell matrix,
                    only the CIF ``_cell_length_*`` (Å) and ``_cell_angle_*`` (degrees); the
                    cell is built with ``a`` along x and ``b`` in the xy plane
                    (:func:`ase.geometry.cellpar_to_cell`). Target ``energy`` (formation
                    energy, eV/atom).
AlexandriaDataset   ``structure`` (``Structure.as_dict()``); ``forces`` (eV/Å, the record's
                    ``force``), ``magmoms`` (μB), and every ``targets.regression`` value
                    (``energy_total`` eV, ``e_form`` eV/atom, ``e_above_hull`` eV/atom,
                    ``band_gap_ind``/``band_gap_dir`` eV, ``dos_ef``, ``total_mag`` μB);
                    ``energy`` = ``energy_total``.
MaterialsProject    ``structure`` (a pymatgen ``Structure``); every numeric or boolean field
Dataset             of the summary document (``band_gap``, ``energy_per_atom``,
                    ``formation_energy_per_atom``, ``is_stable``, ``efermi``, ...), booleans
                    as 0/1. Fields the download did not request are left out.
NomadDataset        SI units converted: positions and cell from metres (x 1e10), energies
                    from joules (/ 1.602176634e-19). Targets ``energy_total`` (eV),
                    ``efermi`` (eV), ``relative_energy`` and ``reference_energy`` (eV, as
                    the toolkit computed them), ``band_gap`` (eV) when present.
ColabFitDataset     tensors as LiPS; ``stress`` is stored upper triangular and is
                    symmetrised (``S + S.T - diag S``); targets under their ColabFit names
                    (``potential-energy``, ``stress``, ``formation-energy``, ...),
                    ``forces`` (the record's ``force``), ``energy`` = ``potential-energy``.
S2EFDataset,        OCP records stored as PyG ``Data``: ``pos``, ``cell``, ``atomic_numbers``,
IS2REDataset        ``forces``/``energy`` (S2EF, from ``force``/``y``), ``energy_init``/
                    ``energy_relaxed`` (IS2RE, from ``y_init``/``y_relaxed``), periodic.
                    Records that are DGL graphs are refused with an error (DGL is not used).
=================== =========================================================================

A value stored as ``None`` is a missing label: it becomes NaN, and the dataset's
``on_invalid`` policy decides (the toolkit turns it into 0.0).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matsciml.common.errors import DataError
from matsciml.datasets.readers.common import make_sample

__all__ = ["UpstreamFormat", "FORMATS", "ALIASES", "detect", "oqmd_positions", "carolina_cell", "EV_PER_JOULE"]

#: Joules -> electronvolts.
EV_PER_JOULE = 1.0 / 1.602176634e-19
#: Metres -> Å.
ANGSTROM_PER_METRE = 1e10


@dataclass(frozen=True)
class UpstreamFormat:
    """How the records of one upstream dataset class become samples.

    Attributes
    ----------
    name
        The upstream class name (``"OQMDDataset"``).
    to_sample
        ``(record, file, key) -> sample``.
    targets
        The target names the class exposes (listed by ``-o``; records may hold more).
    detect
        ``record -> bool``: whether a record has this dataset's layout.
    """

    name: str
    to_sample: Callable[[dict, Path, int], dict[str, Any]]
    targets: tuple[str, ...]
    detect: Callable[[dict], bool] = field(default=lambda record: False)


def _scalar(value: Any) -> torch.Tensor:
    """A 0-d float32 tensor; ``None`` (a missing label) becomes NaN."""
    if value is None:
        return torch.tensor(float("nan"))
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).reshape(())
    return torch.tensor(float(np.asarray(value, dtype=np.float64).reshape(())), dtype=torch.float32)


def _array(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32)
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def _np(value: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Real, np.bool_, np.number)) or (
        isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0
    )


def _where(file: Path, key: int) -> str:
    return f"{file}: key {str(key)!r}"


def _need(record: Mapping, keys: tuple[str, ...], file: Path, key: int, dataset: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(
            f"{_where(file, key)}: {dataset} record lacks {missing[0]!r} (has {sorted(record)[:12]}); the file is "
            f"not a {dataset} LMDB: pick the dataset class matching the data"
        )


# --------------------------------------------------------------------------- OQMD


def oqmd_positions(record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Cartesian positions (Å, float64) and cell of an OQMD record: ``cart_coords`` are fractional."""
    cell = _np(record["cell"]).reshape(3, 3)
    frac = _np(record["cart_coords"]).reshape(-1, 3)
    return frac @ cell, cell


def _oqmd(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("cart_coords", "cell", "atomic_numbers"), file, key, "OQMDDataset")
    pos, cell = oqmd_positions(record)
    formation = _scalar(record.get("delta_e"))
    hull = _scalar(record.get("stability"))
    targets = {
        "energy": formation,
        "delta_e": formation.clone(),
        "formation_energy_per_atom": formation.clone(),
        "band_gap": _scalar(record.get("band_gap")),
        "stability": hull,
        "energy_above_hull": hull.clone(),
    }
    sample_id = str(record["entry_id"]) if record.get("entry_id") is not None else f"{file.name}:{key}"
    return make_sample(pos, record["atomic_numbers"], cell, True, targets, sample_id, file, key)


# --------------------------------------------------------------------------- tensor records (LiPS, ColabFit)


def _pbc(record: Mapping) -> Any:
    pbc = record.get("pbc")
    return True if pbc is None else _np(pbc, bool).reshape(-1)


def _lips(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("pos", "atomic_numbers", "cell"), file, key, "LiPSDataset")
    targets = {"energy": _scalar(record.get("energy"))}
    if record.get("force") is not None:
        targets["forces"] = _array(record["force"])
    return make_sample(
        _np(record["pos"]), _np(record["atomic_numbers"], np.int64), _np(record["cell"]), _pbc(record), targets,
        f"{file.name}:{key}", file, key,
    )  # fmt: skip


#: Target names of ColabFit records (as the toolkit lists them).
COLABFIT_KEYS = ("potential-energy", "force", "stress", "formation-energy", "free-energy", "band-gap", "adsorption")


def symmetric_from_upper(stress: Any) -> np.ndarray:
    """The full symmetric ``[3, 3]`` tensor of one stored upper triangular (``S + S.T - diag S``)."""
    upper = np.triu(_np(stress).reshape(3, 3))
    return upper + upper.T - np.diag(np.diag(upper))


def _colabfit(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("pos", "atomic_numbers"), file, key, "ColabFitDataset")
    targets: dict[str, torch.Tensor] = {}
    for name in COLABFIT_KEYS:
        if name not in record:
            continue
        value = record[name]
        if name == "force":
            targets["forces"] = _array(value) if value is not None else torch.full((len(record["pos"]), 3), math.nan)
        elif name == "stress":
            full = symmetric_from_upper(value) if value is not None else np.full((3, 3), np.nan)
            targets["stress"] = torch.from_numpy(full.astype(np.float32))
        else:
            targets[name] = _scalar(value)
    if "potential-energy" in targets:
        targets["energy"] = targets["potential-energy"].clone()
    cell = record.get("cell")
    return make_sample(
        _np(record["pos"]), _np(record["atomic_numbers"], np.int64), None if cell is None else _np(cell),
        _pbc(record), targets, f"{file.name}:{key}", file, key,
    )  # fmt: skip


# --------------------------------------------------------------------------- Carolina


def carolina_cell(record: Mapping) -> np.ndarray:
    """The ``[3, 3]`` cell (Å, rows) from the CIF lengths (Å) and angles (degrees) of a Carolina record."""
    from ase.geometry import cellpar_to_cell

    names = ("a", "b", "c")
    lengths = [float(record[f"_cell_length_{n}"]) for n in names]
    angles = [float(record[f"_cell_angle_{n}"]) for n in ("alpha", "beta", "gamma")]
    return np.asarray(cellpar_to_cell(lengths + angles), dtype=np.float64)


def _carolina(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("cart_coords", "atomic_numbers", "_cell_length_a", "_cell_angle_alpha"), file, key, "CMDataset")
    cell = carolina_cell(record)
    pos = _np(record["cart_coords"]).reshape(-1, 3) @ cell
    targets = {"energy": _scalar(record.get("energy"))}
    sample_id = str(record.get("origin_file") or f"{file.name}:{key}")
    return make_sample(pos, record["atomic_numbers"], cell, True, targets, sample_id, file, key)


# --------------------------------------------------------------------------- pymatgen records


def _structure_arrays(structure: Any, file: Path, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(structure, dict):
        try:
            lattice = np.asarray(structure["lattice"]["matrix"], dtype=np.float64)
            sites = structure["sites"]
            pos = np.array([site["xyz"] for site in sites], dtype=np.float64).reshape(-1, 3)
            from ase.data import atomic_numbers as numbers_of

            z = np.array([numbers_of[site["species"][0]["element"]] for site in sites], dtype=np.int64)
        except (KeyError, IndexError, TypeError) as err:
            raise DataError(
                f"{_where(file, key)}: 'structure' is not a pymatgen Structure dict ({type(err).__name__}: {err})"
            ) from None
        return pos, z, lattice
    if structure is None or not hasattr(structure, "cart_coords"):
        raise DataError(f"{_where(file, key)}: the record holds no 'structure'; every record needs one")
    return (
        np.asarray(structure.cart_coords, dtype=np.float64),
        np.asarray(structure.atomic_numbers, dtype=np.int64),
        np.asarray(structure.lattice.matrix, dtype=np.float64),
    )


def _alexandria(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("structure",), file, key, "AlexandriaDataset")
    pos, z, cell = _structure_arrays(record["structure"], file, key)
    targets: dict[str, torch.Tensor] = {}
    for group in ("regression", "classification"):
        for name, value in ((record.get("targets") or {}).get(group) or {}).items():
            targets[name] = _scalar(value)
    if "energy_total" in targets:
        targets["energy"] = targets["energy_total"].clone()
    if record.get("force") is not None:
        targets["forces"] = _array(record["force"])
    if record.get("magmoms") is not None:
        targets["magmoms"] = _array(record["magmoms"])
    sample_id = str(record.get("entry_id") or f"{file.name}:{key}")
    return make_sample(pos, z, cell, True, targets, sample_id, file, key)


#: Summary-document fields of Materials Project records that are not targets.
MP_NOT_TARGETS = frozenset(
    {"structure", "symmetry", "fields_not_requested", "formula_pretty", "magmom", "material_id", "nsites",
     "nelements", "volume", "density", "density_atomic", "deprecated", "theoretical", "has_reconstructed"}
)  # fmt: skip


def _mp_targets(record: Mapping) -> dict[str, torch.Tensor]:
    skip = MP_NOT_TARGETS | set(record.get("fields_not_requested") or ())
    out = {}
    for name, value in record.items():
        if name in skip:
            continue
        if value is None or _is_number(value):
            out[name] = _scalar(value)
    return out


def _materials_project(record: dict, file: Path, key: int) -> dict[str, Any]:
    _need(record, ("structure",), file, key, "MaterialsProjectDataset")
    pos, z, cell = _structure_arrays(record["structure"], file, key)
    sample_id = str(record.get("material_id") or f"{file.name}:{key}")
    return make_sample(pos, z, cell, True, _mp_targets(record), sample_id, file, key)


# --------------------------------------------------------------------------- NOMAD


def _dig(record: Mapping, path: str, file: Path, key: int) -> Any:
    node: Any = record
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise DataError(f"{_where(file, key)}: NomadDataset record lacks {path!r} (at {part!r})")
        node = node[part]
    return node


def _nomad(record: dict, file: Path, key: int) -> dict[str, Any]:
    structure = _dig(record, "properties/structures/structure_original", file, key)
    from ase.data import atomic_numbers as numbers_of

    pos = _np(structure["cartesian_site_positions"]).reshape(-1, 3) * ANGSTROM_PER_METRE
    cell = _np(structure["lattice_vectors"]).reshape(3, 3) * ANGSTROM_PER_METRE
    try:
        z = [numbers_of[symbol] for symbol in structure["species_at_sites"]]
    except KeyError as err:
        raise DataError(f"{_where(file, key)}: unknown element symbol {err.args[0]!r} in species_at_sites") from None
    pbc = [bool(d) for d in structure.get("dimension_types", [1, 1, 1])]
    band = (record.get("properties") or {}).get("electronic", {}).get("band_structure_electronic")
    if isinstance(band, list):
        band = band[-1] if band else None
    energies = record.get("energies") or {}
    total = (energies.get("total") or {}).get("value")
    targets = {
        "energy_total": _scalar(None if total is None else total * EV_PER_JOULE),
        "efermi": _scalar(
            None if not band or band.get("energy_fermi") is None else band["energy_fermi"] * EV_PER_JOULE
        ),
        "relative_energy": _scalar(record.get("relative_energy")),
        "reference_energy": _scalar(record.get("reference_energy")),
    }
    gaps = (band or {}).get("band_gap") or []
    if gaps and isinstance(gaps[0], Mapping) and gaps[0].get("value") is not None:
        targets["band_gap"] = _scalar(gaps[0]["value"] * EV_PER_JOULE)
    material = record.get("material") or {}
    sample_id = str(material.get("material_id") or f"{file.name}:{key}")
    return make_sample(pos, z, cell, pbc, targets, sample_id, file, key)


# --------------------------------------------------------------------------- OCP (S2EF, IS2RE)


def _graph_fields(record: Any, file: Path, key: int, dataset: str) -> Mapping:
    from matsciml.datasets.upstream.safe_pickle import GraphRecord

    if isinstance(record, GraphRecord):
        return record.fields
    if isinstance(record, Mapping):
        return record
    raise DataError(f"{_where(file, key)}: {dataset} record is a {type(record).__name__}, not a graph or dict")


def _ocp(record: Any, file: Path, key: int, dataset: str, scalars: dict[str, str]) -> dict[str, Any]:
    fields = _graph_fields(record, file, key, dataset)
    _need(fields, ("pos", "atomic_numbers"), file, key, dataset)
    targets = {ours: _scalar(fields.get(theirs)) for ours, theirs in scalars.items() if theirs in fields}
    if fields.get("force") is not None:
        targets["forces"] = _array(fields["force"])
    cell = fields.get("cell")
    sid = fields.get("sid")
    sample_id = f"{file.name}:{key}" if sid is None else str(_np(sid, np.int64).reshape(-1)[0])
    return make_sample(
        _np(fields["pos"]), _np(fields["atomic_numbers"]).round().astype(np.int64),
        None if cell is None else _np(cell), True, targets, sample_id, file, key,
    )  # fmt: skip


def _s2ef(record: Any, file: Path, key: int) -> dict[str, Any]:
    return _ocp(record, file, key, "S2EFDataset", {"energy": "y"})


def _is2re(record: Any, file: Path, key: int) -> dict[str, Any]:
    return _ocp(record, file, key, "IS2REDataset", {"energy_init": "y_init", "energy_relaxed": "y_relaxed"})


# --------------------------------------------------------------------------- the table


def _has(*keys: str) -> Callable[[Any], bool]:
    return lambda record: isinstance(record, Mapping) and all(k in record for k in keys)


def _is_graph(*keys: str) -> Callable[[Any], bool]:
    def check(record: Any) -> bool:
        from matsciml.datasets.upstream.safe_pickle import GraphRecord

        return isinstance(record, GraphRecord) and all(k in record.fields for k in keys)

    return check


FORMATS: dict[str, UpstreamFormat] = {
    f.name: f
    for f in (
        UpstreamFormat(
            "OQMDDataset", _oqmd,
            ("energy", "band_gap", "stability", "delta_e", "formation_energy_per_atom", "energy_above_hull"),
            _has("cart_coords", "delta_e"),
        ),
        UpstreamFormat("LiPSDataset", _lips, ("energy", "forces"), _has("pos", "force", "energy", "cell")),
        UpstreamFormat("CMDataset", _carolina, ("energy",), _has("cart_coords", "_cell_length_a")),
        UpstreamFormat(
            "AlexandriaDataset", _alexandria,
            ("energy", "forces", "magmoms", "energy_total", "e_form", "e_above_hull", "band_gap_ind", "band_gap_dir",
             "dos_ef", "total_mag"),
            _has("structure", "targets"),
        ),
        UpstreamFormat(
            "MaterialsProjectDataset", _materials_project,
            ("band_gap", "energy_per_atom", "formation_energy_per_atom", "uncorrected_energy_per_atom",
             "energy_above_hull", "is_stable", "is_metal", "is_magnetic", "efermi"),
            _has("structure", "fields_not_requested"),
        ),
        UpstreamFormat(
            "NomadDataset", _nomad, ("relative_energy", "energy_total", "efermi", "reference_energy", "band_gap"),
            _has("properties", "energies", "material"),
        ),
        UpstreamFormat(
            "ColabFitDataset", _colabfit,
            ("energy", "potential-energy", "forces", "stress", "formation-energy", "free-energy", "band-gap",
             "adsorption"),
            _has("pos", "potential-energy"),
        ),
        UpstreamFormat("S2EFDataset", _s2ef, ("energy", "forces"), _is_graph("pos", "y", "force")),
        UpstreamFormat("IS2REDataset", _is2re, ("energy_init", "energy_relaxed"), _is_graph("pos", "y_relaxed")),
    )
}  # fmt: skip

#: Names the toolkit's users may give for a class (registered as aliases).
ALIASES: dict[str, tuple[str, ...]] = {
    "CMDataset": ("CarolinaDataset",),
    "NomadDataset": ("NOMADDataset",),
}


def detect(record: Any) -> UpstreamFormat | None:
    """The format whose layout ``record`` has (``None`` when none matches)."""
    for fmt in FORMATS.values():
        if fmt.detect(record):
            return fmt
    return None
