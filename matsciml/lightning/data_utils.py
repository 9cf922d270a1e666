"""The data modules at their upstream import path (``matsciml.lightning.data_utils``)."""

from __future__ import annotations

from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.multi_datamodule import MultiDataModule

__all__ = ["MatSciMLDataModule", "MultiDataModule"]
