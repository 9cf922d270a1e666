"""Gradients, parameters and batches as the monitors see them (no Lightning imports).

:func:`optimizer_parameters`, :func:`skip_optimizer_step`, :func:`tensor_norms`,
:func:`combine_norms`, :func:`batch_ids` and :func:`ids_text`, and the error monitors raise,
:class:`TrainingFaultError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from matsciml.common.errors import MatSciMLError

__all__ = [
    "TrainingFaultError",
    "optimizer_parameters",
    "skip_optimizer_step",
    "batch_ids",
    "ids_text",
    "tensor_norms",
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
    if isinstance(batch, Mapping):
        ids = batch.get("ids")
        if ids is not None and not isinstance(ids, (str, Tensor)):
            return [str(i) for i in ids]
    return []


def tensor_norms(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """Norm of each tensor, as one float32 vector ``[len(tensors)]`` on the first tensor's device.

    Uses one fused ``torch._foreach_norm`` per (device, dtype) group and no host-device
    synchronisation.
    """
    if not tensors:
        return torch.zeros(0)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    device = tensors[0].device
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for indices in groups.values():
        norms = torch._foreach_norm([tensors[i] for i in indices], norm_type)
        values = torch.stack(norms).to(device=device, dtype=torch.float32)
        out[torch.tensor(indices, device=device)] = values
    return out


def combine_norms(norms: Tensor, norm_type: float) -> Tensor:
    """The ``norm_type`` norm of a vector of norms (the norm of the concatenated tensors)."""
    """Total norm from per-tensor norms."""
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
