"""Detect training-loss spikes against a running median and median absolute deviation."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.grads import id_source, ids_of
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars
from matsciml.lightning.callbacks._utils.steps import log_every_n_steps

__all__ = ["LossSpikeDetection", "is_spike", "find_spikes"]

_DIRECTIONS = ("both", "up")


def is_spike(
    value: float, history: list[float] | np.ndarray, k: float, direction: str = "both", rel_floor: float = 1e-3
) -> tuple[bool, float, float]:
    """Whether ``value`` lies more than ``k`` median absolute deviations from the median of ``history``.

    The deviation scale is ``max(MAD, rel_floor * |median|)`` (so an almost constant loss
    does not turn every tiny change into a spike). Returns ``(spike, median, scale)``.
    """
    data = np.asarray(history, dtype=np.float64)
    median = float(np.median(data))
    mad = float(np.median(np.abs(data - median)))
    scale = max(mad, rel_floor * abs(median), 1e-12)
    deviation = value - median if direction == "up" else abs(value - median)
    return deviation > k * scale, median, scale


def find_spikes(
    values: list[float] | np.ndarray,
    start: int,
    window: int,
    min_history: int,
    k: float,
    direction: str = "both",
    rel_floor: float = 1e-3,
) -> list[tuple[int, float, float]]:
    """:func:`is_spike` for each of ``values[start:]`` against the (up to ``window``) values before it.

    Values preceded by fewer than ``min_history`` values are not judged. The values with a
    full window are judged together (one median over a stack of windows), the others one
    by one; the result is that of :func:`is_spike` on each.

    Returns
    -------
    list
        ``(index, median, scale)`` of every spike, by index.
    """
    data = np.asarray(values, dtype=np.float64)
    found = []
    for index in range(max(start, min_history), min(window, len(data))):
        spike, median, scale = is_spike(float(data[index]), data[:index], k, direction, rel_floor)
        if spike:
            found.append((index, median, scale))
    full = np.arange(max(start, window), len(data))
    if full.size:
        rows = np.lib.stride_tricks.sliding_window_view(data[:-1], window)[full - window]  # data[i - window : i]
        median = np.median(rows, axis=1)
        mad = np.median(np.abs(rows - median[:, None]), axis=1)
        scale = np.maximum(np.maximum(mad, rel_floor * np.abs(median)), 1e-12)
        deviation = data[full] - median if direction == "up" else np.abs(data[full] - median)
        for j in np.flatnonzero(deviation > k * scale):
            found.append((int(full[j]), float(median[j]), float(scale[j])))
    return found


class LossSpikeDetection(Callback):
    """Warn when a training loss lies far outside the running median +/- ``k`` MADs.

    The callback keeps the last ``window`` finite training losses (one per training
    batch: ``training_step``'s loss as Lightning hands it to ``on_train_batch_end``). A
    loss whose distance to their median exceeds ``k`` times their median absolute
    deviation (MAD; floored at ``1e-3 * |median|``) is a spike, once ``min_history``
    losses are known. A spike gives a
    :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning` that names the
    optimizer step, the batch index, the loss, the median and MAD, and the structure ids
    of the batch (``batch["ids"]``); the running count is logged as the scalar
    ``loss_spikes`` and each spike kept in :attr:`spikes`. Non-finite losses are left to
    :class:`~matsciml.lightning.callbacks.nan.ForwardNaNDetection`.

    To avoid a host-device synchronisation per step the losses stay on the device and
    are checked in blocks of ``check_every_n_steps`` batches (one synchronisation per
    block), and at the end of each epoch; the step named in the message is exact.

    Hooks it acts in: ``on_train_batch_start`` (step and ids), ``on_train_batch_end``
    (collect; check a full block), ``on_train_epoch_end`` / ``on_train_end`` (check the rest),
    ``state_dict`` / ``load_state_dict`` (history and count).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.LossSpikeDetection
              init_args:
                window: 100
                k: 10.0
                min_history: 20

    Parameters
    ----------
    window
        Number of recent losses in the running statistics, default ``100``.
    k
        Threshold in MADs, default ``10.0``.
    min_history
        Losses needed before spikes are reported, default ``20``.
    check_every_n_steps
        Batches per block check, default ``10``; ``1`` checks each batch at once.
    direction
        ``"both"`` (default): spikes up and down; ``"up"``: only losses above the median.
    max_ids
        Ids listed in one message, default ``10``.

    Raises
    ------
    ConfigError
        A size out of range (``min_history`` must be in ``[2, window]``), ``k`` not
        positive, or an unknown ``direction``.
    """

    def __init__(
        self,
        window: int = 100,
        k: float = 10.0,
        min_history: int = 20,
        check_every_n_steps: int = 10,
        direction: Literal["both", "up"] = "both",
        max_ids: int = 10,
    ) -> None:
        super().__init__()
        if not 2 <= int(min_history) <= int(window):
            raise ConfigError(f"LossSpikeDetection: min_history={min_history!r} must be in [2, window={window!r}]")
        if not float(k) > 0:
            raise ConfigError(f"LossSpikeDetection: k={k!r} must be positive")
        if int(check_every_n_steps) < 1:
            raise ConfigError(f"LossSpikeDetection: check_every_n_steps={check_every_n_steps!r} must be >= 1")
        if direction not in _DIRECTIONS:
            raise ConfigError(f"LossSpikeDetection: direction={direction!r} must be one of {_DIRECTIONS}")
        self.window = int(window)
        self.k = float(k)
        self.min_history = int(min_history)
        self.check_every_n_steps = int(check_every_n_steps)
        self.direction = direction
        self.max_ids = int(max_ids)
        self.loss_spikes = 0
        #: one record per spike: ``{"step", "batch_idx", "epoch", "loss", "median", "mad", "ids"}``
        self.spikes: list[dict[str, Any]] = []
        self._history: deque[float] = deque(maxlen=self.window)
        self._pending: list[tuple[Tensor, int, int, int, list[str]]] = []
        self._current: tuple[int, list[str]] | None = None
        self._warner = RateLimitedWarner(min_interval_steps=0, max_per_key=20)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._current = (trainer.global_step, id_source(batch))  # read only for a message

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1 or self._current is None:
            return
        step, ids = self._current
        self._pending.append((loss.detach(), step, batch_idx, trainer.current_epoch, ids))
        if len(self._pending) >= self.check_every_n_steps:
            self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        losses = [p[0] for p in pending]
        if any(loss.dim() or loss.device != losses[0].device for loss in losses):
            losses = [loss.reshape(()).to(losses[0].device) for loss in losses]
        values = torch.stack(losses).tolist()  # one sync
        finite = [(value, record) for value, record in zip(values, pending) if math.isfinite(value)]
        start = len(self._history)
        series = [*self._history, *(value for value, _ in finite)]
        spikes = find_spikes(series, start, self.window, self.min_history, self.k, self.direction)
        for index, median, scale in spikes:
            value, (_, step, batch_idx, epoch, ids) = finite[index - start]
            self._record(trainer, value, median, scale, step, batch_idx, epoch, ids_of(ids))
        self._history.extend(value for value, _ in finite)
        last_step = pending[-1][1]
        every = log_every_n_steps(trainer)
        if spikes or any(p[1] % every == 0 for p in pending):
            log_scalars(trainer, {"loss_spikes": self.loss_spikes}, step=last_step)

    def _record(
        self, trainer: pl.Trainer, value: float, median: float, mad: float, step: int, batch_idx: int, epoch: int, ids
    ) -> None:
        self.loss_spikes += 1
        self.spikes.append(
            {
                "step": step,
                "batch_idx": batch_idx,
                "epoch": epoch,
                "loss": value,
                "median": median,
                "mad": mad,
                "ids": ids,
            }
        )
        shown = ", ".join(ids[: self.max_ids]) + (
            f" and {len(ids) - self.max_ids} more" if len(ids) > self.max_ids else ""
        )
        self._warner.warn(
            "spike",
            f"LossSpikeDetection: loss spike at step {step} (epoch {epoch}, batch {batch_idx}): loss {value:.6g} is "
            f"{abs(value - median) / mad:.1f} MADs from the running median {median:.6g} (MAD {mad:.3g}, threshold "
            f"{self.k:g}); structures: {shown or 'unknown (the batch has no ids)'}. Inspect these structures "
            "(outliers, wrong units or labels), or lower the learning rate if spikes recur.",
            step,
            rank=trainer.global_rank,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"loss_spikes": self.loss_spikes, "history": list(self._history), "spikes": self.spikes[-100:]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_spikes = int(state_dict.get("loss_spikes", 0))
        self._history.clear()
        self._history.extend(float(v) for v in state_dict.get("history", []))
        self.spikes = [dict(s) for s in state_dict.get("spikes", [])]
