"""``StructureDataset``: one dataset class for every supported structure file format."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets import schema
from matsciml.datasets.readers.common import copy_sample
from matsciml.datasets.readers.formats import open_records
from matsciml.datasets.readers.lmdb_format import LMDBReader
from matsciml.datasets.validation import check_target_keys, invalid_target_records, validate_dataset

__all__ = ["StructureDataset", "EMTAlloyDataset", "ON_INVALID"]

#: Accepted values of ``on_invalid``.
ON_INVALID = ("error", "drop")

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def _build_transforms(transforms: Any) -> list[Transform]:
    if transforms is None:
        return []
    if callable(transforms) or isinstance(transforms, dict):
        transforms = [transforms]
    from matsciml.common.config import instantiate

    built = []
    for k, item in enumerate(transforms):
        obj = instantiate(item, f"transforms[{k}]") if isinstance(item, dict) else item
        if not callable(obj):
            raise ConfigError(f"transforms[{k}]: {obj!r} is not callable; a transform maps a sample dict to a sample")
        built.append(obj)
    return built


class StructureDataset(Dataset):
    """Structures and their labels read from a file or folder, as samples.

    The format is chosen from the path: ``.extxyz`` / ``.xyz`` (extended XYZ or plain XYZ,
    via ASE), ``.traj`` (ASE trajectory), ``.db`` (ASE database), ``.json`` (pymatgen
    ``Structure`` dicts; an ASE JSON database is recognised too), ``.cif`` (one CIF file),
    a folder of ``*.cif`` files (targets from ``targets.csv`` or ``id_prop.csv``), and
    ``.lmdb`` (this package's LMDB format, see
    :func:`~matsciml.datasets.readers.write_lmdb`, or an Open MatSciML Toolkit LMDB file
    or folder, read with a restricted unpickler: see :mod:`matsciml.datasets.upstream`).
    Files other than LMDB are read whole at construction; LMDB records are read on access,
    with the environment opened lazily in each process (safe with ``DataLoader`` workers).

    Each item is a sample as laid out in :mod:`matsciml.datasets.schema` (float32 ``pos``
    and ``cell``, int64 ``atomic_numbers``, bool ``pbc``, ``natoms``, ``id``, ``source``,
    ``targets``), passed through ``transforms`` in order. With a graph cache attached
    (:func:`~matsciml.datasets.cache.attach_graph_cache`; the data module does it by
    default), the output of the leading deterministic transforms is computed once per
    structure and reused; the transforms after them run on every access.

    Example YAML (dataset config)::

        dataset: StructureDataset
        experiment:
          train_path: data/train.extxyz
          val_split: 0.1
        target_keys: [energy, forces]

    Example::

        dataset = StructureDataset("oqmd.extxyz", target_keys=["band_gap"], on_invalid="drop")
        sample = dataset[0]          # sample["targets"]["band_gap"] is a 0-d float32 tensor

    Parameters
    ----------
    path
        File or folder to read; ``None`` (default): the class's :meth:`default_path`
        (:class:`EMTAlloyDataset`: the devset), which ``StructureDataset`` itself has not.
    transforms
        Callables ``sample -> sample`` applied in ``__getitem__`` (default ``None``). Items
        may also be ``class_path``/``init_args`` mappings, which are instantiated.
    target_keys
        Targets the model will train on (default ``None``). When given, the data are
        validated at construction (:func:`~matsciml.datasets.validation.validate_dataset`)
        and every record must carry these targets as finite values.
    on_invalid
        ``"error"`` (default): a record with a missing or non-finite requested target
        raises :class:`~matsciml.common.errors.DataError`. ``"drop"``: such records are
        left out, with a warning saying how many and which. Other problems (zero atoms,
        unknown elements, atoms closer than 0.1 Å) always raise.
    cache
        Keep decoded samples in memory after the first read (default ``True``). Files read
        whole are always held in memory, so this only changes LMDB datasets, where
        ``False`` suits data larger than memory (with ``target_keys``, the validation
        pass at construction reads every record and so fills the cache).
    format
        Force a reader (``"extxyz"``, ``"xyz"``, ``"traj"``, ``"db"``, ``"json"``,
        ``"cif"``, ``"cif_folder"``, ``"lmdb"``, ``"upstream"`` or
        ``"upstream:<toolkit class name>"``) instead of choosing by extension
        (default ``None``).

    Raises
    ------
    DataError
        The path does not exist or has an unsupported extension, a file is unreadable or
        truncated, or (with ``target_keys``) a record fails validation. The message names
        the file, the record index and id, the key, and a fix.
    ConfigError
        No ``path`` and no default, ``on_invalid`` or ``format`` is not a valid value, or
        a transform is not callable.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        transforms: Sequence[Transform] | None = None,
        target_keys: Sequence[str] | None = None,
        on_invalid: str = "error",
        cache: bool = True,
        format: str | None = None,
    ) -> None:
        super().__init__()
        path = self.default_path() if path is None else path
        if path is None:
            raise ConfigError(f"{type(self).__name__}: no path given; pass the file or folder to read (path=...)")
        if on_invalid not in ON_INVALID:
            raise ConfigError(f"on_invalid={on_invalid!r} is not valid; {closest(str(on_invalid), ON_INVALID)}")
        if isinstance(target_keys, str):
            target_keys = [target_keys]
        self.path = Path(path)
        self.transforms = _build_transforms(transforms)
        # the toolkit's names are accepted (``force`` is ``forces``, see schema.TARGET_ALIASES)
        self.target_keys: list[str] | None = schema.canonical_targets(target_keys)
        self.on_invalid = on_invalid
        self.cache = cache
        self._records = open_records(self.path, format)
        self._lazy = isinstance(self._records, LMDBReader) or bool(getattr(self._records, "lazy", False))
        self._cached: dict[int, dict[str, Any]] = {}
        self._indices: list[int] | None = None
        self.dropped: dict[int, str] = {}
        #: A :class:`~matsciml.datasets.cache.GraphCache` of the deterministic transforms' output, or ``None``.
        self.graph_cache: Any = None
        if self._lazy:
            self._available = sorted(self._records.target_keys)
        else:
            keys: set[str] = set()
            for sample in self._records:
                keys.update(sample["targets"])
            self._available = sorted(keys)
        if self.target_keys:
            check_target_keys(self._available, self.target_keys, str(self.path))
            if on_invalid == "drop":
                self._drop_invalid()
            validate_dataset(self, self.target_keys)

    @classmethod
    def default_path(cls) -> Path | None:
        """The data read when no ``path`` is given (``None``: a path is required)."""
        return None

    def _drop_invalid(self) -> None:
        bad = invalid_target_records(self, self.target_keys or [])
        if not bad:
            return
        self.dropped = {self._record_index(i): reason for i, reason in bad.items()}
        self._indices = [i for i in range(len(self._records)) if i not in bad]
        if not self._indices:
            raise DataError(
                f"{self.path}: on_invalid='drop' left no records: every record lacks a finite value of one of "
                f"{self.target_keys}; first problem: record {next(iter(self.dropped))}: {next(iter(bad.values()))}"
            )
        shown = sorted(self.dropped)[:10]
        more = "" if len(bad) <= 10 else f", ... ({len(bad)} in all)"
        warnings.warn(
            f"{self.path}: dropped {len(bad)} of {len(self._records)} records with a missing or non-finite target "
            f"among {self.target_keys} (on_invalid='drop'); record indices {shown}{more}",
            stacklevel=3,
        )

    def _record_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.path}: index {index} out of range for {n} records")
        return index if self._indices is None else self._indices[index]

    @property
    def available_targets(self) -> list[str]:
        """Every target key found in the data (sorted; for LMDB, the keys its metadata lists)."""
        return list(self._available)

    def __len__(self) -> int:
        return len(self._records) if self._indices is None else len(self._indices)

    def raw(self, index: int) -> dict[str, Any]:
        """Return sample ``index`` without transforms (a fresh copy, safe to modify)."""
        record = self._record_index(index)
        if not self._lazy:
            return copy_sample(self._records[record])
        if record in self._cached:
            return copy_sample(self._cached[record])
        sample = self._records[record]
        if self.cache:
            self._cached[record] = sample
            return copy_sample(sample)
        return sample

    @staticmethod
    def apply_transforms(sample: dict[str, Any], transforms: Sequence[Transform]) -> dict[str, Any]:
        """Pass ``sample`` through ``transforms`` in order and return the result."""
        for transform in transforms:
            out = transform(sample)
            if out is None:
                raise TypeError(f"transform {transform!r} returned None; a transform must return the sample")
            sample = out
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.graph_cache is not None:
            return self.graph_cache.item(self, index)
        return self.apply_transforms(self.raw(index), self.transforms)

    def __getitems__(self, indices: Sequence[int]) -> Sequence[dict[str, Any]]:
        """The samples ``indices`` (what a ``DataLoader`` asks for one batch).

        When the graph cache holds them as columns (:meth:`GraphCache.prepare_columns
        <matsciml.datasets.cache.GraphCache.prepare_columns>`), a
        :class:`~matsciml.datasets.columns.RecordBatch` that
        :func:`~matsciml.datasets.collate.collate_samples` gathers in a few tensor calls;
        otherwise the list of samples.
        """
        n = len(self)
        indices = [i + n if i < 0 else i for i in indices]
        cache = self.graph_cache
        if cache is not None and type(self).__getitem__ is StructureDataset.__getitem__:
            found = cache.batch_columns(indices)
            if found is not None:
                from matsciml.datasets.columns import RecordBatch

                return RecordBatch(self, indices, *found)
        return [self[i] for i in indices]

    @classmethod
    def from_devset(cls, transforms: Sequence[Transform] | None = None, **kwargs: Any) -> StructureDataset:
        """The embedded EMT alloy devset (see :mod:`matsciml.datasets.devset`), generated on first use.

        Parameters
        ----------
        transforms
            As for the constructor.
        **kwargs
            Constructor arguments (``target_keys``, ``on_invalid``, ...), plus ``n``: the
            number of structures (default: the full devset, 1200).
        """
        from matsciml.datasets.devset import DEVSET_SIZE, devset_path

        n = kwargs.pop("n", None) or DEVSET_SIZE
        kwargs.pop("path", None)
        return cls(devset_path(n=n), transforms=transforms, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, records={len(self)}, "
            f"targets={self._available}, transforms={len(self.transforms)})"
        )


class EMTAlloyDataset(StructureDataset):
    """:class:`StructureDataset` whose default ``path`` is the embedded EMT alloy devset.

    See :mod:`matsciml.datasets.devset` for its content (energies, forces, stresses,
    mixing energies and a ``stable`` label for random fcc alloys of Al, Cu, Ag, Au, Ni,
    Pd and Pt).

    Example YAML::

        dataset: EMTAlloyDataset
        target_keys: [energy_per_atom]

    ``path`` and the other arguments are those of :class:`StructureDataset`; without
    ``path`` the devset is read (generated and cached on first use).
    """

    @classmethod
    def default_path(cls) -> Path:
        """The devset (:func:`~matsciml.datasets.devset.devset_path`)."""
        from matsciml.datasets.devset import devset_path

        return devset_path()
