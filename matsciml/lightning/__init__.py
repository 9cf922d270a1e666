"""Lightning integration: the data module and the training callbacks."""

from __future__ import annotations

from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.loaders import ResumableDataLoader, ResumableSampler

__all__ = ["MatSciMLDataModule", "ResumableDataLoader", "ResumableSampler"]
