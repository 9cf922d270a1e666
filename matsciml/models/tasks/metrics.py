"""The metrics a task logs, kept as ``torchmetrics`` objects so they reduce exactly.

Each metric accumulates sums and counts over an epoch (and across ranks when Lightning
syncs it), so an epoch value is the mean over every sample of the epoch, not a mean of
per-batch means: batches of 3 and 5 samples give the MAE over all 8.

Names, for ``split`` in ``train``, ``val``, ``test`` and each task key ``key``:

========================== ===========================================================
``<split>_loss``           total loss (scaled sum over keys, normalised units), mean
                           over batches weighted by the number of structures
``<split>_total``          the same number (upstream name)
``<split>_<key>``          loss of ``key`` in normalised units, weighted by the number
                           of target elements (structures, or atoms x 3 for forces)
``<split>_<key>_mae``      mean absolute error in data units, over every element
                           (forces: every component of every atom) -- regression keys
``<split>_<key>_accuracy`` fraction of correct labels: at probability 0.5 for binary
                           keys, the most probable class for multi-class keys
========================== ===========================================================

A key absent from a batch's ``per_key`` (a multi-task batch without structures of that
key's dataset) is skipped for that batch: it adds nothing to the sums and counts.

Training metrics are logged per step and per epoch (Lightning appends ``_step`` /
``_epoch`` in the logger; callbacks see the plain name); validation and test metrics per
epoch.

Cost per batch. A batch is not added to a metric's sums at once: :meth:`TaskMetrics.update`
queues its tensors (:meth:`DeferredUpdates.defer`, no computation, no host-device
synchronisation), and the queue is added in one vectorised ``update`` when the metric is
read (``compute``, and ``sync`` across ranks), after ``max_pending`` batches, or on
``flush``. The sums are those of adding each batch in turn (up to the order of
floating-point additions). The value of one batch alone -- the per-step value of a
training metric -- is computed only for the steps whose values reach a logger (the
module decides, see :mod:`matsciml.models.tasks.steps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, Metric
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.functional import mean_absolute_error
from torchmetrics.functional.classification import binary_accuracy

from matsciml.models.losses import finite_pairs

__all__ = [
    "TaskMetrics",
    "WeightedMean",
    "FiniteMeanAbsoluteError",
    "FiniteBinaryAccuracy",
    "DeferredUpdates",
    "SPLITS",
]

SPLITS = ("train", "val", "test")
REGRESSION = "regression"
BINARY = "binary"
MULTICLASS = "multiclass"


class DeferredUpdates:
    """Mixin (listed before ``torchmetrics.Metric``): batches queued by :meth:`defer` are added later, together.

    :meth:`defer` keeps the arguments of ``update`` and returns; :meth:`flush` adds every
    queued batch with one ``update(*self._merge(queue))``. The queue is flushed before the
    state is read -- ``compute`` and the cross-rank ``sync`` go through ``sync`` --, when it
    holds ``max_pending`` batches, and emptied by ``reset``. A subclass gives ``_merge``:
    the arguments of one ``update`` that adds the same as the queued calls one by one.
    """

    #: queued batches that trigger a flush (bounds the memory held by the queue)
    max_pending = 64

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending: list[tuple] = []

    def defer(self, *args: Any) -> None:
        """Queue the arguments of one ``update``."""
        self._pending.append(args)
        if self._computed is not None or not self._update_count:
            self._computed = None  # torchmetrics' cached result of compute() is stale
            self._update_count += 1  # compute() warns when nothing was added
        if len(self._pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        """Add the queued batches to the state."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.update(*self._merge(pending))

    def _merge(self, pending: list[tuple]) -> tuple:
        raise NotImplementedError

    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Flush, then torchmetrics' ``sync`` (``compute`` calls it first, on one rank too)."""
        self.flush()
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        """Drop the queue and reset the state."""
        self._pending = []
        super().reset()


