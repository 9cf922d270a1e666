"""Loss functions for the tasks, and the masking of missing (non-finite) targets.

A task's ``loss_func`` is any of: a ``torch.nn`` loss class or instance, its import path
(``"torch.nn.L1Loss"`` or just ``"L1Loss"``), a ``class_path``/``init_args`` mapping, or
a mapping from task key to one of these (one loss per target)::

    loss_func:
      class_path: torch.nn.HuberLoss
      init_args: {delta: 0.1}

Losses are called as ``loss(prediction, target)`` and must reduce to a scalar (a mean
over elements for the metric weighting in :mod:`matsciml.models.tasks.metrics` to be a
global mean).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from matsciml.common.config import instantiate, is_spec, resolve_class
from matsciml.common.errors import ConfigError, closest

__all__ = ["build_loss", "finite_pairs", "masked_loss"]


def build_loss(spec: Any, default: type[nn.Module], where: str = "loss_func") -> nn.Module:
    """Build a loss module.

    Parameters
    ----------
    spec
        ``None`` (use ``default``), a class, an import path or bare ``torch.nn`` name, a
        ``class_path`` mapping, a module instance (used as is) or a plain callable
        ``f(pred, target) -> Tensor`` (wrapped; such a loss cannot be stored in a
        checkpoint's hyperparameters).
    default
        Loss class used when ``spec`` is ``None``.
    where
        Argument name for error messages.

    Raises
    ------
    ConfigError
        The spec cannot be resolved.
    """
    if spec is None:
        return default()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        if "." in spec:
            spec = resolve_class(spec, where)
        else:
            names = [n for n in dir(nn) if n.endswith("Loss")]
            if spec not in names:
                raise ConfigError(f"{where}: {spec!r} is not a torch.nn loss; {closest(spec, names)}")
            spec = getattr(nn, spec)
    if is_spec(spec):
        loss = instantiate(spec, where)
    elif isinstance(spec, type):
        loss = spec()
    elif callable(spec):
        return _FunctionLoss(spec)
    else:
        raise ConfigError(f"{where}: expected a loss class, its import path or a class_path mapping, got {spec!r}")
    if not callable(loss):
        raise ConfigError(f"{where}: {spec!r} did not give a callable loss")
    return loss if isinstance(loss, nn.Module) else _FunctionLoss(loss)


class _FunctionLoss(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.fn(pred, target)


def finite_pairs(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drop the elements whose target is NaN or infinite (a missing label).

    Parameters
    ----------
    pred, target
        Tensors of the same shape.

    Returns
    -------
    tuple
        ``(pred, target, count)``: unchanged tensors when every target is finite, else the
        flattened finite elements; ``count`` is the number of elements kept.
    """
    mask = torch.isfinite(target)
    if bool(mask.all()):
        return pred, target, target.numel()
    return pred[mask], target[mask], int(mask.sum())


def masked_loss(loss_fn: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``loss_fn`` over the elements with a finite target; zero (with gradient) when none is.

    Returns
    -------
    tuple
        ``(loss, count)`` with ``count`` the number of target elements used.
    """
    pred, target, count = finite_pairs(pred, target)
    if count == 0:
        return pred.sum() * 0.0, 0
    return loss_fn(pred, target), count
