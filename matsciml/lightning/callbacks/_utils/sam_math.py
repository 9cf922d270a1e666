"""Tensor math of sharpness-aware minimisation (SAM / ASAM), free of Lightning.

The functions work on lists of tensors with fused ``torch._foreach_*`` kernels, so the cost of a
perturbation is a handful of passes over the parameters whatever their number (a per-parameter
Python loop launches several kernels per tensor).

Algorithm (Foret et al. 2021, arXiv:2010.01412; adaptive variant: Kwon et al. 2021, arXiv:2102.11600),
with ``g`` the gradient at the weights ``w``::

    n = || (|w| if adaptive else 1) * g ||_2          over all tensors together
    e = rho * (w**2 if adaptive else 1) * g / (n + eps)
    w <- w + e

The original weights are kept in a :class:`WeightBackup` and copied back afterwards (never restored
by subtracting ``e``, which would not give the same bits back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DEFAULT_EPS", "global_norm", "perturb_", "restore_", "WeightBackup", "all_finite"]

DEFAULT_EPS = 1e-12
"""Added to the gradient norm before dividing by it (as in the reference implementations)."""


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` taken together, as a 0-dim tensor.

    Parameters
    ----------
    tensors
        Tensors of any shapes; all on one device for the fast path (several devices work too).

    Returns
    -------
    Tensor
        ``sqrt(sum_i ||t_i||^2)``, 0-dim, on the device of the first tensor; ``0.0`` for an empty list.
        Non-finite entries give a non-finite norm.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    norms = torch._foreach_norm(list(tensors), 2)
    first = norms[0]
    if any(n.device != first.device or n.dtype != first.dtype for n in norms):
        norms = [n.to(device=first.device, dtype=torch.float64) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def all_finite(*norms: Tensor) -> bool:
    """True when every 0-dim tensor in ``norms`` is finite (one host synchronisation in all)."""
    device = norms[0].device
    flags = torch.stack([torch.isfinite(n.detach()).to(device) for n in norms])
    return bool(flags.all().item())


class WeightBackup:
    """A reusable copy of a list of tensors (the weights before a perturbation).

    The buffers are allocated on first use and kept, so a step costs one fused copy instead of an
    allocation; they are reallocated when the list of tensors changes (other tensors, shapes or
    dtypes).
    """

    def __init__(self) -> None:
        self._keys: list[tuple[int, torch.Size, torch.dtype, torch.device]] = []
        self._buffers: list[Tensor] = []

    def save(self, params: Sequence[Tensor]) -> None:
        """Copy ``params`` into the backup buffers."""
        keys = [(id(p), p.shape, p.dtype, p.device) for p in params]
        if keys != self._keys:
            self._buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
            self._keys = keys
        if params:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, [p.detach() for p in params])

    def restore(self, params: Sequence[Tensor]) -> None:
        """Copy the saved values back into ``params`` (the same list that was saved)."""
        keys = [(id(p), p.shape, p.dtype, p.device) for p in params]
        if keys != self._keys:
            raise RuntimeError(
                "WeightBackup.restore got other tensors than the ones saved; the parameter list changed during "
                "the sharpness-aware step"
            )
        restore_(params, self._buffers)

    def clear(self) -> None:
        """Free the buffers."""
        self._keys = []
        self._buffers = []

    @property
    def buffers(self) -> list[Tensor]:
        """The saved tensors (read-only use)."""
        return self._buffers


@torch.no_grad()
def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    adaptive: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Move ``params`` to ``w + e(w)`` in place; ``grads`` are overwritten (they hold scratch values after).

    Parameters
    ----------
    params
        The weights ``w``, modified in place.
    grads
        The gradients ``g`` at ``w``, same shapes as ``params``. Their content is destroyed (the caller
        zeroes them before the second backward pass).
    rho
        Radius of the neighbourhood (> 0).
    adaptive
        ASAM: scale by ``|w|`` in the norm and by ``w**2`` in the perturbation.
    eps
        Added to the norm before dividing.

    Returns
    -------
    grad_norm, perturbation_norm
        0-dim tensors: ``n`` as defined in the module docstring (the plain gradient norm when not
        adaptive) and ``||e||_2``. Nothing is synchronised with the host.
    """
    params = list(params)
    grads = list(grads)
    if not params:
        zero = torch.zeros(())
        return zero, zero
    if adaptive:
        # |w| * g has the same norm as w * g; build e = rho * w * (w * g) / (n + eps) in the gradient
        # tensors themselves (no allocation)
        torch._foreach_mul_(grads, params)
        n = global_norm(grads)
        scale = rho / (n + eps)
        torch._foreach_mul_(grads, params)
        torch._foreach_mul_(grads, scale)
        e_norm = global_norm(grads)
        torch._foreach_add_(params, grads)
        return n, e_norm
    n = global_norm(grads)
    scale = rho / (n + eps)
    torch._foreach_mul_(grads, scale)
    torch._foreach_add_(params, grads)
    return n, scale * n


@torch.no_grad()
def restore_(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy ``saved`` back into ``params`` exactly (one fused copy)."""
    if params:
        torch._foreach_copy_(list(params), list(saved))
