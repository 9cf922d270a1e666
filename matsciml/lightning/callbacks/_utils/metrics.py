"""Callbacks that consume a logged metric: check it exists, and which way is better.

A callback that reads a metric (early stopping, best checkpoint, best-metric tracking,
NaN checks) would otherwise wait forever for a name that is never logged (a typo such as
``val_los``, or ``val_energy`` when the task logs ``val_energy_mae``). With
:class:`MetricConsumer` it raises at the first point where it reads the metric (the end
of the first validation, not counting the sanity check) a
:class:`~matsciml.common.errors.ConfigError` that lists the metrics that were logged and
the closest names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

from matsciml.common.errors import ConfigError, closest

__all__ = [
    "check_metrics_logged",
    "infer_mode",
    "metric_value",
    "MetricConsumer",
    "MIN_WORDS",
    "MAX_WORDS",
    "improves",
    "is_fitting",
]

#: Name tokens of metrics where lower is better.
MIN_WORDS = frozenset({"loss", "mae", "mse", "rmse", "error", "err", "mape", "nll"})
#: Name tokens of metrics where higher is better.
MAX_WORDS = frozenset({"acc", "accuracy", "auc", "auroc", "r2", "f1", "precision", "recall"})


def infer_mode(metric: str, mode: str | None = None, owner: str = "callback") -> str:
    """``"min"`` or ``"max"``: ``mode`` when given, else from the words of ``metric``.

    The name is split at every character that is not a letter or digit
    (``val_energy_mae`` -> ``val``, ``energy``, ``mae``); a word in :data:`MIN_WORDS`
    (loss, mae, mse, rmse, error, ...) or ending in ``loss``/``error`` means ``"min"``, a
    word in :data:`MAX_WORDS` (acc, accuracy, auc, r2, ...) means ``"max"``.

    Parameters
    ----------
    metric
        The metric name.
    mode
        ``"min"``, ``"max"`` or ``None`` (infer).
    owner
        Name used in error messages (the consuming callback).

    Raises
    ------
    ConfigError
        ``mode`` is not ``min``/``max``/``None``; or the name says neither or both.
    """
    if mode is not None:
        if mode not in ("min", "max"):
            raise ConfigError(f"{owner}: mode={mode!r} must be 'min', 'max' or null (inferred from the metric name)")
        return mode
    words = [w for w in re.split(r"[^a-z0-9]+", metric.lower()) if w]
    lower = any(w in MIN_WORDS or w.endswith(("loss", "error")) for w in words)
    higher = any(w in MAX_WORDS for w in words)
    if lower and not higher:
        return "min"
    if higher and not lower:
        return "max"
    what = "both lower-is-better and higher-is-better words" if lower else "no word that tells"
    raise ConfigError(
        f"{owner}: cannot tell whether {metric!r} should go down or up ({what}: "
        f"min for {sorted(MIN_WORDS)}, max for {sorted(MAX_WORDS)}); give mode: min or mode: max"
    )


def check_metrics_logged(
    metrics: Mapping[str, Any], names: Iterable[str], owner: str, where: str = "the end of the first validation"
) -> None:
    """Raise when a name of ``names`` is not a key of ``metrics`` (e.g. ``trainer.callback_metrics``).

    Parameters
    ----------
    metrics
        The metrics available, ``{name: value}``.
    names
        The names the callback consumes.
    owner
        The consuming callback, for the message (``"MetricEarlyStopping(monitor='val_los')"``).
    where
        When the check happens, for the message.

    Raises
    ------
    ConfigError
        Names missing; the message lists the logged metrics and the closest names.
    """
    available = sorted(str(k) for k in metrics)
    missing = [n for n in names if n not in metrics]
    if not missing:
        return
    shown = ", ".join(repr(k) for k in available) if available else "none"
    hints = "; ".join(f"{n!r}: {closest(n, available)}" for n in missing) if available else ""
    raise ConfigError(
        f"{owner} consumes {', '.join(repr(n) for n in missing)}, never logged by {where}. "
        f"Logged metrics: {shown}. {hints + '. ' if hints else ''}"
        f"Log it with self.log(...) in the LightningModule, or fix the name."
    )


def metric_value(metrics: Mapping[str, Any], name: str) -> float:
    """``metrics[name]`` as a Python float (tensors are detached and moved to the CPU)."""
    value = metrics[name]
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class MetricConsumer:
    """Mixin of callbacks that read logged metrics.

    A subclass lists what it reads in :meth:`consumed_metrics` and calls
    :meth:`check_consumed_metrics` where it reads them; the first call checks (once, until it
    passes) that they are in ``trainer.callback_metrics`` and raises
    :class:`~matsciml.common.errors.ConfigError` otherwise. Callers skip the sanity check
    (``trainer.sanity_checking``), whose metrics are not kept.
    """

    _metrics_checked: bool = False

    def consumed_metrics(self) -> list[str]:
        """Names of the metrics this callback reads (override)."""
        return []

    def _consumer_name(self) -> str:
        names = ", ".join(repr(n) for n in self.consumed_metrics())
        return f"{type(self).__name__}({names})"

    def check_consumed_metrics(self, trainer: pl.Trainer, where: str = "the end of the first validation") -> None:
        """Check once that every consumed metric was logged (see the class docstring)."""
        if self._metrics_checked:
            return
        check_metrics_logged(trainer.callback_metrics, self.consumed_metrics(), self._consumer_name(), where)
        self._metrics_checked = True


def is_fitting(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` is fitting (not in the sanity check, not in a nested test)."""
    return getattr(trainer.state, "fn", None) == TrainerFn.FITTING and not trainer.sanity_checking


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0, min_delta_mode: str = "abs") -> bool:
    """Whether ``value`` improves on ``best`` by more than the threshold.

    ``delta = min_delta`` (``"abs"``) or ``min_delta * |best|`` (``"rel"``); for ``"min"``
    an improvement is ``value < best - delta``, for ``"max"`` ``value > best + delta``. A
    non-finite ``value`` never improves; anything finite improves on ``best=None``.
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    delta = min_delta if min_delta_mode == "abs" else min_delta * abs(best)
    return value < best - delta if mode == "min" else value > best + delta
