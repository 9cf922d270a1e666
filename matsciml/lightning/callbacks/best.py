"""The best model by a metric: top-k checkpoints, and other metrics recorded at the best validation point.

* :class:`BestCheckpoint`: Lightning's ``ModelCheckpoint`` (top-k, ``best_model_path``,
  ``ckpt_path="best"``, resume) with the mode inferred from the metric name, the
  never-logged-metric check, and atomic writes.
* :class:`BestMetricTracker`: whenever the monitored metric improves, evaluates a dataset
  (the test set by default) and records, e.g., ``test_loss_at_best_val``: the test loss
  of the model that was best on validation, without a separate test run per checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal
from weakref import proxy

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.monitored import MonitoredCallback
from matsciml.lightning.callbacks._utils.checkpoint_io import save_checkpoint_atomic
from matsciml.lightning.callbacks._utils.inference import all_gather_objects, run_inference
from matsciml.lightning.callbacks._utils.metrics import (
    MetricConsumer,
    check_metrics_logged,
    improves,
    infer_mode,
    is_fitting,
    metric_value,
)
from matsciml.lightning.callbacks._utils.reporting import log_scalars

__all__ = ["BestCheckpoint", "BestMetricTracker", "batch_metric_sums"]


class BestCheckpoint(MetricConsumer, ModelCheckpoint):
    """Keep the ``save_top_k`` best checkpoints by a logged metric.

    A :class:`lightning.pytorch.callbacks.ModelCheckpoint` (so ``trainer.checkpoint_callback``,
    ``best_model_path``, ``best_k_models``, ``trainer.test(ckpt_path="best")`` and resuming
    work as usual; Lightning runs it after the other callbacks) with:

    * ``mode`` inferred from the metric name when not given (loss/mae/mse/rmse/error:
      ``min``; acc/accuracy/auc/r2: ``max``);
    * a :class:`~matsciml.common.errors.ConfigError` at the end of the first validation
      when ``monitor`` was never logged, listing the logged metrics and the closest names;
    * every file written atomically (temporary file beside it, then ``os.replace``), so a
      job killed while saving never leaves a truncated "best" checkpoint;
    * default file names ``best-epoch=<e>-step=<s>-<monitor>=<value>.ckpt`` in
      ``<run>/checkpoints`` (Lightning's default folder).

    Hooks it acts in: those of ``ModelCheckpoint``; ``on_validation_end`` also runs the
    metric check. (Without any validation, Lightning's own check applies: a warning when
    ``monitor`` is missing at a save.)

    Example::

        callbacks:
          - kind: matsciml.lightning.callbacks.best.BestCheckpoint
            monitor: val_energy_mae
            save_top_k: 3
            save_last: true

    Parameters
    ----------
    monitor
        Metric to rank checkpoints by (default ``"val_loss"``).
    mode
        ``"min"``, ``"max"`` or ``None`` (default: from the name).
    filename
        As in ``ModelCheckpoint``; ``None`` (default) gives the name above.
    **kwargs
        The other ``ModelCheckpoint`` arguments, with its defaults: ``save_top_k``
        (checkpoints kept, default 1; ``-1`` keeps all), ``dirpath``, ``save_last``,
        ``every_n_epochs``, ``every_n_train_steps``, ``save_on_train_epoch_end``,
        ``verbose``, ...

    Raises
    ------
    ConfigError
        No ``monitor``; a mode that cannot be inferred; ``monitor`` never logged.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: Literal["min", "max"] | None = None,
        *,
        filename: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"BestCheckpoint: monitor={monitor!r} must name a logged metric (e.g. 'val_loss')")
        mode = infer_mode(monitor, mode, f"BestCheckpoint(monitor={monitor!r})")
        if filename is None:
            filename = "best-{epoch}-{step}-{" + monitor + ":.6g}"
        super().__init__(filename=filename, monitor=monitor, mode=mode, **kwargs)

    @override
    def consumed_metrics(self) -> list[str]:
        return [self.monitor] if self.monitor else []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_fitting(trainer):
            self.check_consumed_metrics(trainer)
        super().on_validation_end(trainer, pl_module)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        save_checkpoint_atomic(trainer, filepath, weights_only=self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


# ---------------------------------------------------------------------------- tracker
def _finite_abs_error(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    pred = pred.detach().reshape(-1).double()
    target = target.detach().reshape(-1).to(pred)
    keep = torch.isfinite(pred) & torch.isfinite(target)
    return float((pred[keep] - target[keep]).abs().sum()), float(keep.sum())


def batch_metric_sums(pl_module: Any, batch: Any, prefix: str) -> dict[str, tuple[float, float]]:
    """``{name: (weighted sum, weight)}`` of one batch, from the task protocol's ``compute_losses``.

    Names (as the tasks log them, with ``prefix`` for the split):

    * ``<prefix>_loss`` and ``<prefix>_total``: the total loss weighted by the batch size;
    * ``<prefix>_<key>``: the loss of each task key weighted by its target count;
    * ``<prefix>_<key>_mae``: mean absolute error in data units over every finite element,
      when the batch has ``targets[key]`` of the prediction's size.

    Raises
    ------
    ConfigError
        The module has no ``compute_losses``.
    """
    compute = getattr(pl_module, "compute_losses", None)
    if not callable(compute):
        raise ConfigError(
            f"BestMetricTracker evaluates with compute_losses(batch) (the task protocol, "
            f"matsciml.models.tasks.protocol); {type(pl_module).__name__} has none. Override "
            f"BestMetricTracker.evaluate_batch for this module."
        )
    result = compute(batch)
    size = float(result.get("batch_size", 1) or 1)
    loss = float(result["loss"].detach())
    sums: dict[str, tuple[float, float]] = {
        f"{prefix}_loss": (loss * size, size),
        f"{prefix}_total": (loss * size, size),
    }
    counts = result.get("counts", {}) or {}
    for key, value in (result.get("per_key") or {}).items():
        count = float(counts.get(key, size))
        if count:
            sums[f"{prefix}_{key}"] = (float(value.detach()) * count, count)
    targets = batch.get("targets") if isinstance(batch, Mapping) else None
    for key, pred in (result.get("predictions") or {}).items():
        if isinstance(targets, Mapping) and isinstance(targets.get(key), torch.Tensor):
            target = targets[key]
            if target.numel() == pred.numel():
                total, n = _finite_abs_error(pred, target)
                if n:
                    sums[f"{prefix}_{key}_mae"] = (total, n)
    return sums


class BestMetricTracker(MonitoredCallback):
    """Record metrics of another dataset at the best value of a monitored metric.

    ``BestMetricTracker(monitor="val_loss", track=["test_loss"])`` logs
    ``test_loss_at_best_val``: the test loss of the weights that had the best validation
    loss so far. At the end of every validation during ``fit`` the callback reads
    ``monitor``; when it improves (as in :func:`~matsciml.lightning.callbacks._utils.metrics.improves`),
    it evaluates ``dataset`` (a key of the data module's ``datasets``, default ``"test"``)
    right away and records the tracked metrics. Evaluating only at improvements costs a
    test pass per new best, never one per epoch, and needs no checkpoint to be reloaded.

    The evaluation uses :func:`batch_metric_sums` (the task protocol's ``compute_losses``;
    names as the tasks log them: ``test_loss``, ``test_<key>``, ``test_<key>_mae``), means
    over the whole dataset weighted like the tasks' own metrics, in evaluation mode,
    without gradients, and with the EMA weights when the EMA callback is on (the weights
    validation used). Under several processes the dataset is split over the ranks without
    duplicates and the sums are gathered; all ranks get the same values. For other
    modules or metrics, override :meth:`evaluate_batch`.

    Results: :attr:`values` (``{"test_loss_at_best_val": ...}``), :attr:`best`,
    :attr:`best_step`, :attr:`best_epoch`; the values are sent to the loggers (step =
    ``trainer.global_step``) at each improvement and saved in checkpoints.

    Hooks it acts in: ``on_validation_end``; ``state_dict`` / ``load_state_dict``.

    Example::

        callbacks:
          - kind: matsciml.lightning.callbacks.best.BestMetricTracker
            monitor: val_energy_mae
            track: [test_energy_mae, test_forces_mae]

    Parameters
    ----------
    monitor
        Metric that defines "best" (default ``"val_loss"``).
    track
        Metric names computed on ``dataset`` to record (default ``["test_loss"]``).
    mode
        ``"min"``, ``"max"`` or ``None`` (default: from the name of ``monitor``).
    min_delta
        Smallest improvement that counts (absolute, default 0).
    dataset
        Dataset evaluated at each improvement (default ``"test"``).
    batch_size
        Batch size of that evaluation; ``None`` uses the data module's.
    use_ema
        Evaluate with the EMA weights when the EMA callback is on (default ``True``).
    name_format
        Logged name, with ``{tracked}``, ``{monitor}`` and ``{stage}`` (the part of
        ``monitor`` before the first ``_``); default ``"{tracked}_at_best_{stage}"``.

    Raises
    ------
    ConfigError
        Bad arguments (construction); ``monitor`` never logged by the end of the first
        validation; a tracked name the evaluation does not produce (with the closest
        names); no dataset of that name; a module without ``compute_losses``.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        track: str | Sequence[str] = ("test_loss",),
        mode: Literal["min", "max"] | None = None,
        min_delta: float = 0.0,
        dataset: str = "test",
        batch_size: int | None = None,
        use_ema: bool = True,
        name_format: str = "{tracked}_at_best_{stage}",
    ) -> None:
        super().__init__()
        tracked = [track] if isinstance(track, str) else list(track)
        if not tracked or not all(isinstance(t, str) and t for t in tracked):
            raise ConfigError(f"BestMetricTracker: track={track!r} must be a metric name or a non-empty list of names")
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f"BestMetricTracker: monitor={monitor!r} must name a logged metric")
        if not float(min_delta) >= 0:
            raise ConfigError(f"BestMetricTracker: min_delta={min_delta!r} must be >= 0")
        try:
            name_format.format(tracked="t", monitor="m", stage="s")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"BestMetricTracker: name_format={name_format!r} may use only {{tracked}}, {{monitor}}, {{stage}} "
                f"({err})"
            ) from None
        self.monitor = monitor
        self.track = tracked
        self.mode = infer_mode(monitor, mode, f"BestMetricTracker(monitor={monitor!r})")
        self.min_delta = float(min_delta)
        self.dataset = dataset
        self.batch_size = batch_size
        self.use_ema = bool(use_ema)
        self.name_format = name_format
        self.best_epoch: int | None = None
        self.values: dict[str, float] = {}

    def logged_name(self, tracked: str) -> str:
        """The name under which ``tracked`` is logged (``test_loss`` -> ``test_loss_at_best_val``)."""
        stage = self.monitor.split("_", 1)[0]
        return self.name_format.format(tracked=tracked, monitor=self.monitor, stage=stage)

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "track": self.track, "dataset": self.dataset}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_epoch": self.best_epoch, "values": dict(self.values)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch")
        self.values = {str(k): float(v) for k, v in (state_dict.get("values") or {}).items()}

    # ------------------------------------------------------------------ evaluation
    def evaluate_batch(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, tuple[float, float]]:
        """``{metric name: (weighted sum, weight)}`` of one batch (default :func:`batch_metric_sums`)."""
        return batch_metric_sums(pl_module, batch, self.dataset)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Means over ``dataset`` of every metric :meth:`evaluate_batch` gives (collective: all ranks call it)."""
        records, _ = run_inference(
            trainer,
            pl_module,
            self.dataset,
            lambda batch, batch_idx: self.evaluate_batch(pl_module, batch),
            self.batch_size,
            pad=False,
            use_ema=self.use_ema,
            owner="BestMetricTracker",
        )
        local: dict[str, list[float]] = {}
        for _, sums in records:
            for name, (total, weight) in sums.items():
                acc = local.setdefault(name, [0.0, 0.0])
                acc[0] += float(total)
                acc[1] += float(weight)
        merged: dict[str, list[float]] = {}
        for part in all_gather_objects(trainer, local):
            for name, (total, weight) in part.items():
                acc = merged.setdefault(name, [0.0, 0.0])
                acc[0] += total
                acc[1] += weight
        return {name: total / weight for name, (total, weight) in merged.items() if weight}

    # ------------------------------------------------------------------ hook
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_fitting(trainer):
            return
        self.check_consumed_metrics(trainer)
        value = metric_value(trainer.callback_metrics, self.monitor)
        improved = improves(value, self.best, self.mode, self.min_delta)
        if trainer.world_size > 1:
            improved = bool(trainer.strategy.broadcast(improved, src=0))
        if not improved:
            return
        metrics = self.evaluate(trainer, pl_module)
        check_metrics_logged(
            metrics, self.track, f"BestMetricTracker(track={self.track!r})", f"the evaluation of {self.dataset!r}"
        )
        self.best, self.best_step, self.best_epoch = value, int(trainer.global_step), int(trainer.current_epoch)
        self.values = {self.logged_name(t): float(metrics[t]) for t in self.track}
        log_scalars(trainer, self.values)
