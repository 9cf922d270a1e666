"""Stopping a run: on a plateau of a metric, at a fixed budget, or on a non-finite loss or metric.

==================================== ====================================================
:class:`MetricEarlyStopping`         no improvement of ``monitor`` for ``patience`` checks
:class:`FixedBudgetStopping`         a number of epochs, optimizer updates or samples
:class:`TerminateOnNaN`              a NaN/inf training loss or monitored metric
==================================== ====================================================

Each writes a checkpoint when it stops: ``<run>/checkpoints/stop-step<k>.ckpt`` for the
first two, ``<run>/checkpoints/error-TerminateOnNaN-step<k>.ckpt`` for the last (``k`` =
``trainer.global_step``, optimizer steps done), written atomically (temporary file, then
rename). Their state (best value, counters, whether they stopped) is saved in checkpoints
and restored on resume.

Stopping sets ``trainer.should_stop``; Lightning then ends ``fit`` after the current step
(or epoch, when set at epoch end), unless ``min_epochs``/``min_steps`` are not reached yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError, MatSciMLError
from matsciml.lightning.callbacks._base.monitored import MonitoredCallback
from matsciml.lightning.callbacks._base.periodic import IntervalType, PeriodicCallback, check_period
from matsciml.lightning.callbacks._utils.checkpoint_io import checkpoint_dir, save_checkpoint_atomic
from matsciml.lightning.callbacks._utils.metrics import MetricConsumer, improves, infer_mode, is_fitting, metric_value
from matsciml.models.tasks.protocol import loss_of

__all__ = [
    "MetricEarlyStopping",
    "FixedBudgetStopping",
    "TerminateOnNaN",
    "NonFiniteError",
    "improves",
    "stop_checkpoint_path",
]


class NonFiniteError(MatSciMLError, FloatingPointError):
    """A training loss or monitored metric became NaN or infinite (``TerminateOnNaN(raise_error=True)``)."""


def stop_checkpoint_path(trainer: pl.Trainer) -> Any:
    """``<run>/checkpoints/stop-step<global_step>.ckpt``."""
    return checkpoint_dir(trainer) / f"stop-step{trainer.global_step}.ckpt"


class MetricEarlyStopping(MonitoredCallback):
    """Stop when a logged metric has not improved for ``patience`` consecutive checks.

    A check happens at the end of every validation during ``fit`` (not the sanity check),
    or at the end of every training epoch with ``check_on_train_epoch_end=True`` (for
    training metrics; metrics logged in the module's own ``on_train_epoch_end`` are not
    seen then). A check improves when :func:`improves` says so; otherwise the wait count
    grows, and at ``patience`` the callback stops the run and writes
    ``<run>/checkpoints/stop-step<k>.ckpt``. Under several processes the ranks stop
    together when any rank decides to stop (log the metric with ``sync_dist=True`` so all
    see the same value).

    The first check raises when ``monitor`` was never logged (the message lists the logged
    metrics and the closest names).

    Hooks it acts in: ``on_validation_end`` or ``on_train_epoch_end`` (the check),
    ``state_dict`` / ``load_state_dict`` (best value and step, wait count, stop step).

    Example::

        callbacks:
          - kind: matsciml.lightning.callbacks.stopping.MetricEarlyStopping
            monitor: val_energy_mae
            patience: 10
            min_delta: 0.01
            min_delta_mode: rel

    Parameters
    ----------
    monitor
        Logged metric to watch, default ``"val_loss"``.
    patience
        Checks without improvement before stopping, default 3 (an integer >= 1).
    min_delta
        Smallest change that counts as an improvement, default 0 (``>= 0``).
    min_delta_mode
        ``"abs"`` (default): ``min_delta`` in the metric's units; ``"rel"``: a fraction of
        the best value so far (``0.01`` = 1 %).
    mode
        ``"min"``, ``"max"``, or ``None`` (default) to infer from the name: names with
        loss, mae, mse, rmse or error go down; acc, accuracy, auc or r2 go up.
    check_on_train_epoch_end
        Check at training epoch end instead of validation end (default ``False``).
    save_checkpoint
        Write the stop checkpoint (default ``True``).

    Raises
    ------
    ConfigError
        Bad arguments, or a mode that cannot be inferred (construction); ``monitor``
        never logged by the first check.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 3,
        min_delta: float = 0.0,
        min_delta_mode: Literal["abs", "rel"] = "abs",
        mode: Literal["min", "max"] | None = None,
        check_on_train_epoch_end: bool = False,
        save_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"{name}: monitor={monitor!r} must be the name of a logged metric")
        check_int(patience, "patience", name, hint=" (checks without improvement)")
        if not float(min_delta) >= 0.0:
            raise ConfigError(f"{name}: min_delta={min_delta!r} must be >= 0")
        if min_delta_mode not in ("abs", "rel"):
            raise ConfigError(f"{name}: min_delta_mode={min_delta_mode!r} must be 'abs' or 'rel'")
        self.monitor = monitor
        self.mode = infer_mode(monitor, mode, f"{name}(monitor={monitor!r})")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.min_delta_mode = min_delta_mode
        self.check_on_train_epoch_end = bool(check_on_train_epoch_end)
        self.save_checkpoint = bool(save_checkpoint)
        self.wait = 0
        self.num_checks = 0
        self.stopped_step: int | None = None
        self.reason: str | None = None

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "mode": self.mode}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "wait": self.wait,
            "num_checks": self.num_checks,
            "stopped_step": self.stopped_step,
            "patience": self.patience,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.wait = int(state_dict.get("wait", 0))
        self.num_checks = int(state_dict.get("num_checks", 0))
        self.stopped_step = state_dict.get("stopped_step")

    def _check(self, trainer: pl.Trainer, where: str) -> None:
        if not is_fitting(trainer):
            return
        self.check_consumed_metrics(trainer, where)
        value = metric_value(trainer.callback_metrics, self.monitor)
        self.num_checks += 1
        if improves(value, self.best, self.mode, self.min_delta, self.min_delta_mode):
            self.best, self.best_step, self.wait = value, int(trainer.global_step), 0
        else:
            self.wait += 1
        should_stop = trainer.strategy.reduce_boolean_decision(self.wait >= self.patience, all=False)
        if not should_stop or self.stopped_step is not None:
            if should_stop:
                trainer.should_stop = True
            return
        threshold = f"{self.min_delta:g}" + (" (relative)" if self.min_delta_mode == "rel" else "")
        self.reason = (
            f"{type(self).__name__}: {self.monitor} did not improve by more than {threshold} for {self.wait} "
            f"checks (best {self.best} at step {self.best_step}, now {value}); stopping at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch})"
        )
        _stop(trainer, self, self.reason, self.save_checkpoint)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.check_on_train_epoch_end:
            self._check(trainer, "the end of the first validation")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_on_train_epoch_end:
            self._check(trainer, "the end of the first training epoch")


