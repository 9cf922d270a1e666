"""The Open MatSciML Toolkit's import path of the data modules.

``from matsciml.lightning.data_utils import MatSciMLDataModule`` (the most frequent import
of the toolkit's examples) gives :class:`matsciml.lightning.MatSciMLDataModule`.
``MultiDataModule`` is looked up where this package's multi-dataset module lives; when
there is none, importing it raises an ``ImportError`` that says what to use.
"""

from __future__ import annotations

import importlib
from typing import Any

from matsciml.lightning.datamodule import MatSciMLDataModule

__all__ = ["MatSciMLDataModule"]  # MultiDataModule: resolved on access (module __getattr__)

#: Modules that may define ``MultiDataModule``, tried in order.
_MULTI_MODULES = (
    "matsciml.lightning.multi_datamodule",
    "matsciml.lightning.multitask_datamodule",
    "matsciml.lightning.multi_data",
    "matsciml.lightning.datamodule",
    "matsciml.lightning",
)


def __getattr__(name: str) -> Any:
    if name == "MultiDataModule":
        for module in _MULTI_MODULES:
            try:
                found = getattr(importlib.import_module(module), "MultiDataModule", None)
            except ImportError:
                continue
            if found is not None:
                return found
        raise ImportError(
            "MultiDataModule is not available in this matsciml: train several datasets with the experiment runner "
            "(several datasets in the experiment YAML), or one MatSciMLDataModule per dataset "
            "(from matsciml.lightning import MatSciMLDataModule)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
