"""``DatasetStatsCallback``: sizes, elements, atoms per structure and target statistics per split, at fit start."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.lightning.callbacks._utils.reporting import log_scalars

__all__ = ["DatasetStatsCallback", "split_statistics"]


def _symbol(z: int) -> str:
    try:
        from ase.data import chemical_symbols

        return chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z)
    except ImportError:  # pragma: no cover - ase is a dependency of the readers
        return str(z)


def split_statistics(dataset: Any, max_samples: int | None = None) -> dict[str, Any]:
    """Statistics of the samples of ``dataset`` (the first ``max_samples`` when given).

    Returns
    -------
    dict
        ``size`` (samples in the dataset), ``counted`` (samples read), ``elements``
        (``{symbol: atoms}``), ``atoms`` (``min``/``mean``/``max`` per structure) and
        ``targets`` (``{key: {"mean", "std", "min", "max", "count"}}`` over all values of
        each floating-point target; ``std`` with ``n - 1``).
    """
    size = len(dataset)
    count = size if max_samples is None else min(size, int(max_samples))
    elements: Counter[str] = Counter()
    natoms: list[int] = []
    moments: dict[str, list[float]] = {}
    for i in range(count):
        sample = dataset[i]
        if not isinstance(sample, Mapping):
            continue
        numbers = sample.get("atomic_numbers")
        if isinstance(numbers, torch.Tensor):
            natoms.append(int(numbers.numel()))
            for z, n in zip(*torch.unique(numbers, return_counts=True)):
                elements[_symbol(int(z))] += int(n)
        targets = sample.get("targets")
        for key, value in targets.items() if isinstance(targets, Mapping) else []:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                v = value.detach().double().reshape(-1)
                m = moments.setdefault(key, [0.0, 0.0, 0.0, math.inf, -math.inf])
                m[0] += v.numel()
                m[1] += float(v.sum())
                m[2] += float(v.pow(2).sum())
                m[3], m[4] = min(m[3], float(v.min())), max(m[4], float(v.max()))
    target_stats = {}
    for key, (n, s, sq, lo, hi) in moments.items():
        mean = s / n
        var = max(sq / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
        target_stats[key] = {"mean": mean, "std": var**0.5, "min": lo, "max": hi, "count": int(n)}
    atoms = {"min": min(natoms), "mean": sum(natoms) / len(natoms), "max": max(natoms)} if natoms else {}
    return {"size": size, "counted": count, "elements": dict(sorted(elements.items())), "atoms": atoms,
            "targets": target_stats}  # fmt: skip


class DatasetStatsCallback(Callback):
    """Log dataset statistics of every split once, at fit start.

    For each of ``train``, ``val``, ``test`` of the data module (``trainer.datamodule.splits``):
    the number of structures, element counts, atoms per structure and per-target mean, std,
    min and max (see :func:`split_statistics`). Scalars go to every logger at step 0 as
    ``data/<split>/size``, ``data/<split>/atoms_mean``, ``data/<split>/<target>_mean`` and
    ``..._std``; the full table goes to the log and to :attr:`stats`. Rank zero reads the
    samples (with the split's transforms applied).

    Hooks it acts in: ``on_fit_start``.

    Example::

        callbacks:
          - kind: DatasetStatsCallback
            max_samples: 5000

    Parameters
    ----------
    max_samples
        Read at most this many samples of each split (default 10000; ``None`` for all).
    """

    def __init__(self, max_samples: int | None = 10_000) -> None:
        super().__init__()
        if max_samples is not None:
            check_int(max_samples, "max_samples", "DatasetStatsCallback")
        self.max_samples = max_samples
        self.stats: dict[str, dict[str, Any]] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = getattr(trainer, "datamodule", None)
        splits = getattr(datamodule, "splits", None)
        if not splits:
            rank_zero_info("DatasetStatsCallback: no data module with train/val/test splits; nothing to report")
            return
        metrics: dict[str, float] = {}
        lines = []
        for name, dataset in splits.items():
            stats = split_statistics(dataset, self.max_samples)
            self.stats[name] = stats
            metrics[f"data/{name}/size"] = stats["size"]
            if stats["atoms"]:
                metrics[f"data/{name}/atoms_mean"] = stats["atoms"]["mean"]
            for key, t in stats["targets"].items():
                metrics[f"data/{name}/{key}_mean"], metrics[f"data/{name}/{key}_std"] = t["mean"], t["std"]
            lines.append(f"{name}: {stats['size']} structures (read {stats['counted']}); atoms {stats['atoms']}")
            lines.append(f"  elements {stats['elements']}")
            for key, t in stats["targets"].items():
                lines.append(f"  {key}: mean {t['mean']:.6g} std {t['std']:.6g} min {t['min']:.6g} max {t['max']:.6g}")
        log_scalars(trainer, metrics, step=0)
        rank_zero_info("DatasetStatsCallback:\n" + "\n".join(lines))
