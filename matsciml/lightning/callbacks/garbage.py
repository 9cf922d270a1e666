"""Run Python's garbage collector at a fixed step interval."""

from __future__ import annotations

import gc
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.optimizer_step import OptimizerStepCallback

__all__ = ["GarbageCallback"]


class GarbageCallback(OptimizerStepCallback):
    """Call :func:`gc.collect` every ``frequency`` optimizer steps.

    Reference cycles (graphs of Python objects that refer to each other, e.g. through
    autograd hooks or cached structures) are only freed by the cyclic collector, whose
    automatic runs depend on allocation counts, not on memory held; a long run on big
    graphs can grow until one comes. Collecting at a fixed interval bounds that growth
    at a known cost (a full collection takes milliseconds to tens of milliseconds,
    depending on the number of live objects).

    Hooks it acts in:

    * ``on_train_batch_end``: collects when the optimizer step count (``trainer.global_step``)
      has just advanced to a multiple of ``frequency``: once per such step, also under
      gradient accumulation.

    The upstream callback acted in ``on_batch_end``, a hook Lightning 2 no longer
    calls, so it never collected; this one does.

    Parameters
    ----------
    frequency
        Optimizer steps between two collections, default ``100``.
    generation
        Oldest generation to collect (``0``, ``1`` or ``2``), default ``2`` (a full
        collection).

    Attributes
    ----------
    collections : int
        Collections done so far.

    Raises
    ------
    ConfigError
        ``frequency`` is not a positive integer or ``generation`` is not 0, 1 or 2
        (at construction).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.GarbageCallback
              init_args: {frequency: 200}
    """

    def __init__(self, frequency: int = 100, generation: int = 2) -> None:
        super().__init__()
        check_int(frequency, "frequency", "GarbageCallback", hint=" (optimizer steps)")
        if generation not in (0, 1, 2):
            raise ConfigError(f"GarbageCallback: generation={generation!r} must be 0, 1 or 2")
        self.frequency = frequency
        self.generation = generation
        self.collections = 0

    @override
    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, step: int
    ) -> None:
        if step % self.frequency == 0:
            gc.collect(self.generation)
            self.collections += 1
