"""``BinaryClassificationTask``: one yes/no label per structure (e.g. ``is_stable``)."""

from __future__ import annotations

import torch
from torch import nn

from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.metrics import BINARY
from matsciml.models.tasks.normalization import TargetNormalizer
from matsciml.registry import register_task

__all__ = ["BinaryClassificationTask"]


@register_task(aliases=["binary_classification"])
class BinaryClassificationTask(BaseTaskModule):
    """Classify structures into two classes per task key.

    Each head gives one logit per structure; the loss is ``BCEWithLogitsLoss`` on the
    0/1 targets (bool or integer targets are cast to float); predictions returned by
    ``forward``/``predict_step`` and used by the metrics are probabilities
    ``sigmoid(logit)``. ``normalize_kwargs`` does not apply to labels and is ignored.

    Logged: ``<split>_loss``, ``<split>_total``, ``<split>_<key>`` (the loss) and
    ``<split>_<key>_accuracy`` (fraction correct at probability 0.5).

    Example YAML (experiment config)::

        dataset:
          materials_project:
            - task: BinaryClassificationTask
              targets: [is_stable]

    Raises
    ------
    ConfigError, DataError
        As :class:`~matsciml.models.tasks.base.BaseTaskModule`.
    """

    default_loss = nn.BCEWithLogitsLoss
    metric_kind = BINARY

    def _make_normalizer(self, normalize_kwargs: object) -> TargetNormalizer:
        return TargetNormalizer(None, self.task_keys)

    def _to_data_units(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(value)

    def _loss_target(self, key: str, target: torch.Tensor) -> torch.Tensor:
        return target
