"""Optimizer steps: telling them from micro-batches, and how often to log."""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "OptimizerStepWatch", "log_every_n_steps"]

#: Logging cadence when neither the callback nor the trainer sets one (Lightning's default).
DEFAULT_LOG_EVERY_N_STEPS = 50


def log_every_n_steps(trainer: Any, every_n_steps: int | None = None) -> int:
    """How many optimizer steps lie between two logged values.

    ``every_n_steps`` when given, else ``trainer.log_every_n_steps``, else
    :data:`DEFAULT_LOG_EVERY_N_STEPS`; never below 1.
    """
    if every_n_steps is not None:
        return max(1, int(every_n_steps))
    return max(1, int(getattr(trainer, "log_every_n_steps", None) or DEFAULT_LOG_EVERY_N_STEPS))


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
