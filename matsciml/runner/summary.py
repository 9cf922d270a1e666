"""End-of-run summary: validation MAE of the trained task next to the MAE of predicting the training mean.

The mean predictor is the baseline every regression model must beat: it predicts, for
every validation structure (or atom, for per-atom targets), the mean of the training
targets. Its MAE is computed from the raw targets of the training and validation splits;
the model's MAE from its predictions (in data units) over the validation loader. A ratio
``mean-predictor MAE / model MAE`` of 1 means the model learned nothing.

For a run with :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback`
the checkpoint's model weights are the EMA; its raw (trained) weights, saved beside them,
are evaluated too (:func:`raw_weights_mae`) and printed next to the EMA's MAE.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

__all__ = ["TargetSummary", "iter_targets", "mean_predictor_mae", "model_mae", "raw_weights_mae", "format_summary"]


@dataclass
class TargetSummary:
    """Validation errors of one regression target (data units).

    Attributes
    ----------
    key
        Target key.
    model_mae
        MAE of the task's predictions on the validation split.
    mean_mae
        MAE of predicting the training mean.
    count
        Number of validation values compared (structures, or atoms x components).
    raw_mae
        For an EMA run: MAE of the raw (not averaged) weights of the same checkpoint
        (``model_mae`` is then the EMA weights'); ``None`` otherwise.
    """

    key: str
    model_mae: float
    mean_mae: float
    count: int
    raw_mae: float | None = None

    @property
    def ratio(self) -> float:
        """``mean_mae / model_mae`` (inf when the model is exact)."""
        return self.mean_mae / self.model_mae if self.model_mae > 0 else float("inf")


def _unwrap(dataset: Any) -> tuple[Any, list[int]]:
    """The base dataset under nested ``Subset``s and the indices into it."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def iter_targets(dataset: Any, key: str) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(target, natoms)`` of every sample that has ``key`` (no transforms when the dataset has ``raw``)."""
    base, indices = _unwrap(dataset)
    get = getattr(base, "raw", None)
    get = get if callable(get) else base.__getitem__
    for i in indices:
        sample = get(i)
        value = sample["targets"].get(key)
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float64)
            natoms = int(sample.get("natoms", len(sample["atomic_numbers"])))
            yield value, natoms


def _per_atom(key: str, values: list[tuple[torch.Tensor, int]]) -> bool:
    """Per-atom targets are concatenated, the others stacked (as :mod:`matsciml.datasets.collate` does)."""
    from matsciml.datasets.collate import STACKED_TARGETS
    from matsciml.datasets.schema import PER_ATOM_TARGETS

    if key in PER_ATOM_TARGETS:
        return True
    if key in STACKED_TARGETS:
        return False
    return all(v.dim() >= 1 and v.shape[0] == n for v, n in values)


def _gather(key: str, values: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    if _per_atom(key, values):
        return torch.cat([v for v, _ in values])
    return torch.stack([v for v, _ in values])


def mean_predictor_mae(train: Any, val: Any, key: str) -> tuple[float, int]:
    """MAE on ``val`` of predicting the mean of ``key`` over ``train`` (per component for arrays).

    Returns
    -------
    tuple
        ``(mae, number of finite validation values)``; ``(nan, 0)`` when either split lacks the key.
    """
    train_values = list(iter_targets(train, key))
    val_values = list(iter_targets(val, key))
    if not train_values or not val_values:
        return float("nan"), 0
    y_train = _gather(key, train_values)
    y_val = _gather(key, val_values)
    mean = torch.nanmean(y_train, dim=0)
    err = (y_val - mean).abs()
    finite = torch.isfinite(err)
    if not bool(finite.any()):
        return float("nan"), 0
    return float(err[finite].mean()), int(finite.sum())


def model_mae(task: Any, loader: Any, keys: list[str]) -> dict[str, tuple[float, int]]:
    """MAE of ``task(batch)`` (predictions in data units) against ``batch["targets"]`` over ``loader``.

    Non-finite targets are skipped. The task is put in eval mode and left there.
    """
    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0)
    task.eval()
    device = next((p.device for p in task.parameters()), torch.device("cpu"))
    for batch in loader:
        batch = _to_device(batch, device)
        with torch.no_grad():
            predictions = task(batch)
        for key in keys:
            if key not in predictions or key not in batch["targets"]:
                continue
            pred = predictions[key].detach().double()
            target = torch.as_tensor(batch["targets"][key]).double().reshape(pred.shape)
            err = (pred - target).abs()
            finite = torch.isfinite(err)
            sums[key] += float(err[finite].sum())
            counts[key] += int(finite.sum())
    return {key: (sums[key] / counts[key] if counts[key] else float("nan"), counts[key]) for key in keys}


def raw_weights_mae(
    task: Any, loader: Any, keys: list[str], checkpoint: str | Path | None
) -> dict[str, tuple[float, int]]:
    """:func:`model_mae` of the raw weights saved in an EMA run's ``checkpoint``; the task's weights are put back.

    The raw weights are the EMA callback's checkpoint state (the first state-dict name of
    each distinct tensor; names that alias the same tensor get the same value). Returns
    ``{}`` when ``checkpoint`` is ``None``, missing, or holds no EMA state.
    """
    from matsciml.runner.weights import read_raw_weights

    if not checkpoint or not Path(checkpoint).is_file():
        return {}
    raw = read_raw_weights(checkpoint, "best checkpoint")
    if raw is None:
        return {}
    own = task.state_dict(keep_vars=True)
    by_tensor = {id(own[name]): value for name, value in raw.items() if name in own}
    kept = {name: tensor.detach().clone() for name, tensor in own.items()}
    task.load_state_dict({name: by_tensor.get(id(t), kept[name]) for name, t in own.items()}, strict=True)
    try:
        return model_mae(task, loader, keys)
    finally:
        task.load_state_dict(kept, strict=True)


def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def format_summary(
    run_dir: str | Path,
    best_checkpoint: str | None,
    best_score: float | None,
    monitor: str | None,
    targets: list[TargetSummary],
    note: str = "",
) -> str:
    """The text printed at the end of a run."""
    lines = [f"Run folder:       {run_dir}"]
    if best_checkpoint:
        score = f" ({monitor}={best_score:.6g})" if monitor and best_score is not None else ""
        lines.append(f"Best checkpoint:  {best_checkpoint}{score}")
    else:
        lines.append("Best checkpoint:  (none written)")
    ema = any(t.raw_mae is not None for t in targets)
    if targets:
        what = "EMA weights" if ema else "model"
        lines.append(f"Validation MAE (data units; ratio = mean-predictor MAE / {what} MAE):")
        width = max(len(t.key) for t in targets)
        for t in targets:
            raw = f"   raw weights {t.raw_mae:.6g}" if t.raw_mae is not None else ""
            lines.append(
                f"  {t.key:<{width}s}  {what} {t.model_mae:.6g}{raw}   mean predictor {t.mean_mae:.6g}   "
                f"ratio {t.ratio:.2f}x   ({t.count} values)"
            )
    if note:
        lines.append(note)
    return "\n".join(lines)
