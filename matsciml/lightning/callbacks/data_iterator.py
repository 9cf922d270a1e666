"""``PeriodicDataIteratorCallback``: inference over a named dataset every n epochs/updates/samples.

The pieces are usable on their own (``BestMetricTracker`` uses them):

* :func:`shard_indices`: the dataset indices a rank evaluates, padded like
  :class:`torch.utils.data.DistributedSampler` (``shuffle=False``) or not;
* :func:`evaluation_mode` and :func:`call_with_eval_weights`: evaluation mode, no
  gradients, and the EMA weights when the EMA callback is on;
* :func:`run_inference`: one pass of this rank's share, ``[(dataset indices, output), ...]``;
* :func:`gather_in_order`: every rank's outputs, split per sample, in dataset order,
  padding removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks._base.periodic import IntervalType, PeriodicCallback, infer_batch_size

__all__ = [
    "PeriodicDataIteratorCallback",
    "shard_indices",
    "evaluation_mode",
    "call_with_eval_weights",
    "ema_weights_for",
    "run_inference",
    "gather_in_order",
    "split_per_sample",
    "combine_samples",
]


# ---------------------------------------------------------------------------- sharding
def shard_indices(num_items: int, world_size: int, rank: int, pad: bool = True) -> list[int]:
    """Dataset indices evaluated by ``rank`` of ``world_size``, in file order.

    With ``pad=True`` the list ``0..num_items-1`` is extended by its first entries to a
    multiple of ``world_size`` and rank ``r`` takes every ``world_size``-th entry from
    ``r``: exactly the indices of ``DistributedSampler(shuffle=False, drop_last=False)``,
    so every rank has the same number of samples and a few samples are evaluated twice.
    With ``pad=False`` rank ``r`` takes ``r, r + world_size, ...`` below ``num_items``
    (shares differ by at most one; nothing is evaluated twice).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}")
    indices = list(range(num_items))
    if pad and num_items:
        total = math.ceil(num_items / world_size) * world_size
        while len(indices) < total:
            indices += indices[: total - len(indices)]
    return indices[rank::world_size]


# ---------------------------------------------------------------------------- weights and mode
def _ema_callback(trainer: Any) -> ExponentialMovingAverageCallback | None:
    for callback in getattr(trainer, "callbacks", []) or []:
        if isinstance(callback, ExponentialMovingAverageCallback):
            return callback
    return None


def ema_weights_for(trainer: Any, pl_module: nn.Module) -> dict[str, Tensor] | None:
    """The EMA tensors to evaluate with, on the module's devices; ``None`` when not needed.

    ``None`` when there is no :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback`,
    when it has no average yet, or when the module already holds the EMA weights.
    """
    ema = _ema_callback(trainer)
    if ema is None or ema.holding != "raw":
        return None
    weights = ema.ema_state_dict()
    if not weights:
        return None
    own = pl_module.state_dict(keep_vars=True)
    return {k: v.to(own[k].device) if k in own and v.device != own[k].device else v for k, v in weights.items()}


