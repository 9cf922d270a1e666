"""The task classes at their upstream import path (``from matsciml.models.base import ...``).

The implementations live in :mod:`matsciml.models.tasks`, one module per task.
"""

from __future__ import annotations

from matsciml.models.tasks import (
    BaseTaskModule,
    BinaryClassificationTask,
    CrystalSymmetryClassificationTask,
    ForceRegressionTask,
    GradFreeForceRegressionTask,
    MultiTaskLitModule,
    ScalarRegressionTask,
)

__all__ = [
    "BaseTaskModule",
    "ScalarRegressionTask",
    "BinaryClassificationTask",
    "ForceRegressionTask",
    "GradFreeForceRegressionTask",
    "CrystalSymmetryClassificationTask",
    "MultiTaskLitModule",
]
