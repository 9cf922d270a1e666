"""Dataset classes by name, as dataset configs name them (``dataset: StructureDataset``).

Example YAML (a dataset config)::

    dataset: EMTAlloyDataset
    target_keys: [energy_per_atom]
"""

from __future__ import annotations

from matsciml.common.errors import ConfigError, closest
from matsciml.datasets.structure_dataset import EMTAlloyDataset, StructureDataset

__all__ = ["DATASETS", "get_dataset_class", "register_dataset", "available_datasets"]

#: Class name -> dataset class.
DATASETS: dict[str, type] = {
    "StructureDataset": StructureDataset,
    "EMTAlloyDataset": EMTAlloyDataset,
}


def available_datasets() -> list[str]:
    """Sorted names of the registered dataset classes."""
    return sorted(DATASETS)


def register_dataset(cls: type, name: str | None = None) -> type:
    """Add ``cls`` to :data:`DATASETS` under ``name`` (default: its class name); usable as a decorator.

    Raises
    ------
    ConfigError
        ``name`` is already taken by another class.
    """
    key = name or cls.__name__
    if key in DATASETS and DATASETS[key] is not cls:
        raise ConfigError(f"dataset name {key!r} is already registered for {DATASETS[key].__qualname__}")
    DATASETS[key] = cls
    return cls


def get_dataset_class(name: str) -> type:
    """Return the dataset class registered as ``name``.

    Parameters
    ----------
    name
        A key of :data:`DATASETS` (e.g. ``"StructureDataset"``), or a dotted import path
        (``"my_package.MyDataset"``).

    Raises
    ------
    ConfigError
        Unknown name; the message lists the closest registered names.
    """
    if name in DATASETS:
        return DATASETS[name]
    if "." in name:
        from matsciml.common.config import resolve_class

        return resolve_class(name, "dataset")
    raise ConfigError(f"dataset {name!r} is not a known dataset class; {closest(name, DATASETS)}")