class _Bound(nn.Module):
    """Holds the module as a child so that ``functional_call`` can substitute its tensors while ``fn`` runs."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(*args)


def call_with_eval_weights(
    trainer: Any, pl_module: nn.Module, fn: Callable[..., Any], *args: Any, use_ema: bool = True
) -> Any:
    """``fn(*args)`` with the EMA weights substituted into ``pl_module`` when the EMA callback is on.

    The substitution uses :func:`torch.func.functional_call`: for the duration of the call
    the module's parameters and buffers *refer* to the EMA tensors; the raw tensors are
    neither copied nor modified, so a checkpoint written meanwhile (e.g. from a signal
    handler) is still right. ``fn`` may call anything on the module (``forward``,
    ``compute_losses``, ``predict_step``).
    """
    weights = ema_weights_for(trainer, pl_module) if use_ema else None
    if weights is None:
        return fn(*args)
    wrapped = _Bound(pl_module, fn)
    return torch.func.functional_call(wrapped, {f"module.{k}": v for k, v in weights.items()}, args)


@contextlib.contextmanager
def evaluation_mode(pl_module: nn.Module) -> Iterator[None]:
    """Evaluation mode and no gradient tracking; each submodule's ``training`` flag is restored afterwards.

    Tasks that need gradients inside (forces as the derivative of the energy) enable them
    themselves, as they do under Lightning's validation loop.
    """
    flags = {m: m.training for m in pl_module.modules()}
    pl_module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags.items():
            module.training = flag


# ---------------------------------------------------------------------------- data
def _dataset_and_loader_options(trainer: Any, name: str, batch_size: int | None, owner: str) -> tuple[Any, dict]:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "datasets"):
        raise ConfigError(
            f"{owner}: dataset={name!r} is looked up in the data module's `datasets`, but the trainer has "
            f"{'no data module' if datamodule is None else type(datamodule).__name__ + ' without `datasets`'}; "
            f"train with trainer.fit(task, datamodule=MatSciMLDataModule(...))"
        )
    try:
        datasets = datamodule.datasets
    except RuntimeError:
        datamodule.setup("fit")
        datasets = datamodule.datasets
    if name not in datasets:
        raise ConfigError(
            f"{owner}: the data module has no dataset {name!r} ({closest(name, list(datasets))}); "
            f"add it with MatSciMLDataModule(extra_datasets={{{name!r}: path}}) or pick another"
        )
    dataset = datasets[name]
    options: dict[str, Any] = {"collate_fn": default_collate, "num_workers": 0, "pin_memory": False}
    template = None
    if callable(getattr(datamodule, "eval_dataloader", None)):
        template = datamodule.eval_dataloader(name, batch_size=batch_size)
        options = {
            "collate_fn": template.collate_fn,
            "num_workers": template.num_workers,
            "pin_memory": template.pin_memory,
        }
        batch_size = batch_size if batch_size is not None else template.batch_size
    if batch_size is None:
        raise ConfigError(f"{owner}: give batch_size (the data module {type(datamodule).__name__} does not set one)")
    options["batch_size"] = int(batch_size)
    return dataset, options


def run_inference(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataset: str,
    fn: Callable[[Any, int], Any],
    batch_size: int | None = None,
    pad: bool = True,
    use_ema: bool = True,
    owner: str = "run_inference",
) -> tuple[list[tuple[list[int], Any]], int]:
    """Run ``fn(batch, batch_idx)`` over this rank's share of the data module's dataset ``dataset``.

    Batches are in file order (:func:`shard_indices`), moved to the module's device with
    ``pl_module.transfer_batch_to_device``, and ``fn`` runs under :func:`evaluation_mode`
    with the EMA weights when the EMA callback is on (:func:`call_with_eval_weights`).

    Parameters
    ----------
    trainer, pl_module
        The running trainer and module.
    dataset
        Key into ``trainer.datamodule.datasets``.
    fn
        ``fn(batch, batch_idx) -> output``; ``None`` outputs are dropped.
    batch_size
        Structures per batch; ``None`` takes the data module's.
    pad
        Pad the shards like ``DistributedSampler`` (equal work per rank) or not.
    use_ema
        Evaluate with the EMA weights when the EMA callback is on (default ``True``).
    owner
        Name used in error messages.

    Returns
    -------
    tuple
        ``([(dataset indices of the batch, output), ...], len(dataset))`` for this rank.

    Raises
    ------
    ConfigError
        No data module with ``datasets``, no such dataset, or no batch size.
    """
    data, options = _dataset_and_loader_options(trainer, dataset, batch_size, owner)
    indices = shard_indices(len(data), int(trainer.world_size), int(trainer.global_rank), pad=pad)
    size = options["batch_size"]
    # an own generator: creating the iterator must not draw from the global RNG (training would change)
    loader = DataLoader(data, sampler=indices, shuffle=False, generator=torch.Generator().manual_seed(0), **options)
    records: list[tuple[list[int], Any]] = []
    with evaluation_mode(pl_module):
        for batch_idx, batch in enumerate(loader):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            output = call_with_eval_weights(trainer, pl_module, fn, batch, batch_idx, use_ema=use_ema)
            if output is not None:
                records.append((indices[batch_idx * size : (batch_idx + 1) * size], output))
    return records, len(data)


# ---------------------------------------------------------------------------- per-sample results
def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def split_per_sample(output: Any, num_samples: int, where: str = "process_data") -> list[Any]:
    """Split one batch's output into ``num_samples`` per-sample items.

    A tensor is split along its first dimension (which must be ``num_samples``); a
    mapping key by key (giving one mapping per sample); a list or tuple must have one
    entry per sample.

    Raises
    ------
    ValueError
        A tensor or sequence of the wrong length, or another type.
    """
    if isinstance(output, Tensor):
        if output.dim() == 0 or output.shape[0] != num_samples:
            raise ValueError(
                f"{where} returned a tensor of shape {tuple(output.shape)} for a batch of {num_samples} samples; "
                f"return one row per sample (first dimension {num_samples}) or a list with one entry per sample"
            )
        return list(output.unbind(0))
    if isinstance(output, Mapping):
        parts = {k: split_per_sample(v, num_samples, f"{where}[{k!r}]") for k, v in output.items()}
        return [{k: parts[k][i] for k in parts} for i in range(num_samples)]
    if isinstance(output, list | tuple):
        if len(output) != num_samples:
            raise ValueError(
                f"{where} returned a {type(output).__name__} of length {len(output)} for a batch of "
                f"{num_samples} samples; return one entry per sample"
            )
        return list(output)
    raise ValueError(
        f"{where} returned a {type(output).__name__}; return a tensor with one row per sample, a mapping of "
        f"those, or a list with one entry per sample (or None for nothing)"
    )


def combine_samples(items: Sequence[Any]) -> Any:
    """Inverse of :func:`split_per_sample` over a whole dataset.

    Tensors of one shape and dtype are stacked (``[num_samples, ...]``), mappings are
    combined key by key, anything else (tensors of different shapes, such as per-atom
    forces of structures of different sizes; strings) stays a list.
    """
    if not items:
        return []
    first = items[0]
    if isinstance(first, Tensor) and all(
        isinstance(x, Tensor) and x.shape == first.shape and x.dtype == first.dtype for x in items
    ):
        return torch.stack(list(items))
    if isinstance(first, Mapping) and all(isinstance(x, Mapping) and x.keys() == first.keys() for x in items):
        return {k: combine_samples([x[k] for x in items]) for k in first}
    return list(items)


def _all_gather_objects(trainer: Any, obj: Any) -> list[Any]:
    dist = torch.distributed
    world = int(getattr(trainer, "world_size", 1))
    if world < 2 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(
    trainer: Any, records: list[tuple[list[int], Any]], num_items: int, where: str = "process_data"
) -> Any:
    """Every rank's ``records`` (from :func:`run_inference`), per sample, in dataset order, padding removed.

    Collective: every rank must call it; every rank gets the same result. Each batch
    output is split per sample (:func:`split_per_sample`), the first result of each dataset
    index is kept (the padded copies are dropped) and the items are combined
    (:func:`combine_samples`). Returns ``None`` when no rank produced any result.
    """
    local = []
    for indices, output in records:
        split_per_sample(output, len(indices), where)  # fail here, on the rank at fault, with the message
        local.append((indices, _to_cpu(output)))
    items: dict[int, Any] = {}
    for rank_records in _all_gather_objects(trainer, local):
        for indices, output in rank_records:
            for index, item in zip(indices, split_per_sample(output, len(indices), where)):
                items.setdefault(index, item)
    if not items:
        return None
    return combine_samples([items[i] for i in sorted(items) if i < num_items])


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
    every_n_epochs, every_n_updates, every_n_samples
        The period (exactly one).
    batch_size
        Structures per inference batch; ``None`` (default) uses the data module's.
    use_ema
        Use the EMA weights when the EMA callback is on (default ``True``).
    name, on_error, error_checkpoint
        See :class:`~matsciml.lightning.callbacks._base.periodic.PeriodicCallback`.

    Raises
    ------
    ConfigError
        Bad period (construction); at the first period: no data module with
        ``datasets``, no dataset of that name (the closest names are listed), no batch size.
    ValueError
        :meth:`process_data` returned something that cannot be split per sample.
    """

    def __init__(
        self,
        dataset: str,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        batch_size: int | None = None,
        use_ema: bool = True,
        name: str | None = None,
        on_error: Literal["stop", "continue"] = "stop",
        error_checkpoint: bool = True,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_updates=every_n_updates,
            every_n_samples=every_n_samples,
            name=name,
            on_error=on_error,
            error_checkpoint=error_checkpoint,
        )
        if not isinstance(dataset, str) or not dataset:
            raise ConfigError(f"{type(self).__name__}: dataset={dataset!r} must be a dataset name such as 'test'")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(f"{type(self).__name__}: batch_size={batch_size!r} must be a positive integer or null")
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
