"""Task modules (Lightning): what is predicted, the losses, the metrics, the optimiser.

=========================== ====================================================
:class:`BaseTaskModule`     shared constructor, hooks, optimiser, checkpointing
:class:`ScalarRegressionTask` one number per structure per target
:class:`BinaryClassificationTask` one yes/no label per structure per target
:class:`ForceRegressionTask` extensive energy, forces (and stress) by autograd
=========================== ====================================================

Callbacks rely only on the protocol in :mod:`matsciml.models.tasks.protocol`.
"""

from __future__ import annotations

from matsciml.common.errors import ConfigError, closest
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.binary import BinaryClassificationTask
from matsciml.models.tasks.forces import ForceRegressionTask
from matsciml.models.tasks.protocol import TaskProtocol, compute_loss, is_task
from matsciml.models.tasks.scalar import ScalarRegressionTask

__all__ = [
    "BaseTaskModule",
    "ScalarRegressionTask",
    "BinaryClassificationTask",
    "ForceRegressionTask",
    "TaskProtocol",
    "is_task",
    "compute_loss",
    "TASKS",
    "get_task_class",
]

#: Task classes by the name used in experiment YAMLs (``task: ScalarRegressionTask``).
TASKS: dict[str, type[BaseTaskModule]] = {
    "ScalarRegressionTask": ScalarRegressionTask,
    "BinaryClassificationTask": BinaryClassificationTask,
    "ForceRegressionTask": ForceRegressionTask,
}

#: Names of the older experiment form (``{scalar_regression: [energy]}``).
_ALIASES = {
    "scalar_regression": "ScalarRegressionTask",
    "binary_classification": "BinaryClassificationTask",
    "force_regression": "ForceRegressionTask",
}


def get_task_class(name: str, where: str = "") -> type[BaseTaskModule]:
    """The task class named ``name`` (class name, older snake-case name, or import path).

    Raises
    ------
    ConfigError
        Unknown name; the message lists the closest names.
    """
    at = f" ({where})" if where else ""
    key = _ALIASES.get(name, name)
    if key in TASKS:
        return TASKS[key]
    if "." in key:
        from matsciml.common.config import resolve_class

        cls = resolve_class(key, where)
        if isinstance(cls, type) and issubclass(cls, BaseTaskModule):
            return cls
        raise ConfigError(f"task {name!r}{at} is not a BaseTaskModule subclass")
    raise ConfigError(f"unknown task {name!r}{at}; {closest(name, [*TASKS, *_ALIASES])}")
