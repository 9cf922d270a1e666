"""Telling optimizer steps from micro-batches in ``on_train_batch_end``."""

from __future__ import annotations

from typing import Any

__all__ = ["OptimizerStepWatch"]


class OptimizerStepWatch:
    """Says whether ``trainer.global_step`` advanced since the last look.

    With ``accumulate_grad_batches > 1`` Lightning calls ``on_train_batch_end`` once per
    micro-batch but steps the optimizer once per window; callbacks that act per optimizer
    step ask :meth:`advanced` and do nothing when it is ``False``.
    """

    def __init__(self) -> None:
        self.last: int | None = None

    def reset(self, trainer: Any) -> None:
        """Take the current step as seen (call in ``on_train_start``; after a resume too)."""
        self.last = trainer.global_step

    def advanced(self, trainer: Any) -> bool:
        """``True`` once per new value of ``trainer.global_step``."""
        step = trainer.global_step
        if step == self.last:
            return False
        self.last = step
        return True
