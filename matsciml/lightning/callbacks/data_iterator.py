"""``PeriodicDataIteratorCallback``: inference over a named dataset every n epochs/updates/samples.

The inference pieces live in :mod:`matsciml.lightning.callbacks._utils.inference`
(``BestMetricTracker`` uses them too):

* :func:`shard_indices`: the dataset indices a rank evaluates, padded like
  :class:`torch.utils.data.DistributedSampler` (``shuffle=False``) or not;
* :func:`evaluation_mode` and :func:`call_with_eval_weights`: evaluation mode, no
  gradients, and the EMA weights when the EMA callback is on;
* :func:`run_inference`: one pass of this rank's share, ``[(dataset indices, output), ...]``;
* :func:`gather_in_order`: every rank's outputs, split per sample, in dataset order,
  padding removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.periodic import IntervalType, PeriodicCallback, infer_batch_size
from matsciml.lightning.callbacks._utils.inference import (
    gather_in_order,
    run_inference,
)

__all__ = ["PeriodicDataIteratorCallback"]


# ---------------------------------------------------------------------------- the callback
def _atom_counts(batch: Any) -> list[int] | None:
    natoms = batch.get("natoms") if isinstance(batch, Mapping) else None
    if natoms is not None:
        return [int(n) for n in torch.as_tensor(natoms).reshape(-1).tolist()]
    try:
        from matsciml.common.graph import get_graph, num_nodes_per_graph

        return [int(n) for n in num_nodes_per_graph(get_graph(batch)).reshape(-1).tolist()]
    except Exception:  # noqa: BLE001 - not a graph batch
        return None


class PeriodicDataIteratorCallback(PeriodicCallback):
    """Every n epochs/updates/samples, run inference over a named dataset and process the results.

    On each period the callback:

    1. takes ``trainer.datamodule.datasets[dataset]`` (a key of
       :attr:`MatSciMLDataModule.datasets <matsciml.lightning.MatSciMLDataModule.datasets>`:
       ``"train"``, ``"val"``, ``"test"`` or a name of ``extra_datasets``) and shards it
       over the ranks like ``DistributedSampler(shuffle=False)`` (every rank the same
       number of samples; the last few padded with repeats), batches of ``batch_size`` in
       file order with the data module's collate function and workers;
    2. for each batch, in evaluation mode without gradients and with the EMA weights when
       :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback` is on
       (substituted without touching the raw weights; ``use_ema=False`` to use the raw
       ones), computes ``predictions = self.predict(pl_module, batch)`` (default
       ``pl_module(batch)``, the task protocol's ``forward``) and calls
       :meth:`process_data` ``(batch, predictions)``;
    3. gathers every rank's per-batch results, splits them per sample, drops the padded
       repeats and orders them as the dataset is ordered; the training mode of every
       submodule is restored;
    4. calls :meth:`process_results` once, on every rank, with the same results.

    The results of a run on several processes equal those of one process (up to the
    floating-point effects of different batch compositions).

    What :meth:`process_data` returns, per batch (``None`` = nothing): a tensor with one
    row per sample, a mapping of such entries, or a list with one entry per sample. What
    :meth:`process_results` receives: the same structure over the whole dataset, with
    tensors of equal shape stacked to ``[num_samples, ...]`` and everything else (per-atom
    tensors of structures of different sizes, strings) as lists of ``num_samples`` entries.

    The default :meth:`process_data` returns the predictions per structure:
    ``{"ids": [...], key: ...}`` where a prediction with one row per structure stays a
    tensor and a per-atom prediction (``forces``, ``[num_atoms, 3]``) is split into one
    tensor per structure. The default :meth:`process_results` stores the results in
    :attr:`results`; subclasses override it (write a file, log a metric).

    Hooks it acts in: those of :class:`~matsciml.lightning.callbacks._base.periodic.PeriodicCallback`.

    Example::

        class WriteTestPredictions(PeriodicDataIteratorCallback):
            def process_results(self, results, *, trainer, pl_module, interval_type, interval):
                if trainer.is_global_zero:
                    torch.save(results, f"predictions-{interval_type}{interval}.pt")

    and from YAML::

        callbacks:
          - kind: mypackage.callbacks.WriteTestPredictions
            dataset: test
            every_n_epochs: 5
            batch_size: 64

    Parameters
    ----------
    dataset
        Name of the dataset in the data module's ``datasets``.
    batch_size
        Structures per inference batch; ``None`` (default) uses the data module's.
    use_ema
        Use the EMA weights when the EMA callback is on (default ``True``).
    **periodic
        The arguments of :class:`~matsciml.lightning.callbacks._base.periodic.PeriodicCallback`,
        passed on unchanged: the period (exactly one of ``every_n_epochs``,
        ``every_n_updates``, ``every_n_samples``), ``name``, ``on_error``,
        ``error_checkpoint``.

    Raises
    ------
    ConfigError
        Bad period (construction); at the first period: no data module with
        ``datasets``, no dataset of that name (the closest names are listed), no batch size.
    ValueError
        :meth:`process_data` returned something that cannot be split per sample.
    """

    def __init__(self, dataset: str, *, batch_size: int | None = None, use_ema: bool = True, **periodic: Any) -> None:
        super().__init__(**periodic)
        if not isinstance(dataset, str) or not dataset:
            raise ConfigError(f"{type(self).__name__}: dataset={dataset!r} must be a dataset name such as 'test'")
        check_int(batch_size, "batch_size", type(self).__name__, optional=True)
        self.dataset = dataset
        self.batch_size = batch_size
        self.use_ema = bool(use_ema)
        self.results: Any = None

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {"dataset": self.dataset, **super().state_key_fields()}

    # ------------------------------------------------------------------ what subclasses write
    def predict(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Predictions for ``batch`` (default ``pl_module(batch)``)."""
        return pl_module(batch)

    def process_data(self, batch: Any, predictions: Any) -> Any:
        """Per-sample results of one batch (see the class docstring); default: the predictions per structure."""
        if not isinstance(predictions, Mapping):
            return predictions
        size = infer_batch_size(batch)
        out: dict[str, Any] = {}
        if isinstance(batch, Mapping) and isinstance(batch.get("ids"), list | tuple):
            out["ids"] = list(batch["ids"])
        counts: list[int] | None = None
        for key, value in predictions.items():
            if not isinstance(value, Tensor):
                out[key] = value
                continue
            value = value.detach()
            if value.dim() > 0 and value.shape[0] == size:
                out[key] = value
                continue
            counts = counts if counts is not None else _atom_counts(batch)
            if counts is not None and value.dim() > 0 and value.shape[0] == sum(counts):
                out[key] = list(torch.split(value, counts))
            else:
                raise ValueError(
                    f"{type(self).__name__}.process_data: prediction {key!r} has shape {tuple(value.shape)}, neither "
                    f"one row per structure ({size}) nor one per atom ({sum(counts) if counts else 'unknown'}); "
                    f"override process_data"
                )
        return out

    def process_results(
        self,
        results: Any,
        *,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        interval_type: IntervalType,
        interval: int,
    ) -> None:
        """Use the gathered results (every rank gets the same); default: keep them in :attr:`results`."""
        self.results = results

    # ------------------------------------------------------------------ the periodic action
    def iterate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """One inference pass over the dataset on all ranks; the gathered, ordered results."""
        owner = type(self).__name__

        def step(batch: Any, batch_idx: int) -> Any:
            return self.process_data(batch, self.predict(pl_module, batch))

        records, num_items = run_inference(
            trainer, pl_module, self.dataset, step, self.batch_size, pad=True, use_ema=self.use_ema, owner=owner
        )
        return gather_in_order(trainer, records, num_items, where=f"{owner}.process_data")

    @override
    def periodic(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, interval_type: IntervalType, interval: int
    ) -> None:
        results = self.iterate(trainer, pl_module)
        self.process_results(
            results, trainer=trainer, pl_module=pl_module, interval_type=interval_type, interval=interval
        )
