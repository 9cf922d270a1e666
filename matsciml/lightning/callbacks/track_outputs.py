"""``TrackOutputsCallback``: mean and spread of each head's predictions on the validation set, and collapse."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars

__all__ = ["TrackOutputsCallback"]


def _flat(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        return value.detach().reshape(-1).to(torch.float64)
    return None


class TrackOutputsCallback(Callback):
    """Mean and standard deviation of each head's validation predictions (data units); warns on collapse.

    After every validation batch the task's ``forward`` (predictions in data units, see the
    task protocol) is called once more on the batch; count, sum and sum of squares of every
    head's values are accumulated (in float64, summed over ranks at the end). At the end of
    validation ``outputs/<head>/mean`` and ``outputs/<head>/std`` go to every logger and to
    :attr:`history`. When the batch carries the head's targets (``batch["targets"][head]``)
    their spread is accumulated too, and a head whose prediction std is below
    ``collapse_ratio`` times the targets' std (or below ``min_std`` without targets) is
    reported with a warning: its outputs have collapsed to (nearly) a constant.

    Hooks it acts in: ``on_validation_epoch_start``, ``on_validation_batch_end``,
    ``on_validation_epoch_end`` (not during the sanity check).

    Example::

        callbacks:
          - kind: TrackOutputsCallback
            collapse_ratio: 0.01

    Parameters
    ----------
    collapse_ratio
        Prediction std / target std under which a head counts as collapsed (default 0.01).
    min_std
        Prediction std under which a head without targets counts as collapsed (default 1e-8).
    """

    def __init__(self, collapse_ratio: float = 0.01, min_std: float = 1e-8) -> None:
        super().__init__()
        if not float(collapse_ratio) >= 0.0 or not float(min_std) >= 0.0:
            raise ConfigError(
                f"TrackOutputsCallback: collapse_ratio={collapse_ratio!r}, min_std={min_std!r} must be >= 0"
            )
        self.collapse_ratio = float(collapse_ratio)
        self.min_std = float(min_std)
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._warner = RateLimitedWarner(min_interval_steps=0, max_per_key=3)

    @staticmethod
    def _moments(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([values.new_tensor(float(values.numel())), values.sum(), values.pow(2).sum()])

    def _add(self, key: str, values: torch.Tensor) -> None:
        moments = self._moments(values).cpu()
        self._sums[key] = self._sums[key] + moments if key in self._sums else moments

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {}

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            predictions = pl_module(batch)
        if not isinstance(predictions, Mapping):
            return
        targets = batch.get("targets", {}) if isinstance(batch, Mapping) else {}
        for key, value in predictions.items():
            flat = _flat(value)
            if flat is None:
                continue
            self._add(f"pred/{key}", flat)
            target = _flat(targets.get(key)) if isinstance(targets, Mapping) else None
            if target is not None:
                self._add(f"target/{key}", target)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._sums:
            return
        stats: dict[str, dict[str, float]] = {}
        for name in sorted(self._sums):
            total = trainer.strategy.reduce(self._sums[name].to(pl_module.device), reduce_op="sum").cpu()
            n, s, sq = (float(v) for v in total)
            mean = s / n
            var = max(sq / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
            stats[name] = {"mean": mean, "std": var**0.5, "count": n}
        metrics, record = {}, {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for name, value in stats.items():
            if not name.startswith("pred/"):
                continue
            head = name[len("pred/") :]
            metrics[f"outputs/{head}/mean"], metrics[f"outputs/{head}/std"] = value["mean"], value["std"]
            record[head] = dict(value)
            target = stats.get(f"target/{head}")
            limit = self.collapse_ratio * target["std"] if target is not None else self.min_std
            if value["std"] <= limit:
                than = f"{self.collapse_ratio} x the targets' std {target['std']:.4g}" if target else f"{self.min_std}"
                self._warner.warn(
                    f"collapse/{head}",
                    f"TrackOutputsCallback: the outputs of head {head!r} have collapsed: std {value['std']:.4g} <= "
                    f"{than} over {int(value['count'])} validation values (mean {value['mean']:.4g}); check the "
                    "learning rate, the normalisation of this target and the head's last activation",
                    trainer.global_step,
                    trainer.global_rank,
                )
                record[head]["collapsed"] = True
        log_scalars(trainer, metrics)
        self.history.append(record)
