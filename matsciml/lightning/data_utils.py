"""The Open MatSciML Toolkit's import path of the data modules.

``from matsciml.lightning.data_utils import MatSciMLDataModule`` (the most frequent import
of the toolkit's examples) gives :class:`matsciml.lightning.MatSciMLDataModule`, and
``MultiDataModule`` gives :class:`matsciml.lightning.multi_datamodule.MultiDataModule`.
"""

from __future__ import annotations

from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.multi_datamodule import MultiDataModule

__all__ = ["MatSciMLDataModule", "MultiDataModule"]
