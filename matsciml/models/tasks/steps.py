"""Evaluation steps shared by the single- and multi-task modules."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["EvaluationStepsMixin"]


class EvaluationStepsMixin:
    """``validation_step`` and ``test_step`` of a task module, and its embedding statistics.

    The module provides ``compute_losses(batch)``, ``_log_metrics(split, result, batch)``
    and Lightning's ``log``.
    """

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``compute_losses``, then update the ``val_*`` metrics (logged per epoch)."""
        self._log_metrics("val", self.compute_losses(batch), batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``compute_losses``, then update the ``test_*`` metrics (logged per epoch)."""
        self._log_metrics("test", self.compute_losses(batch), batch)

    def _log_updated(self, split: str, logged: dict[str, Any], batch_size: Any) -> None:
        """Log the metrics that ``TaskMetrics.update`` returned (per step in training, per epoch always).

        Parameters
        ----------
        split
            ``"train"``, ``"val"`` or ``"test"``; ``{split}_loss`` goes to the progress bar.
        logged
            ``{name: metric}`` from :meth:`~matsciml.models.tasks.metrics.TaskMetrics.update`.
        batch_size
            Batch size given to ``log``.
        """
        for name, metric in logged.items():
            self.log(
                name,
                metric,
                on_step=split == "train",
                on_epoch=True,
                prog_bar=name == f"{split}_loss",
                batch_size=batch_size,
            )

    def _log_embedding_stats(self, prefix: str, system: torch.Tensor, batch_size: Any) -> None:
        """Log the mean and standard deviation of the system embeddings as ``{prefix}_embedding_mean/std``.

        Parameters
        ----------
        prefix
            Start of the logged names (``"train"``, ``"train_<dataset>"``).
        system
            Detached system embeddings ``[num_graphs, embedding_dim]``.
        batch_size
            Batch size given to ``log``.
        """
        self.log(f"{prefix}_embedding_mean", system.mean(), on_step=True, on_epoch=False, batch_size=batch_size)
        self.log(f"{prefix}_embedding_std", system.std(), on_step=True, on_epoch=False, batch_size=batch_size)
