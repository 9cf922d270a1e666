"""Steps shared by the single- and multi-task modules: metric logging, validation, test, embedding statistics.

Logging the task metrics (:meth:`EvaluationStepsMixin._update_metrics`) costs little per
batch: every batch is queued on its metrics (:class:`~matsciml.models.tasks.metrics.TaskMetrics`,
summed when read), and ``LightningModule.log`` -- a millisecond per call in Lightning
2.6, whatever the value -- is called only when Lightning needs the metric object (a
later per-step value of a metric already logged in the epoch goes to Lightning's record
directly, :func:`~matsciml.lightning._compat.refresh_logged_metric`):

* in training, on the steps whose values reach the logger (the trainer's
  ``log_every_n_steps``), with the value of that batch alone (logged as
  ``train_*_step``), and the first time a metric is updated in an epoch (so that
  Lightning computes its ``train_*_epoch`` value, and resets it, at the end of the epoch);
* in validation and test, the first time a metric is updated in an epoch (per
  dataloader); Lightning computes the epoch value from the whole accumulated state.

The logger receives the same ``train_*_step``, ``train_*_epoch``, ``val_*`` and ``test_*``
values as when every batch is logged, under the same names; callbacks see the same names.
"""

from __future__ import annotations

from typing import Any

import torch

from matsciml.lightning._compat import logs_at_this_step, refresh_logged_metric

__all__ = ["EvaluationStepsMixin"]


class EvaluationStepsMixin:
    """``validation_step``, ``test_step``, the metric logging of every step, and embedding statistics.

    The module provides ``compute_losses(batch)``, ``_metric_targets(batch, result)``
    (``{metric key: target in data units}``), a ``task_metrics``
    (:class:`~matsciml.models.tasks.metrics.TaskMetrics`) and Lightning's ``log``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_current_fx_name":
            # Lightning sets the hook name around every hook call, some forty times a training step;
            # it is a plain string, never a parameter, buffer or submodule: skip nn.Module's checks
            self.__dict__[name] = value
            return
        super().__setattr__(name, value)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping (``Trainer(gradient_clip_val=...)``); without it, return at once.

        Lightning calls this hook before every optimizer step; its default checks and
        converts the (absent) settings before finding nothing to do.
        """
        if not gradient_clip_val and not getattr(self._trainer, "gradient_clip_val", None):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``compute_losses``, then update the ``val_*`` metrics (logged per epoch)."""
        self._log_metrics("val", self.compute_losses(batch), batch, batch_idx, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """``compute_losses``, then update the ``test_*`` metrics (logged per epoch)."""
        self._log_metrics("test", self.compute_losses(batch), batch, batch_idx, dataloader_idx)

    def _log_metrics(
        self, split: str, result: dict[str, Any], batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> None:
        """Update the metrics of ``split`` with one batch and log what Lightning needs now (see the module docs)."""
        self._update_metrics(split, result, self._metric_targets(batch, result), batch_idx, dataloader_idx)

    def _update_metrics(
        self,
        split: str,
        result: dict[str, Any],
        targets: dict[str, torch.Tensor],
        batch_idx: int = 0,
        dataloader_idx: int = 0,
    ) -> None:
        """Queue the batch on the metrics of ``split``; hand to ``log`` those Lightning needs at this step.

        Parameters
        ----------
        split
            ``"train"``, ``"val"`` or ``"test"``.
        result
            The output of ``compute_losses``.
        targets
            ``{metric key: target}`` in data units.
        batch_idx, dataloader_idx
            Position of the batch in its epoch and dataloader: ``batch_idx == 0`` starts an
            epoch (the training metrics are emptied, nothing is logged yet in it).
        """
        registry = getattr(self, "_metrics_logged", None)
        if registry is None:
            registry = self._metrics_logged = {}
        train = split == "train"
        if batch_idx == 0:
            if train:
                self.task_metrics.reset("train")  # nothing left over from an epoch that logged none of them
            registry[(split, dataloader_idx)] = set()
        logged_names = registry.setdefault((split, dataloader_idx), set())
        every = train and logs_at_this_step(self._trainer)
        updated = self.task_metrics.update(split, result, targets, step_values=every)
        if not every:
            new = [name for name in updated if name not in logged_names]
            if not new:
                return
            updated = self.task_metrics.step_values(new)
        logged_names.update(updated)
        self._log_updated(split, updated, result["batch_size"])

    def _log_updated(self, split: str, logged: dict[str, Any], batch_size: Any) -> None:
        """Hand the metrics to ``log`` (per step and per epoch in training, per epoch otherwise).

        Parameters
        ----------
        split
            ``"train"``, ``"val"`` or ``"test"``; ``{split}_loss`` goes to the progress bar.
        logged
            ``{name: metric}`` from :class:`~matsciml.models.tasks.metrics.TaskMetrics`.
        batch_size
            Batch size given to ``log``.
        """
        train = split == "train"
        for name, metric in logged.items():
            if train and refresh_logged_metric(self, name, metric):
                continue  # logged earlier in this epoch: Lightning only needs the new per-step value
            self.log(
                name,
                metric,
                on_step=train,
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
