"""Lightning integration: the data module and the training callbacks."""

from __future__ import annotations

from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.loaders import ResumableDataLoader, ResumableSampler
from matsciml.lightning.multi_datamodule import MultiDataModule

__all__ = ["MatSciMLDataModule", "MultiDataModule", "ResumableDataLoader", "ResumableSampler"]
