"""Base of the callbacks that act once per optimizer step, not once per micro-batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.lightning.callbacks._utils.steps import OptimizerStepWatch

__all__ = ["OptimizerStepCallback"]


class OptimizerStepCallback(Callback):
    """Calls :meth:`on_optimizer_step_end` once per optimizer step.

    With ``accumulate_grad_batches > 1`` Lightning calls ``on_train_batch_end`` once per
    micro-batch; this base passes on only the calls after which ``trainer.global_step``
    has advanced.

    Hooks it acts in: ``on_train_start`` (the current step counts as seen, also after a
    resume; subclasses that override it call ``super().on_train_start``) and
    ``on_train_batch_end``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._steps = OptimizerStepWatch()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps.reset(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._steps.advanced(trainer):  # else: accumulating gradients, no optimizer step since the last call
            self.on_optimizer_step_end(trainer, pl_module, outputs, trainer.global_step)

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, step: int
    ) -> None:
        """Act after optimizer step number ``step`` (``trainer.global_step``); ``outputs`` of its last micro-batch."""
