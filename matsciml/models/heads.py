"""Output heads: small MLPs that turn embeddings into predictions.

A task builds one :class:`OutputHead` per target from its ``output_kwargs``. The
arguments are the upstream ones, so model YAMLs keep working::

    output_kwargs:
      lazy: false
      input_dim: 128          # defaults to the encoder's embedding_dim
      hidden_dim: 128
      num_hidden: 2
      activation: torch.nn.SiLU
      norm:
        class_path: torch.nn.LayerNorm
        init_args: {normalized_shape: 128}
      dropout: 0.0
      residual: true

Activations and normalisation layers may be given as a dotted import path
(``"torch.nn.SiLU"``), a bare ``torch.nn`` name (``"SiLU"``, ``"silu"``), a class, a
``class_path``/``init_args`` mapping or a module instance (copied into every block).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from matsciml.common.config import instantiate, is_spec, resolve_class
from matsciml.common.errors import ConfigError, closest

__all__ = ["OutputBlock", "OutputHead", "build_activation", "build_norm"]

ModuleSpec = Any  # str | type[nn.Module] | dict | nn.Module | None


def _resolve_module_class(name: str, where: str) -> Any:
    """Resolve ``name``: a dotted path, or a bare (case-insensitive) ``torch.nn`` class name."""
    if "." in name:
        return resolve_class(name, where)
    names = {n.lower(): n for n in dir(nn) if isinstance(getattr(nn, n), type)}
    if name.lower() in names:
        return getattr(nn, names[name.lower()])
    raise ConfigError(
        f"{where}: {name!r} is neither a dotted import path nor a torch.nn class; {closest(name, names.values())}"
    )


def build_activation(spec: ModuleSpec, where: str = "activation") -> nn.Module:
    """Build an activation module from a spec.

    Parameters
    ----------
    spec
        ``None`` (identity), a dotted path or bare ``torch.nn`` name, a class, a
        ``class_path`` mapping, or a module instance (deep-copied).
    where
        Name of the argument, used in error messages.

    Raises
    ------
    ConfigError
        The spec cannot be resolved or does not give an ``nn.Module``.
    """
    if spec is None:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    if isinstance(spec, str):
        spec = _resolve_module_class(spec, where)
    if is_spec(spec):
        module = instantiate(spec, where)
    elif isinstance(spec, type):
        module = spec()
    else:
        raise ConfigError(f"{where}: expected a module class, its import path or a class_path mapping, got {spec!r}")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: {spec!r} did not give a torch.nn.Module but {type(module).__name__}")
    return module


def _norm_width(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return int(shape[-1]) if isinstance(shape, (tuple, list)) else int(shape)
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def build_norm(spec: ModuleSpec, width: int, where: str = "norm") -> nn.Module:
    """Build a normalisation layer acting on features of size ``width``.

    A class or import path without arguments is called as ``cls(width)`` (so
    ``norm: torch.nn.LayerNorm`` works); a ``class_path`` mapping is instantiated as
    written, and ``cls(width)`` is used when it has no ``init_args``.

    Raises
    ------
    ConfigError
        The spec cannot be resolved, or the layer normalises a different width.
    """
    if spec is None or spec is False:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        module = copy.deepcopy(spec)
    else:
        if isinstance(spec, str):
            spec = _resolve_module_class(spec, where)
        if is_spec(spec) and spec.get("init_args"):
            module = instantiate(spec, where)
        elif is_spec(spec):
            module = resolve_class(spec.get("class_path") or spec.get("class_instance"), where)(width)
        elif isinstance(spec, type):
            module = spec(width)
        else:
            raise ConfigError(
                f"{where}: expected a module class, its import path or a class_path mapping, got {spec!r}"
            )
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{where}: {spec!r} did not give a torch.nn.Module but {type(module).__name__}")
    found = _norm_width(module)
    if found is not None and found != width:
        raise ConfigError(
            f"{where}: {type(module).__name__} normalises {found} features but the head's hidden layers have "
            f"{width} (hidden_dim); make them equal"
        )
    return module


class OutputBlock(nn.Module):
    """One head layer: ``Linear -> activation -> norm -> dropout`` (+ input when residual).

    Parameters
    ----------
    output_dim
        Output features.
    input_dim
        Input features; ignored when ``lazy`` (``torch.nn.LazyLinear`` infers it).
    activation, norm
        Module specs (see :func:`build_activation`, :func:`build_norm`).
    dropout
        Dropout probability after the normalisation, default 0.
    residual
        Add the block input to its output; needs ``input_dim == output_dim``.
    lazy
        Use a ``LazyLinear`` input layer.
    bias
        Bias in the linear layer, default True.

    Raises
    ------
    ConfigError
        ``input_dim`` missing for a non-lazy block, or a residual block whose input and
        output widths differ.
    """

    def __init__(
        self,
        output_dim: int,
        input_dim: int | None = None,
        activation: ModuleSpec = None,
        norm: ModuleSpec = None,
        dropout: float = 0.0,
        residual: bool = False,
        lazy: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if lazy:
            self.linear = nn.LazyLinear(output_dim, bias=bias)
        else:
            if not input_dim:
                raise ConfigError("output_kwargs: a non-lazy output head needs input_dim (or set lazy: true)")
            self.linear = nn.Linear(int(input_dim), output_dim, bias=bias)
        if residual and (lazy or int(input_dim) != output_dim):
            raise ConfigError(
                f"output_kwargs.residual: a residual block needs equal input and output widths, got "
                f"{input_dim} -> {output_dim}"
            )
        self.activation = build_activation(activation)
        self.norm = build_norm(norm, output_dim)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.residual = bool(residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``[..., input_dim]``; returns ``[..., output_dim]``."""
        out = self.dropout(self.norm(self.activation(self.linear(x))))
        return out + x if self.residual else out


