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
epoch. Every training batch is added to the epoch sums, but the per-step value of a
training metric (that batch alone) is computed only on the steps whose values reach the
logger (the trainer's ``log_every_n_steps``), and on the first step of each epoch.
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

__all__ = ["TaskMetrics", "WeightedMean", "SPLITS"]

SPLITS = ("train", "val", "test")
REGRESSION = "regression"
BINARY = "binary"
MULTICLASS = "multiclass"


class WeightedMean(Metric):
    """Weighted mean ``sum(w * x) / sum(w)`` over an epoch, summed across ranks.

    NaN values propagate (a NaN loss should be seen). Written out because
    ``torchmetrics.WeightedMean()`` drops the weights.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add ``value`` (a scalar tensor) with weight ``weight``."""
        value = torch.as_tensor(value).detach().to(device=self.total.device, dtype=torch.float64)
        self.total += value.sum() * float(weight)
        self.weight += float(weight) * value.numel()

    def compute(self) -> torch.Tensor:
        """The weighted mean (NaN when nothing was added)."""
        return self.total / self.weight

    @staticmethod
    def batch_value(value: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The weighted mean of ``value`` alone (what ``compute`` gives after this one ``update``)."""
        value = torch.as_tensor(value).detach().to(dtype=torch.float64)
        return (value.sum() * float(weight)) / (float(weight) * value.numel())


def _batch_value(metric: Metric, *args: Any) -> torch.Tensor:
    """The value of ``metric`` over one batch, without touching its state."""
    if isinstance(metric, WeightedMean):
        return WeightedMean.batch_value(*args)
    if isinstance(metric, MeanAbsoluteError):
        return mean_absolute_error(*args)
    return binary_accuracy(*args)


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
                    store[f"{split}_{key}_mae"] = MeanAbsoluteError()
                elif kind == BINARY:
                    store[f"{split}_{key}_accuracy"] = BinaryAccuracy()
                elif kind == MULTICLASS:
                    store[f"{split}_{key}_accuracy"] = WeightedMean()
                else:
                    raise ValueError(f"metric kind {kind!r} of {key!r} must be 'regression', 'binary' or 'multiclass'")
        self.store = nn.ModuleDict(store)

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
            ``"train"``, ``"val"`` or ``"test"``. Every metric is updated; for
            ``"train"``, when ``step_values``, the value of this batch alone is also
            computed (functionally, the state is not touched) and kept as the metric's
            ``_forward_cache``, the per-step value Lightning logs.
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
            ``{name: metric}`` for ``LightningModule.log``.
        """
        step = split == "train" and step_values
        logged: dict[str, Metric] = {}

        def add(name: str, *args: Any) -> None:
            metric = self.store[name]
            metric.update(*args)
            if step:
                metric._forward_cache = _batch_value(metric, *args)
            logged[name] = metric

        batch_size = float(result["batch_size"])
        loss = result["loss"].detach()
        add(f"{split}_loss", loss, batch_size)
        add(f"{split}_total", loss, batch_size)
        counts = result.get("counts", {})
        for key, kind in self.kinds.items():
            if key not in result["per_key"]:
                continue  # no structure of this key in the batch
            value = result["per_key"][key].detach()
            count = counts.get(key, batch_size)
            if count:
                add(f"{split}_{key}", value, float(count))
            if kind == MULTICLASS:
                self._add_multiclass(add, f"{split}_{key}_accuracy", result["predictions"][key], targets[key])
                continue
            pred = result["predictions"][key].detach().reshape(-1)
            pred, target, n = finite_pairs(pred, targets[key].reshape(-1).to(pred.dtype))
            if n == 0:
                continue
            if kind == REGRESSION:
                add(f"{split}_{key}_mae", pred, target)
            else:
                add(f"{split}_{key}_accuracy", pred, target.long())
        return logged

    def reset(self, split: str) -> None:
        """Empty the metrics of ``split``."""
        for name, metric in self.store.items():
            if name.startswith(f"{split}_"):
                metric.reset()

    @staticmethod
    def _add_multiclass(add: Any, name: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accuracy of the most probable class, over the targets that are valid class indices (>= 0)."""
        pred = pred.detach().reshape(-1, pred.shape[-1])
        target = target.detach().reshape(-1).to(pred.device)
        keep = target >= 0
        n = int(keep.sum())
        if n:
            correct = (pred[keep].argmax(-1) == target[keep].long()).to(torch.float64)
            add(name, correct.mean(), float(n))
