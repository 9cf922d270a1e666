"""Gradients, parameters and batches as the monitors see them (no Lightning imports).

:func:`optimizer_parameters`, :func:`skip_optimizer_step`, :func:`tensor_norms`,
:func:`total_norm`, :func:`combine_norms`, :func:`batch_ids` (:func:`id_source` and :func:`ids_of` when
the ids of every step are kept but rarely read) and :func:`ids_text`, and the error monitors raise,
:class:`TrainingFaultError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors
from torch.optim import Optimizer

from matsciml.common.errors import MatSciMLError

__all__ = [
    "TrainingFaultError",
    "optimizer_parameters",
    "OptimizerParameters",
    "skip_optimizer_step",
    "batch_ids",
    "id_source",
    "ids_of",
    "ids_text",
    "tensor_norms",
    "total_norm",
    "combine_norms",
    "grad_scaler",
]


class TrainingFaultError(MatSciMLError, RuntimeError):
    """A monitor stopped training: the message says what it saw, at which step, and what to do."""


def optimizer_parameters(optimizer: Optimizer) -> list[Tensor]:
    """The parameters an optimizer steps, each once, in the order of its parameter groups."""
    seen: set[int] = set()
    params: list[Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class OptimizerParameters:
    """:func:`optimizer_parameters` of an optimizer, listed again only when its parameter groups change.

    A callback that reads the parameters at every step keeps one; the groups are compared
    by identity and length of their ``params`` lists (adding a group, or a parameter to a
    group, lists them again).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._params: list[Tensor] = []

    def __call__(self, optimizer: Optimizer) -> list[Tensor]:
        key = (id(optimizer), *((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))
        if key != self._key:
            self._params = optimizer_parameters(optimizer)
            self._key = key
        return self._params


def skip_optimizer_step(optimizer: Optimizer) -> None:
    """Make the coming ``optimizer.step()`` leave every weight bitwise unchanged.

    Sets the gradient of every parameter of ``optimizer`` to ``None``. PyTorch optimizers
    skip parameters without a gradient entirely, so neither the gradient update nor
    decoupled weight decay (AdamW) nor momentum moves them, and their per-parameter state
    (Adam's moments and step count) is untouched. Zeroed gradients would not do: AdamW
    would still decay the weights and momentum would still move them.
    """
    for p in optimizer_parameters(optimizer):
        p.grad = None


def batch_ids(batch: Any) -> list[str]:
    """Structure ids of a batch (``batch["ids"]``), or ``[]`` when the batch has none."""
    return ids_of(id_source(batch))


def id_source(batch: Any) -> Any:
    """The batch's ``ids`` sequence itself (no copy), or ``None``: keep it per step, read it with :func:`ids_of`."""
    if isinstance(batch, Mapping):
        ids = batch.get("ids")
        if ids is not None and not isinstance(ids, (str, Tensor)):
            return ids
    return None


def ids_of(*sources: Any) -> list[str]:
    """The ids of one or more :func:`id_source` results, as strings, in order."""
    return [str(i) for source in sources if source is not None for i in source]


def _same_device_and_dtype(tensors: list[Tensor]) -> bool:
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for tensor in tensors:
        if tensor.device != device or tensor.dtype != dtype:
            return False
    return True


def tensor_norms(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """Norm of each tensor, as one float32 vector ``[len(tensors)]`` on the first tensor's device.

    Uses one fused ``torch._foreach_norm`` per (device, dtype) group and no host-device
    synchronisation.
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    if _same_device_and_dtype(tensors):
        return torch.stack(torch._foreach_norm(tensors, norm_type)).to(dtype=torch.float32)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for indices in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in indices], norm_type)
        values = torch.stack(norms).to(device=device, dtype=torch.float32)
        out[torch.tensor(indices, device=device)] = values
    return out


#: Largest number of elements :func:`total_norm` copies into one vector on a CPU (16 MiB of float32).
CONCAT_LIMIT = 1 << 22


def total_norm(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The ``norm_type`` norm of all ``tensors`` together (as if concatenated), a 0-d tensor; no synchronisation.

    The value of :func:`torch.nn.utils.get_total_norm` (to rounding), at less cost: on a
    CPU, tensors of one dtype with at most :data:`CONCAT_LIMIT` elements in all are
    flattened into one vector (one call) and normed (a CPU has no fused multi-tensor norm: one call per
    tensor costs more than the copy for a small model); otherwise, on one device and dtype,
    the norm of the per-tensor norms of one ``torch._foreach_norm`` (a fused kernel on an
    accelerator), without ``get_total_norm``'s grouping; mixed lists go to
    ``get_total_norm``.
    """
    if not tensors:
        return torch.zeros(())
    if _same_device_and_dtype(tensors):
        if tensors[0].device.type == "cpu" and sum([t.numel() for t in tensors]) <= CONCAT_LIMIT:
            return torch.linalg.vector_norm(_flatten_dense_tensors(tensors), norm_type)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, norm_type)), norm_type)
    return nn.utils.get_total_norm(tensors, norm_type, foreach=True)


def combine_norms(norms: Tensor, norm_type: float) -> Tensor:
    """The ``norm_type`` norm of a vector of norms (the norm of the concatenated tensors)."""
    if norms.numel() == 0:
        return norms.new_zeros(())
    if math.isinf(norm_type):
        return norms.max()
    return norms.pow(norm_type).sum().pow(1.0 / norm_type)


def ids_text(ids: list[str], limit: int = 10) -> str:
    """``"batch ids: a, b, ..."`` for messages (at most ``limit`` ids)."""
    if not ids:
        return "batch ids: unknown (the batch has no 'ids')"
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"batch ids: {', '.join(ids[:limit])}{more}"


def grad_scaler(trainer: Any) -> Any:
    """The ``torch.amp.GradScaler`` of 16-bit mixed precision, or ``None`` (no scaling in use)."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None)
