"""Inference over a named dataset outside Lightning's loops, shared by the evaluation callbacks.

* :func:`shard_indices`: the dataset indices a rank evaluates, padded like
  :class:`torch.utils.data.DistributedSampler` (``shuffle=False``) or not;
* :func:`evaluation_mode` and :func:`call_with_eval_weights`: evaluation mode, no
  gradients, and the evaluation weights (EMA) a callback offers through ``evaluation_weights()``;
* :func:`run_inference`: one pass of this rank's share, ``[(dataset indices, output), ...]``;
* :func:`gather_in_order`: every rank's outputs, split per sample, in dataset order,
  padding removed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from matsciml.common.errors import ConfigError, closest

__all__ = [
    "shard_indices",
    "evaluation_mode",
    "call_with_eval_weights",
    "ema_weights_for",
    "run_inference",
    "gather_in_order",
    "split_per_sample",
    "combine_samples",
    "all_gather_objects",
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
def _weights_provider(trainer: Any) -> Any:
    for callback in getattr(trainer, "callbacks", []) or []:
        if callable(getattr(callback, "evaluation_weights", None)):
            return callback
    return None


def ema_weights_for(trainer: Any, pl_module: nn.Module) -> dict[str, Tensor] | None:
    """The EMA tensors to evaluate with, on the module's devices; ``None`` when not needed.

    The weights come from the first callback of the trainer with an ``evaluation_weights()``
    method (:class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback`
    has one): it returns the tensors to evaluate with, or ``None`` when there is no average
    yet or the module already holds those weights. ``None`` too when no callback offers them.
    """
    provider = _weights_provider(trainer)
    weights = provider.evaluation_weights() if provider is not None else None
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


def all_gather_objects(trainer: Any, obj: Any) -> list[Any]:
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
    for rank_records in all_gather_objects(trainer, local):
        for indices, output in rank_records:
            for index, item in zip(indices, split_per_sample(output, len(indices), where)):
                items.setdefault(index, item)
    if not items:
        return None
    return combine_samples([items[i] for i in sorted(items) if i < num_items])
