"""The task classes at their upstream import path (``from matsciml.models.base import ...``).

The implementations live in :mod:`matsciml.models.tasks`, one module per task; this module
re-exports that package's public names (its ``__all__``).
"""

from __future__ import annotations

from matsciml.models import tasks as _tasks
from matsciml.models.tasks import *  # noqa: F403 - the public names of the tasks package, listed there once

__all__ = list(_tasks.__all__)
