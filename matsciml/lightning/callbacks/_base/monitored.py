"""``MonitoredCallback``: callbacks that follow one logged metric and remember its best value.

Early stopping and best-metric tracking both read ``monitor`` at the end of validation,
compare it with the best value so far, and keep that best value and its step in
checkpoints. This base class holds what they share: the metric they consume (checked to
be logged, :class:`~matsciml.lightning.callbacks._utils.metrics.MetricConsumer`), their
checkpoint identity (``monitor`` and the subclass's fields) and the saved best value.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.lightning.callbacks._utils.metrics import MetricConsumer
from matsciml.lightning.callbacks._utils.state_key import StateKeyFields

__all__ = ["MonitoredCallback"]


class MonitoredCallback(StateKeyFields, MetricConsumer, Callback):
    """Base of callbacks that follow the logged metric ``monitor`` and its best value.

    A subclass sets :attr:`monitor` in its constructor (after ``super().__init__()``) and
    updates :attr:`best` and :attr:`best_step`; it extends :meth:`state_key_fields`,
    ``state_dict`` and ``load_state_dict`` with ``super()``.

    Hooks it acts in: ``state_dict`` / ``load_state_dict`` (``best``, ``best_step``).

    Example::

        class LogBest(MonitoredCallback):
            def __init__(self, monitor="val_loss"):
                super().__init__()
                self.monitor = monitor

            def on_validation_end(self, trainer, pl_module):
                self.check_consumed_metrics(trainer)
                value = metric_value(trainer.callback_metrics, self.monitor)
                if improves(value, self.best, "min"):
                    self.best, self.best_step = value, trainer.global_step
    """

    #: The logged metric followed.
    monitor: str

    def __init__(self) -> None:
        super().__init__()
        self.best: float | None = None
        self.best_step: int | None = None

    @override
    def consumed_metrics(self) -> list[str]:
        return [self.monitor]

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {"monitor": self.monitor}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")
