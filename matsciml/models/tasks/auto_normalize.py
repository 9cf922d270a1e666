"""Automatic target normalisation of a task: statistics of the training split at ``fit``.

:class:`TargetStatisticsMixin` gives :class:`~matsciml.models.tasks.base.BaseTaskModule`
its ``setup`` hook: when ``auto_normalize`` is on and a regression target has no
hand-set ``normalize_kwargs``, the statistics of the training split are computed once
(:func:`~matsciml.models.tasks.statistics.target_statistics`), applied, logged, and
stored in the hyperparameters as ``target_stats`` (plain data), so a checkpoint reloads
with the same normalisation and predicts in data units.
"""

from __future__ import annotations

import copy
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from matsciml.models.tasks.metrics import REGRESSION
from matsciml.models.tasks.plain import to_plain
from matsciml.models.tasks.statistics import target_statistics

__all__ = ["TargetStatisticsMixin"]


class TargetStatisticsMixin:
    """``setup``-time target statistics for a task (see the module docstring).

    The task sets ``task_keys``, ``metric_kind``, ``extensive_keys``, ``auto_normalize``,
    ``target_stats``, ``_normalize_kwargs`` and ``_make_normalizer``; subclasses override
    :meth:`_statistics_keys` and :meth:`_apply_target_stats` for other normalisations.
    """

    task_keys: list[str]
    metric_kind: str
    extensive_keys: tuple[str, ...]
    auto_normalize: bool
    target_stats: dict[str, Any]
    _normalize_kwargs: dict[str, Any]

    # ------------------------------------------------------------------ target statistics
    def _hand_set_keys(self) -> set[str]:
        return {str(k).rpartition("_")[0] for k in self._normalize_kwargs}

    def _statistics_keys(self) -> list[str]:
        """Keys whose statistics the task needs: regression keys without hand-set values."""
        if self.metric_kind != REGRESSION:
            return []
        hand = self._hand_set_keys()
        return [key for key in self.task_keys if key not in hand]

    def _apply_target_stats(self, stats: dict[str, Any]) -> None:
        """Normalise keys without hand-set values by their ``mean`` and ``std`` in ``stats``."""
        merged = dict(self._normalize_kwargs)
        hand = self._hand_set_keys()
        for key in self.task_keys:
            if key in stats and key not in hand:
                merged[f"{key}_mean"] = float(stats[key]["mean"])
                std = float(stats[key]["std"])
                merged[f"{key}_std"] = std if std > 1e-12 else 1.0
        self.normalizer = self._make_normalizer(merged)

    def setup(self, stage: str) -> None:
        """At ``fit``, compute the statistics of keys that have none (``auto_normalize``).

        Reads the training split of the trainer's data module (``datamodule.datasets["train"]``)
        in one pass, cached per dataset; see :mod:`~matsciml.models.tasks.statistics`.
        """
        if stage != "fit" or not self.auto_normalize:
            return
        keys = [key for key in self._statistics_keys() if key not in self.target_stats]
        if not keys:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        try:
            train = datamodule.datasets.get("train") if hasattr(datamodule, "datasets") else None
        except RuntimeError:
            train = None
        if train is None:
            train = getattr(datamodule, "train_dataset", None)
        if train is None:
            rank_zero_warn(
                f"{type(self).__name__}: auto_normalize needs a data module with a training split "
                f"(datamodule.datasets['train']); {keys} are not normalised. Pass target_stats or normalize_kwargs, "
                "or train with MatSciMLDataModule"
            )
            return
        extensive = [key for key in self.extensive_keys if key in keys]
        stats = target_statistics(train, keys, extensive, progress=self.global_rank == 0)
        self.set_target_stats({**self.target_stats, **stats})

    def set_target_stats(self, stats: dict[str, Any]) -> None:
        """Use ``stats`` (plain data, see ``target_stats``), store them in the hyperparameters and log them."""
        plain = to_plain(stats, strict=True, where="target_stats")
        self._apply_target_stats(plain)
        self.target_stats = plain
        self.hparams["target_stats"] = plain
        initial = getattr(self, "_hparams_initial", None)
        if initial is not None:
            initial["target_stats"] = copy.deepcopy(plain)
        parts = []
        for key, values in plain.items():
            text = f"{key}: mean {values['mean']:.6g}, std {values['std']:.4g}, rms {values['rms']:.4g}"
            if "element_energies" in values:
                text += (
                    f", {len(values['element_energies'])} element reference energies, residual std "
                    f"{values['residual_std']:.4g} (per atom {values['residual_per_atom_std']:.4g})"
                )
            parts.append(text)
        rank_zero_info(f"{type(self).__name__}: target statistics of the training split: " + "; ".join(parts))
