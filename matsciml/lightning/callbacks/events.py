"""Custom events for callbacks: see :mod:`matsciml.common.events`.

The implementation lives in :mod:`matsciml.common` so that task modules can fire events
without importing the callback package.
"""

from __future__ import annotations

from matsciml.common.events import *  # noqa: F403
from matsciml.common.events import __all__  # noqa: F401
