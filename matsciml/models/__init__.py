"""Encoders, output heads, losses and task modules.

Encoders are importable from here under their upstream path
(``matsciml.models.PLEGNNBackbone``); tasks live in :mod:`matsciml.models.base`.
"""

from __future__ import annotations

from matsciml.models import tasks as _tasks
from matsciml.models.egnn import PLEGNNBackbone
from matsciml.models.embeddings import Embeddings
from matsciml.models.encoders import get_encoder_class
from matsciml.models.equivariant import E3NNEncoder, NequIPEncoder
from matsciml.models.heads import OutputHead
from matsciml.models.tasks import *  # noqa: F403 - the task classes and get_task_class, listed there once

#: Encoders whose modules load on first access (``matsciml.models.M3GNet``), as upstream names them.
_LAZY = {
    "M3GNet": "matsciml.models.matgl",
    "CHGNet": "matsciml.models.matgl",
    "MEGNet": "matsciml.models.matgl",
    "TensorNet": "matsciml.models.matgl",
    "MACEWrapper": "matsciml.models.pyg.mace",
    "FAENet": "matsciml.models.unavailable",
    "GalaPotential": "matsciml.models.unavailable",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'matsciml.models' has no attribute {name!r}")


__all__ = [
    "PLEGNNBackbone",
    "E3NNEncoder",
    "NequIPEncoder",
    "Embeddings",
    "get_encoder_class",
    "OutputHead",
    *_tasks.__all__,
    *_LAZY,
]
