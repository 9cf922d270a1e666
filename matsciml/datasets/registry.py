"""Dataset classes by name, as dataset configs name them (``dataset: StructureDataset``).

The names live in :mod:`matsciml.registry`; a new dataset class is one decorated class::

    from matsciml.registry import register_dataset

    @register_dataset
    class MyDataset(StructureDataset): ...

Example YAML (a dataset config)::

    dataset: EMTAlloyDataset
    target_keys: [energy_per_atom]
"""

from __future__ import annotations

from matsciml.datasets.structure_dataset import EMTAlloyDataset, StructureDataset
from matsciml.registry import lookup, names, register_dataset

__all__ = ["get_dataset_class", "register_dataset", "available_datasets"]

for _cls in (StructureDataset, EMTAlloyDataset):
    register_dataset(_cls)


def available_datasets() -> list[str]:
    """Sorted names of the registered dataset classes."""
    return names("dataset")


def get_dataset_class(name: str) -> type:
    """Return the dataset class registered as ``name``.

    Parameters
    ----------
    name
        A registered name (e.g. ``"StructureDataset"``), or a dotted import path
        (``"my_package.MyDataset"``).

    Raises
    ------
    ConfigError
        Unknown name; the message lists the closest registered names.
    """
    return lookup("dataset", name, "dataset")