def _stop(trainer: pl.Trainer, owner: Any, reason: str, save: bool) -> None:
    """Record the stop, write ``stop-step<k>.ckpt`` (collective) and set ``trainer.should_stop``."""
    owner.stopped_step = int(trainer.global_step)
    trainer.should_stop = True
    if save:
        path = save_checkpoint_atomic(trainer, stop_checkpoint_path(trainer))
        reason = f"{reason}; checkpoint {path}"
    owner.reason = reason
    rank_zero_info(reason)


class FixedBudgetStopping(PeriodicCallback):
    """Stop after a fixed number of epochs, optimizer updates or training samples.

    The count is that of :class:`~matsciml.lightning.callbacks._base.periodic.PeriodicCallback`
    (samples on all ranks together, epochs counted by the callback, updates =
    ``trainer.global_step``): the run stops after the batch (or epoch) at which the count
    reaches the budget, and ``<run>/checkpoints/stop-step<k>.ckpt`` is written. A run
    resumed after its budget was reached stops at once (before the first step).

    Hooks it acts in: those of ``PeriodicCallback``; ``on_train_start`` (budget already
    spent).

    Example::

        callbacks:
          - kind: matsciml.lightning.callbacks.stopping.FixedBudgetStopping
            max_samples: 1000000

    Parameters
    ----------
    max_epochs, max_updates, max_samples
        The budget; exactly one, an integer >= 1.
    save_checkpoint
        Write the stop checkpoint (default ``True``).
    on_error
        See :class:`~matsciml.lightning.callbacks._base.isolation.IsolatedCallback`.

    Raises
    ------
    ConfigError
        Not exactly one budget, or one that is not an integer >= 1.
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        max_updates: int | None = None,
        max_samples: int | None = None,
        save_checkpoint: bool = True,
        on_error: Literal["stop", "continue"] = "stop",
    ) -> None:
        check_period(type(self).__name__, max_epochs=max_epochs, max_updates=max_updates, max_samples=max_samples)
        super().__init__(
            every_n_epochs=max_epochs,
            every_n_updates=max_updates,
            every_n_samples=max_samples,
            on_error=on_error,
        )
        self.save_checkpoint = bool(save_checkpoint)
        self.stopped_step: int | None = None
        self.reason: str | None = None

    @property
    def budget(self) -> tuple[IntervalType, int]:
        """``("epochs" | "updates" | "samples", n)``."""
        return self.period

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped_step": self.stopped_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stopped_step = state_dict.get("stopped_step")

    def _spent(self, trainer: pl.Trainer) -> int:
        kind, _ = self.budget
        return {"epochs": self.epochs_done, "updates": int(trainer.global_step), "samples": self.samples_seen}[kind]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        kind, n = self.budget
        if self._spent(trainer) >= n:
            trainer.should_stop = True
            self.reason = (
                f"{type(self).__name__}: the budget of {n} {kind} was already spent ({self._spent(trainer)}) "
                f"when training started at step {trainer.global_step}; stopping"
            )
            rank_zero_info(self.reason)

    @override
    def periodic(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, interval_type: IntervalType, interval: int
    ) -> None:
        if self.stopped_step is not None:
            return
        _, n = self.budget
        reason = (
            f"{type(self).__name__}: budget of {n} {interval_type} reached ({interval}) at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}); stopping"
        )
        _stop(trainer, self, reason, self.save_checkpoint)


class TerminateOnNaN(MetricConsumer, Callback):
    """Stop, with an error checkpoint and a message, when the loss or a monitored metric is NaN or infinite.

    Checks the training loss (what ``training_step`` returned) after every training
    batch, and the ``monitor`` metrics at the end of every validation during ``fit`` (and
    at the end of every training epoch, those of them logged by then). On a non-finite
    value it writes ``<run>/checkpoints/error-TerminateOnNaN-step<k>.ckpt`` (for
    post-mortem: the weights *after* the step that produced it), and either stops the run
    (``trainer.should_stop``; the message, naming the metric, the step and the value, is
    issued as a warning and kept in :attr:`reason`) or raises :class:`NonFiniteError`.
    Under several processes the ranks decide together (any rank seeing a non-finite value
    stops all; one boolean all-reduce per step).

    Hooks it acts in: ``on_train_batch_end`` (loss), ``on_validation_end`` and
    ``on_train_epoch_end`` (metrics), ``state_dict`` / ``load_state_dict``.

    Example::

        callbacks:
          - kind: matsciml.lightning.callbacks.stopping.TerminateOnNaN
            monitor: [val_loss, val_energy_mae]

    Parameters
    ----------
    monitor
        Metric name or names to check (default ``None``: only the loss). Each must be
        logged by the end of the first validation.
    check_loss
        Check the training loss every batch (default ``True``).
    raise_error
        Raise :class:`NonFiniteError` instead of stopping quietly (default ``False``).
    save_checkpoint
        Write the error checkpoint (default ``True``).

    Raises
    ------
    ConfigError
        A monitored metric never logged by the first validation.
    NonFiniteError
        With ``raise_error=True``, on a non-finite value.
    """

    def __init__(
        self,
        monitor: str | Sequence[str] | None = None,
        check_loss: bool = True,
        raise_error: bool = False,
        save_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        names = [monitor] if isinstance(monitor, str) else list(monitor or [])
        if not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"TerminateOnNaN: monitor={monitor!r} must be a metric name or a list of names")
        self.monitor = names
        self.check_loss = bool(check_loss)
        self.raise_error = bool(raise_error)
        self.save_checkpoint = bool(save_checkpoint)
        self.stopped_step: int | None = None
        self.reason: str | None = None

    @override
    def consumed_metrics(self) -> list[str]:
        return list(self.monitor)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stopped_step": self.stopped_step, "reason": self.reason}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_step = state_dict.get("stopped_step")
        self.reason = state_dict.get("reason")

    def _terminate(self, trainer: pl.Trainer, what: str, value: float | None) -> None:
        step = int(trainer.global_step)
        shown = f"{value}" if value is not None else "non-finite on another rank"
        reason = (
            f"TerminateOnNaN: {what} is {shown} at step {step} (epoch {trainer.current_epoch}); "
            f"check the learning rate, the data (bad targets), or lower the loss scale"
        )
        self.stopped_step = step
        if self.save_checkpoint:
            path = save_checkpoint_atomic(trainer, checkpoint_dir(trainer) / f"error-TerminateOnNaN-step{step}.ckpt")
            reason += f"; error checkpoint {path}"
        self.reason = reason
        if self.raise_error:
            raise NonFiniteError(reason)
        trainer.should_stop = True
        rank_zero_warn(reason)

    def _decide(self, trainer: pl.Trainer, bad: bool) -> bool:
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.check_loss or self.stopped_step is not None:
            return
        loss = loss_of(outputs)
        value = float(loss.detach().float().cpu()) if loss is not None and loss.numel() == 1 else None
        bad = value is not None and not math.isfinite(value)
        if self._decide(trainer, bad):
            self._terminate(trainer, "the training loss", value if bad else None)

    def _check_metrics(self, trainer: pl.Trainer, names: list[str]) -> None:
        found = None
        for name in names:
            value = metric_value(trainer.callback_metrics, name)
            if not math.isfinite(value):
                found = (name, value)
                break
        if self._decide(trainer, found is not None):
            what, value = (f"metric {found[0]!r}", found[1]) if found else ("a monitored metric", None)
            self._terminate(trainer, what, value)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor or not is_fitting(trainer) or self.stopped_step is not None:
            return
        self.check_consumed_metrics(trainer)
        self._check_metrics(trainer, self.monitor)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor or not is_fitting(trainer) or self.stopped_step is not None:
            return
        self._check_metrics(trainer, [n for n in self.monitor if n in trainer.callback_metrics])