class OutputHead(nn.Module):
    """An MLP from an embedding to ``output_dim`` numbers.

    Layout: an input block ``input_dim -> hidden_dim``, ``num_hidden`` blocks
    ``hidden_dim -> hidden_dim`` (residual by default), and a final linear layer
    ``hidden_dim -> output_dim`` followed by ``act_last`` (identity by default). Each
    block is ``Linear -> activation -> norm -> dropout``.

    Parameters
    ----------
    output_dim
        Number of outputs, default 1.
    hidden_dim
        Width of the hidden layers, default 128.
    num_hidden
        Number of hidden ``hidden_dim -> hidden_dim`` blocks, default 1.
    activation
        Activation spec, default ``"torch.nn.SiLU"``. (Upstream's default was the
        identity, which makes the head a linear map; give ``activation: null`` for that.)
    norm
        Normalisation spec applied in every hidden block, default none.
    act_last
        Activation after the final layer, default none.
    input_dim
        Embedding width. Required unless ``lazy``; tasks fill it from the encoder's
        ``embedding_dim``.
    lazy
        Infer ``input_dim`` at the first forward (``LazyLinear``), default False. Lazy
        parameters only exist after one forward pass: run one batch before building an
        optimizer over them, and before wrapping the model for distributed training.
    dropout
        Dropout probability in the hidden blocks, default 0.
    residual
        Residual connections in the ``hidden_dim -> hidden_dim`` blocks, default True.
    bias
        Biases in the linear layers, default True.
    block_type
        Accepted for upstream YAMLs; only ``"OutputBlock"`` (or ``None``) is supported.

    Raises
    ------
    ConfigError
        Bad sizes, an unknown activation/norm, or an unsupported ``block_type``.

    Example::

        head = OutputHead(output_dim=1, hidden_dim=64, input_dim=128, num_hidden=2)
        head(torch.randn(8, 128)).shape  # torch.Size([8, 1])
    """

    def __init__(
        self,
        output_dim: int = 1,
        hidden_dim: int = 128,
        num_hidden: int = 1,
        activation: ModuleSpec = "torch.nn.SiLU",
        norm: ModuleSpec = None,
        act_last: ModuleSpec = None,
        input_dim: int | None = None,
        lazy: bool = False,
        dropout: float = 0.0,
        residual: bool = True,
        bias: bool = True,
        block_type: str | None = None,
    ) -> None:
        super().__init__()
        if block_type not in (None, "OutputBlock") and getattr(block_type, "__name__", None) != "OutputBlock":
            raise ConfigError(
                f"output_kwargs.block_type {block_type!r} is not supported; only 'OutputBlock' (plain MLP) exists here"
            )
        for name, value in (("output_dim", output_dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"output_kwargs.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_hidden, int) or num_hidden < 0:
            raise ConfigError(f"output_kwargs.num_hidden must be an integer >= 0, got {num_hidden!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"output_kwargs.dropout must lie in [0, 1), got {dropout!r}")
        self.lazy = bool(lazy)
        self.input_dim = None if lazy else input_dim
        self.output_dim = output_dim
        blocks = [
            OutputBlock(hidden_dim, input_dim, activation, norm, dropout, residual=False, lazy=lazy, bias=bias),
        ]
        blocks += [
            OutputBlock(hidden_dim, hidden_dim, activation, norm, dropout, residual=residual, bias=bias)
            for _ in range(num_hidden)
        ]
        blocks.append(OutputBlock(output_dim, hidden_dim, act_last, None, 0.0, residual=False, bias=bias))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Map ``embedding`` ``[..., input_dim]`` to ``[..., output_dim]``.

        Raises
        ------
        ValueError
            The embedding width differs from ``input_dim``.
        """
        if self.input_dim is not None and embedding.shape[-1] != self.input_dim:
            raise ValueError(
                f"OutputHead expects embeddings of width {self.input_dim} (output_kwargs.input_dim) but got "
                f"{embedding.shape[-1]}; set input_dim to the encoder's embedding_dim"
            )
        return self.blocks(embedding)
