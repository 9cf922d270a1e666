"""Structure data: readers, the embedded devset, transforms to periodic graphs, collate."""

from __future__ import annotations

from matsciml.datasets.readers.lmdb_format import write_lmdb
from matsciml.datasets.registry import get_dataset_class
from matsciml.datasets.structure_dataset import EMTAlloyDataset, StructureDataset
from matsciml.datasets.upstream.classes import (
    AlexandriaDataset,
    CMDataset,
    ColabFitDataset,
    IS2REDataset,
    LiPSDataset,
    MaterialsProjectDataset,
    NomadDataset,
    OQMDDataset,
    S2EFDataset,
)
from matsciml.datasets.validation import validate_dataset

__all__ = [
    "StructureDataset",
    "EMTAlloyDataset",
    "write_lmdb",
    "validate_dataset",
    "get_dataset_class",
    "OQMDDataset",
    "LiPSDataset",
    "CMDataset",
    "AlexandriaDataset",
    "MaterialsProjectDataset",
    "NomadDataset",
    "ColabFitDataset",
    "S2EFDataset",
    "IS2REDataset",
]
