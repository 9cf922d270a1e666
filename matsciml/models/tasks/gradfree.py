"""``GradFreeForceRegressionTask``: forces from a direct vector head, without autograd.

A head maps each atom's embedding to a 3-vector; the loss compares it with the force
target directly. Cheaper than :class:`~matsciml.models.tasks.forces.ForceRegressionTask`
(no derivative through the encoder), but the forces are not those of any energy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.models.embeddings import Embeddings
from matsciml.models.heads import OutputHead
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.metrics import REGRESSION
from matsciml.registry import register_task

__all__ = ["GradFreeForceRegressionTask"]

_ALIASES = {"forces": "force", "force": "forces"}


@register_task(aliases=["gradfree_force_regression"])
class GradFreeForceRegressionTask(BaseTaskModule):
    """Regress per-atom forces with a direct head on the atom embeddings.

    ``output_heads[key]`` maps each atom's embedding ``[N, D]`` to ``[N, 3]`` (point
    embeddings with extra dimensions, e.g. frames, are pooled with
    ``embedding_reduction_type`` first). The target is ``batch["targets"][key]``
    ``[sum N, 3]`` (eV/Å); ``"forces"`` and upstream's ``"force"`` name the same target
    and either is read when the other is absent.

    Parameters are those of :class:`~matsciml.models.tasks.base.BaseTaskModule`, with:

    task_keys
        ``["forces"]`` (default) or ``["force"]`` (upstream's name).
    loss_func
        Default ``torch.nn.MSELoss`` (upstream's), per component.
    normalize_kwargs
        ``<key>_mean``/``<key>_std`` (``forces_std``, or ``force_std`` for the key ``force``) scale the
        head's output.

    Logged: ``<split>_loss``, ``<split>_total``, ``<split>_<key>`` and
    ``<split>_<key>_mae`` (over every component of every atom).

    Example YAML (experiment config)::

        dataset:
          lips_devset:
            - task: GradFreeForceRegressionTask
              targets: [forces]

    Raises
    ------
    ConfigError
        Both ``force`` and ``forces`` as keys; an encoder without point embeddings.
    DataError
        Missing targets or a wrong shape.
    """

    default_loss = nn.MSELoss
    default_task_keys = ("forces",)
    allowed_task_keys = ("forces", "force")
    metric_kind = REGRESSION

    def _resolve_task_keys(self, task_keys: Any) -> list[str]:
        keys = super()._resolve_task_keys(task_keys)
        if len(keys) != 1:
            raise ConfigError(f"{type(self).__name__}: task_keys {keys} name one target twice; give ['forces']")
        return keys

    def _make_output_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({key: OutputHead(output_dim=3, **self.output_kwargs) for key in self.task_keys})

    def _target_layout(self, key: str) -> str:
        return "one force per atom, [num_nodes, 3]"

    def _target(self, batch: Any, key: str, like: torch.Tensor) -> torch.Tensor:
        targets = batch.get("targets") if isinstance(batch, Mapping) else None
        if isinstance(targets, Mapping) and key not in targets and _ALIASES[key] in targets:
            batch = {**batch, "targets": {**targets, key: targets[_ALIASES[key]]}}
        return super()._target(batch, key, like)

    def _raw_predictions(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        embeddings = self.encoder(batch)
        points = embeddings.point_embedding if isinstance(embeddings, Embeddings) else None
        if points is None:
            raise ConfigError(
                f"{type(self.encoder).__name__} gives no point (per-atom) embedding; GradFreeForceRegressionTask "
                "predicts one force per atom from Embeddings.point_embedding"
            )
        if points.dim() > 2:
            dims = tuple(range(1, points.dim() - 1))
            reduce = self.embedding_reduction_type
            points = {"mean": points.mean, "sum": points.sum, "max": points.amax}[reduce](dim=dims)
        return {key: self.output_heads[key](points) for key in self.task_keys}, embeddings