class WeightedMean(DeferredUpdates, Metric):
    """Weighted mean ``sum(w * x) / sum(w)`` over an epoch, summed across ranks.

    NaN values propagate (a NaN loss should be seen). Written out because
    ``torchmetrics.WeightedMean()`` drops the weights.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Add ``value`` (a tensor) with weight ``weight``: a number for every element, or a tensor of ``value``'s shape."""
        value = torch.as_tensor(value).detach().to(device=self.total.device, dtype=torch.float64)
        if isinstance(weight, torch.Tensor):
            weight = weight.detach().to(device=self.total.device, dtype=torch.float64).expand_as(value)
            self.total += (value * weight).sum()
            self.weight += weight.sum()
            return
        self.total += value.sum() * float(weight)
        self.weight += float(weight) * value.numel()

    def _merge(self, pending: list[tuple]) -> tuple:
        values = [torch.as_tensor(p[0]).detach() for p in pending]
        weights = [float(p[1]) if len(p) > 1 else 1.0 for p in pending]
        device = self.total.device
        if all(v.dim() == 0 for v in values):  # the usual case: one scalar per batch
            return torch.stack(values), torch.tensor(weights, dtype=torch.float64, device=device)
        flat = torch.cat([v.reshape(-1).to(device=device, dtype=torch.float64) for v in values])
        counts = torch.tensor([v.numel() for v in values], device=device)
        return flat, torch.tensor(weights, dtype=torch.float64, device=device).repeat_interleave(counts)

    def compute(self) -> torch.Tensor:
        """The weighted mean (NaN when nothing was added)."""
        return self.total / self.weight

    @staticmethod
    def batch_value(value: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The weighted mean of ``value`` alone (what ``compute`` gives after this one ``update``)."""
        value = torch.as_tensor(value).detach().to(dtype=torch.float64)
        return (value.sum() * float(weight)) / (float(weight) * value.numel())


def _merge_pairs(metric: Metric, pending: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    device = metric.device
    preds = torch.cat([p[0].detach().reshape(-1) for p in pending]).to(device)
    targets = torch.cat([p[1].detach().reshape(-1) for p in pending]).to(device)
    return preds, targets


class FiniteMeanAbsoluteError(DeferredUpdates, MeanAbsoluteError):
    """``torchmetrics.MeanAbsoluteError`` over the pairs whose target is finite (a NaN target is a missing label)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pairs of ``preds`` and ``target`` (same shape) whose target is finite."""
        preds, target, n = finite_pairs(preds.reshape(-1), target.reshape(-1).to(preds.dtype))
        if n:
            super().update(preds, target)

    def _merge(self, pending: list[tuple]) -> tuple:
        return _merge_pairs(self, pending)


class FiniteBinaryAccuracy(DeferredUpdates, BinaryAccuracy):
    """``torchmetrics.BinaryAccuracy`` (probabilities, threshold 0.5) over the labels that are finite."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pairs of ``preds`` (probabilities) and ``target`` (0/1, NaN for a missing label)."""
        preds, target, n = finite_pairs(preds.reshape(-1), target.reshape(-1).to(preds.dtype))
        if n:
            super().update(preds, target.long())

    def _merge(self, pending: list[tuple]) -> tuple:
        return _merge_pairs(self, pending)


def _batch_value(metric: Metric, *args: Any) -> torch.Tensor | None:
    """The value of ``metric`` over one batch, without touching its state; ``None`` when it has no finite pair."""
    if isinstance(metric, WeightedMean):
        return WeightedMean.batch_value(*args)
    pred, target, n = finite_pairs(args[0].reshape(-1), args[1].reshape(-1).to(args[0].dtype))
    if n == 0:
        return None
    if isinstance(metric, MeanAbsoluteError):
        return mean_absolute_error(pred, target)
    return binary_accuracy(pred, target.long())


class TaskMetrics(nn.Module):
    """The metric objects of one task, per split.

    Parameters
    ----------
    kinds
        ``{task_key: "regression" | "binary" | "multiclass"}`` in logging order.
        Multi-class predictions are ``[N, num_classes]`` probabilities (or logits) and
        targets class indices ``[N]``.
    splits
        Splits to create metrics for, default ``("train", "val", "test")``.
    """

    def __init__(self, kinds: Mapping[str, str], splits: Iterable[str] = SPLITS) -> None:
        super().__init__()
        self.kinds = dict(kinds)
        self.splits = tuple(splits)
        store: dict[str, Metric] = {}
        for split in self.splits:
            store[f"{split}_loss"] = WeightedMean()
            store[f"{split}_total"] = WeightedMean()
            for key, kind in self.kinds.items():
                store[f"{split}_{key}"] = WeightedMean()
                if kind == REGRESSION:
                    store[f"{split}_{key}_mae"] = FiniteMeanAbsoluteError()
                elif kind == BINARY:
                    store[f"{split}_{key}_accuracy"] = FiniteBinaryAccuracy()
                elif kind == MULTICLASS:
                    store[f"{split}_{key}_accuracy"] = WeightedMean()
                else:
                    raise ValueError(f"metric kind {kind!r} of {key!r} must be 'regression', 'binary' or 'multiclass'")
        self.store = nn.ModuleDict(store)
        self._metrics: dict[str, Metric] = dict(store)  # plain lookups (ModuleDict goes through __getattr__)
        self._last: dict[str, tuple] = {}  # the arguments of the last batch, by metric name

    def update(
        self,
        split: str,
        result: Mapping[str, Any],
        targets: Mapping[str, torch.Tensor],
        step_values: bool = True,
    ) -> dict[str, Metric]:
        """Add one batch to the metrics of ``split`` and return the metrics to log.

        Parameters
        ----------
        split
            ``"train"``, ``"val"`` or ``"test"``. The batch is queued on every metric it
            has a value for (:meth:`DeferredUpdates.defer`); for ``"train"``, when
            ``step_values``, the value of this batch alone is also computed (see
            :meth:`step_values`).
        result
            The output of ``compute_losses``: ``loss``, ``per_key``, ``counts``,
            ``predictions`` (data units; probabilities for binary keys), ``batch_size``.
        targets
            ``{key: target}`` in data units (the batch's ``targets``).
        step_values
            Compute the per-step values of the training metrics (default ``True``).

        Returns
        -------
        dict
            ``{name: metric}`` for ``LightningModule.log``: with per-step values, the
            metrics that have one (a key whose targets are all missing has none);
            otherwise every metric the batch was queued on.
        """
        last = self._last
        last.clear()
        batch_size = float(result["batch_size"])
        loss = result["loss"].detach()
        last[f"{split}_loss"] = last[f"{split}_total"] = (loss, batch_size)
        counts = result.get("counts", {})
        per_key = result["per_key"]
        predictions = result["predictions"]
        for key, kind in self.kinds.items():
            if key not in per_key:
                continue  # no structure of this key in the batch
            count = counts.get(key, batch_size)
            if count:
                last[f"{split}_{key}"] = (per_key[key].detach(), float(count))
            if kind == MULTICLASS:
                self._add_multiclass(last, f"{split}_{key}_accuracy", predictions[key], targets[key])
                continue
            name = f"{split}_{key}_mae" if kind == REGRESSION else f"{split}_{key}_accuracy"
            last[name] = (predictions[key].detach(), targets[key])  # missing labels are dropped in update
        metrics = self._metrics
        for name, args in last.items():
            metrics[name].defer(*args)
        if split == "train" and step_values:
            return self.step_values(last)
        return {name: metrics[name] for name in last}

    def step_values(self, names: Iterable[str]) -> dict[str, Metric]:
        """Compute the value of the last batch alone for the metrics ``names``.

        The value is computed functionally (the metric's state is not touched) and kept as
        the metric's ``_forward_cache``, the per-step value ``LightningModule.log`` reads;
        on an accelerator the values are copied to the host together (Lightning reads the
        progress-bar value with ``.item()`` at every step, a synchronisation on a device).

        Returns
        -------
        dict
            ``{name: metric}`` of the metrics that have a value (some finite target).
        """
        values: dict[str, torch.Tensor] = {}
        for name in names:
            value = _batch_value(self._metrics[name], *self._last[name])
            if value is not None:
                values[name] = value
        if values and next(iter(values.values())).device.type != "cpu":
            # one copy to the host now, instead of the synchronisation Lightning's progress bar
            # metrics (``.item()`` of every logged value) would cost at every later step
            host = torch.stack([v.to(torch.float64) for v in values.values()]).cpu()
            values = dict(zip(values, host.unbind()))
        out: dict[str, Metric] = {}
        for name, value in values.items():
            metric = self._metrics[name]
            metric._forward_cache = value
            out[name] = metric
        return out

    def reset(self, split: str) -> None:
        """Empty the metrics of ``split``."""
        for name, metric in self._metrics.items():
            if name.startswith(f"{split}_"):
                metric.reset()

    @staticmethod
    def _add_multiclass(last: dict[str, tuple], name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accuracy of the most probable class, over the targets that are valid class indices (>= 0)."""
        pred = pred.detach().reshape(-1, pred.shape[-1])
        target = target.detach().reshape(-1).to(pred.device)
        keep = target >= 0
        n = int(keep.sum())
        if n:
            correct = (pred[keep].argmax(-1) == target[keep].long()).to(torch.float64)
            last[name] = (correct.mean(), float(n))
