"""Encoders, output heads, losses and task modules.

Encoders are importable from here under their upstream path
(``matsciml.models.PLEGNNBackbone``); tasks live in :mod:`matsciml.models.base`.
"""

from __future__ import annotations

from matsciml.models.egnn import PLEGNNBackbone
from matsciml.models.embeddings import Embeddings
from matsciml.models.encoders import get_encoder_class
from matsciml.models.equivariant import E3NNEncoder, NequIPEncoder
from matsciml.models.heads import OutputHead
from matsciml.models.tasks import (
    BaseTaskModule,
    BinaryClassificationTask,
    CrystalSymmetryClassificationTask,
    ForceRegressionTask,
    GradFreeForceRegressionTask,
    MultiTaskLitModule,
    ScalarRegressionTask,
    get_task_class,
)

__all__ = [
    "PLEGNNBackbone",
    "E3NNEncoder",
    "NequIPEncoder",
    "Embeddings",
    "get_encoder_class",
    "OutputHead",
    "get_task_class",
    "BaseTaskModule",
    "ScalarRegressionTask",
    "BinaryClassificationTask",
    "ForceRegressionTask",
    "GradFreeForceRegressionTask",
    "CrystalSymmetryClassificationTask",
    "MultiTaskLitModule",
]
