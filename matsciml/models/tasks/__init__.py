"""Task modules (Lightning): what is predicted, the losses, the metrics, the optimiser.

* :class:`BaseTaskModule`: shared constructor, hooks, optimiser, checkpointing
* :class:`ScalarRegressionTask`: one number per structure per target
* :class:`BinaryClassificationTask`: one yes/no label per structure per target
* :class:`ForceRegressionTask`: extensive energy, forces (and stress) by autograd
* :class:`GradFreeForceRegressionTask`: forces from a direct per-atom vector head
* :class:`CrystalSymmetryClassificationTask`: space group / crystal system classes
* :class:`MultiTaskLitModule`: one encoder, tasks on several datasets

Callbacks rely only on the protocol in :mod:`matsciml.models.tasks.protocol`.
"""

from __future__ import annotations

from matsciml.common.errors import ConfigError
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.binary import BinaryClassificationTask
from matsciml.models.tasks.forces import ForceRegressionTask
from matsciml.models.tasks.gradfree import GradFreeForceRegressionTask
from matsciml.models.tasks.multitask import MultiTaskLitModule
from matsciml.models.tasks.protocol import TaskProtocol, compute_loss, is_task
from matsciml.models.tasks.scalar import ScalarRegressionTask
from matsciml.models.tasks.symmetry import CrystalSymmetryClassificationTask
from matsciml.registry import lookup

__all__ = [
    "BaseTaskModule",
    "ScalarRegressionTask",
    "BinaryClassificationTask",
    "ForceRegressionTask",
    "GradFreeForceRegressionTask",
    "CrystalSymmetryClassificationTask",
    "MultiTaskLitModule",
    "TaskProtocol",
    "is_task",
    "compute_loss",
    "get_task_class",
]


def get_task_class(name: str, where: str = "") -> type[BaseTaskModule]:
    """The task class named ``name`` (registered name, older snake-case alias, or import path).

    Raises
    ------
    ConfigError
        Unknown name (the message lists the closest names), or not a task class.
    """
    cls = lookup("task", name, where)
    if not (isinstance(cls, type) and issubclass(cls, BaseTaskModule)):
        at = f" ({where})" if where else ""
        raise ConfigError(f"task {name!r}{at} is not a BaseTaskModule subclass")
    return cls
