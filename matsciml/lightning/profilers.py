"""A profiler that does nothing, for nothing: the runner's default when the trainer config names none.

Lightning wraps every hook call -- each callback's, each of the module's, each of the
strategy's, about two hundred per training step with a dozen callbacks -- in
``trainer.profiler.profile(name)``. Without a profiler it uses
:class:`~lightning.pytorch.profilers.PassThroughProfiler`, whose ``profile`` is a
generator-based context manager that records nothing yet costs half of the dispatch of a
hook that does nothing (about 0.3 ms per step on a 2-core CPU machine). :class:`NullProfiler`
records nothing either, and returns one shared ``contextlib.nullcontext``.

The experiment runner passes it unless the trainer config sets ``profiler`` (``simple``,
``advanced``, ``pytorch`` or a class) or ``barebones``. In Python::

    trainer = pl.Trainer(profiler=NullProfiler(), ...)
"""

from __future__ import annotations

import contextlib
from typing import Any

from lightning.pytorch.profilers import PassThroughProfiler
from typing_extensions import override

__all__ = ["NullProfiler"]

_NULL = contextlib.nullcontext()


class NullProfiler(PassThroughProfiler):
    """:class:`~lightning.pytorch.profilers.PassThroughProfiler` whose ``profile`` is a shared no-op context."""

    @override
    def profile(self, action_name: str) -> Any:
        """A context that does nothing (the same object at every call)."""
        return _NULL
