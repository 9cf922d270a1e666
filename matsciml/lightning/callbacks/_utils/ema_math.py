"""Tensor math of the weight EMA: warm-up schedules and fused in-place updates.

Everything here is a small function of Python floats or lists of tensors, with no
Lightning import, so that it can be tested and benchmarked on its own. The decay is
always a Python float computed on the host: no update reads a value back from the
accelerator.

Warm-up schedules (``n`` is the number of the update being made, 1 for the first)::

    "none":         d_n = decay
    "torch_ema":    d_n = min(decay, (1 + n) / (10 + n))
    "exponential":  d_n = decay * (1 - exp(-n / decay_tau))

and one update is ``ema <- d_n * ema + (1 - d_n) * current``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from matsciml.common.errors import ConfigError, closest

__all__ = ["WARMUPS", "check_warmup", "effective_decay", "ema_update_", "copy_", "is_averaged"]

WARMUPS = ("none", "torch_ema", "exponential")


def check_warmup(warmup: str) -> str:
    """Return ``warmup`` if it names a schedule, else raise :class:`ConfigError`."""
    if warmup not in WARMUPS:
        raise ConfigError(f"warmup={warmup!r} is not a warm-up schedule; {closest(str(warmup), WARMUPS)}")
    return warmup


def effective_decay(decay: float, num_updates: int, warmup: str = "none", decay_tau: float = 2000.0) -> float:
    """The decay used by update number ``num_updates`` (1 for the first update).

    Parameters
    ----------
    decay
        Target decay in ``[0, 1]``.
    num_updates
        Number of the update being made, counting this one (``>= 1``). ``torch-ema``
        counts the same way (it increments its counter before computing the decay).
    warmup
        ``"none"``, ``"torch_ema"`` or ``"exponential"`` (see the module docstring).
    decay_tau
        Time constant of the ``"exponential"`` warm-up, in updates.

    Returns
    -------
    float
        The decay ``d_n`` as a Python float (never a tensor: no device synchronisation).
    """
    if warmup == "none":
        return float(decay)
    if warmup == "torch_ema":
        return min(float(decay), (1.0 + num_updates) / (10.0 + num_updates))
    if warmup == "exponential":
        return float(decay) * (1.0 - math.exp(-num_updates / float(decay_tau)))
    check_warmup(warmup)
    raise AssertionError("unreachable")


def is_averaged(tensor: Tensor) -> bool:
    """Floating-point and complex tensors are averaged; integer and boolean ones are copied."""
    return tensor.is_floating_point() or tensor.is_complex()


@torch.no_grad()
def ema_update_(averaged: Sequence[Tensor], current: Sequence[Tensor], decay: float) -> None:
    """In place: ``averaged[i] <- decay * averaged[i] + (1 - decay) * current[i]`` for all ``i``.

    One fused ``torch._foreach_lerp_`` call over the whole list (one kernel launch per
    chunk of tensors on an accelerator, no Python loop over tensors). The lists should
    hold tensors of one device and dtype each for the fused path; mixed lists still
    work, through PyTorch's per-tensor fallback.

    Parameters
    ----------
    averaged
        The running averages, modified in place.
    current
        The current values, same shapes, devices and dtypes as ``averaged``.
    decay
        Decay as a Python float in ``[0, 1]``: ``1`` leaves ``averaged`` unchanged and
        ``0`` copies ``current``.
    """
    if not averaged:
        return
    if decay == 1.0:
        return
    if decay == 0.0:
        torch._foreach_copy_(list(averaged), list(current))
        return
    torch._foreach_lerp_(list(averaged), list(current), 1.0 - float(decay))


@torch.no_grad()
def copy_(destination: Sequence[Tensor], source: Sequence[Tensor]) -> None:
    """In place: ``destination[i] <- source[i]`` for all ``i``, in one fused call (no allocation).

    The two lists may be on different devices (an EMA kept on the host for a model on an
    accelerator); should the fused copy refuse a pairing, the tensors are copied one by one.
    """
    if not destination:
        return
    try:
        torch._foreach_copy_(list(destination), list(source))
    except RuntimeError:
        if all(d.device == s.device for d, s in zip(destination, source)):
            raise
        for d, s in zip(destination, source):
            d.copy_(s)
