"""``matsciml-convert SRC DST``: copy any readable dataset into this package's LMDB or extended XYZ.

Usage::

    matsciml-convert data/oqmd/devset oqmd.lmdb                      # detected as OQMDDataset
    matsciml-convert data/oqmd/devset oqmd.extxyz --dataset OQMDDataset
    python -m matsciml.datasets.convert SRC DST [--dataset NAME] [--overwrite] [--no-progress]

``SRC`` is anything :class:`~matsciml.datasets.StructureDataset` reads (extended XYZ,
ASE db/trajectory, pymatgen JSON, CIF, this package's LMDB) or an Open MatSciML Toolkit
LMDB folder; ``--dataset`` names the toolkit's class when the record layout alone does
not tell (``OQMDDataset``, ``LiPSDataset``, ...). Upstream records are read with the
restricted unpickler, so converting never runs code from the source.

``DST`` ends in ``.lmdb`` (this package's pickle-free format, see
:func:`~matsciml.datasets.readers.write_lmdb`) or ``.extxyz``: positions, cell and pbc
as the structure; ``forces`` and ``stress`` as the calculator's results (stress as its
Voigt 6-vector), with ``energy`` when forces are present (an energy without forces, such
as OQMD's formation energy per atom, is written to ``info``, which ASE's reader turns into
its calculator's energy again); other scalar targets in ``info``, other per-atom targets
as per-atom arrays. Missing labels are written as NaN. Both are written atomically (a
temporary file renamed onto ``DST`` when complete). Samples are written without
transforms, with the coordinates corrected as documented in
:mod:`matsciml.datasets.upstream.records`.

In Python: :func:`convert`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matsciml.common.atomic import atomic_path
from matsciml.common.cli import add_no_progress, command_parser, run_command
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets import schema

__all__ = ["convert", "sample_to_atoms", "write_extxyz", "main", "OUTPUT_FORMATS"]

#: Output extensions.
OUTPUT_FORMATS = (".lmdb", ".extxyz")
_CALC_SCALARS = ("energy", "free_energy")


def _progress(items: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True)


def sample_to_atoms(sample: dict[str, Any]) -> Any:
    """An ``ase.Atoms`` holding a sample's structure and targets (see the module docstring).

    Parameters
    ----------
    sample
        A sample as laid out in :mod:`matsciml.datasets.schema`.
    """
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    pos = np.asarray(sample[schema.POS], dtype=np.float64)
    cell = np.asarray(sample[schema.CELL], dtype=np.float64).reshape(3, 3)
    atoms = ase.Atoms(
        numbers=np.asarray(sample[schema.ATOMIC_NUMBERS]),
        positions=pos,
        cell=cell,
        pbc=np.asarray(sample[schema.PBC], dtype=bool),
    )
    natoms = len(atoms)
    calc: dict[str, Any] = {}
    atoms.info["id"] = str(sample.get(schema.ID, ""))
    targets = sample.get(schema.TARGETS) or {}
    # an energy is the calculator's (total) energy only beside forces; alone it may be a
    # per-atom or formation energy (OQMD, Carolina), kept in info under its name
    with_forces = "forces" in targets
    for key, value in targets.items():
        arr = np.asarray(value, dtype=np.float64)
        if key in _CALC_SCALARS and arr.ndim == 0 and with_forces:
            calc[key] = float(arr)
        elif key == "forces" and arr.shape == (natoms, 3):
            calc["forces"] = arr
        elif key == "stress" and arr.shape == (3, 3):
            calc["stress"] = full_3x3_to_voigt_6_stress(arr)
        elif arr.ndim == 0:
            atoms.info[key] = float(arr)
        elif arr.shape[0] == natoms:
            atoms.arrays[key] = arr
        else:
            atoms.info[key] = arr.reshape(-1)
    if calc:
        atoms.calc = SinglePointCalculator(atoms, **calc)
    return atoms


def write_extxyz(samples: Iterable[dict[str, Any]], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write samples to an extended XYZ file, atomically (see :func:`sample_to_atoms`).

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    import ase.io

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for sample in samples:
            ase.io.write(fh, sample_to_atoms(sample), format="extxyz")
    return path


def _open_source(src: Path, dataset: str | None) -> Any:
    from matsciml.datasets.structure_dataset import StructureDataset

    if dataset is None:
        return StructureDataset(src)
    from matsciml.datasets.upstream.records import FORMATS as UPSTREAM

    if dataset in UPSTREAM:
        return StructureDataset(src, format=f"upstream:{dataset}")
    from matsciml.datasets.registry import get_dataset_class

    return get_dataset_class(dataset)(src)


def _samples(source: Any, progress: bool, desc: str) -> Iterator[dict[str, Any]]:
    for i in _progress(range(len(source)), len(source), progress, desc):
        yield source.raw(i)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Copy every record of ``src`` into ``dst`` (``.lmdb`` or ``.extxyz``).

    Parameters
    ----------
    src
        A file or folder any reader accepts, an Open MatSciML Toolkit LMDB folder included.
    dst
        Output file ending in ``.lmdb`` or ``.extxyz``.
    dataset
        The toolkit's dataset class name (``"OQMDDataset"``) or a registered dataset class
        reading ``src`` (default ``None``: chosen from the path and, for toolkit LMDBs, from
        the first record's layout).
    overwrite
        Replace an existing ``dst`` (default ``False``).
    progress
        Show a progress bar on stderr (default ``True``).

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    ConfigError
        ``dst`` has another extension, or ``dataset`` is not a known name.
    DataError
        ``src`` is unreadable (the message names the file and record).
    FileExistsError
        ``dst`` exists and ``overwrite`` is false.
    """
    src, dst = Path(src), Path(dst)
    suffix = dst.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(
            f"DST {str(dst)!r}: the output must end in .lmdb or .extxyz; {closest(suffix, OUTPUT_FORMATS)}"
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    if not src.exists():
        raise DataError(f"SRC {str(src)!r}: no such file or folder; check the path")
    source = _open_source(src, dataset)
    samples = _samples(source, progress, f"{src.name} -> {dst.name}")
    if suffix == ".lmdb":
        from matsciml.datasets.readers.lmdb_format import write_lmdb

        return write_lmdb(samples, dst, overwrite=overwrite)
    return write_extxyz(samples, dst, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    parser = command_parser(
        "matsciml-convert",
        "Convert a dataset (any readable format, Open MatSciML Toolkit LMDB folders included) to this package's "
        "LMDB (.lmdb) or to extended XYZ (.extxyz).",
        {"src": "file or folder to read", "dst": "output file, ending in .lmdb or .extxyz"},
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the toolkit's dataset class of SRC (OQMDDataset, LiPSDataset, CMDataset, AlexandriaDataset, "
        "MaterialsProjectDataset, NomadDataset, ColabFitDataset, S2EFDataset, IS2REDataset) when the layout "
        "alone does not tell, or another registered dataset class",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    add_no_progress(parser, "--no-progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int | None:
    """Run the command line (``argv`` and the result as for :func:`~matsciml.common.cli.run_command`).

    Returns
    -------
    int or None
        0 on success (``None`` as a console script); errors end it with one line
        ``error: ...`` on stderr and status 2.
    """
    return run_command(build_parser(), argv, _convert, errors=(ConfigError, DataError, FileExistsError))


def _convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, dataset=args.dataset, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
