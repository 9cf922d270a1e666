"""Upstream encoders this toolkit does not provide, registered so that configs naming them fail clearly.

* ``FAENet``: the ``faenet`` package (0.1.3, 2023) imports ``torch_scatter``, a compiled
  extension whose last release (2.1.2, 2023) has no build for the torch versions this toolkit
  runs on, so it cannot be wrapped.
* ``GalaPotential``: upstream's own geometric-algebra attention network on DGL, not maintained as
  a library anywhere.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.registry import register_encoder

__all__ = ["FAENet", "GalaPotential"]

_INSTEAD = "use E3NNEncoder, MACEWrapper or TensorNet (equivariant) or M3GNet/CHGNet (invariant) instead"


@register_encoder
class FAENet(nn.Module):
    """Not available: always raises :class:`ConfigError` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "FAENet is not available: the faenet package needs torch_scatter, which has no build for this "
            f"torch; {_INSTEAD}"
        )


@register_encoder
class GalaPotential(nn.Module):
    """Not available: always raises :class:`ConfigError` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "GalaPotential is not available: it was Open MatSciML Toolkit's own DGL model and no maintained "
            f"library provides it; {_INSTEAD}"
        )
