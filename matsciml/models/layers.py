"""Small building blocks shared by the encoders.

Everything here is a pure function of tensors or a small module without
knowledge of graphs, so it can be tested on its own:

* :func:`get_activation`: activation modules from config strings (``"relu"``, ``"SiLU"``, ...),
* :func:`build_mlp`: a multilayer perceptron from a list of widths,
* :class:`AtomEmbedding`: a learnable vector per atomic number, with a clear error for unknown elements,
* :class:`BesselBasis` and :class:`PolynomialCutoff`: radial basis and smooth cutoff envelope,
* :func:`scatter_sum`, :func:`scatter_mean`, :func:`scatter_max`, :func:`readout`: per-segment reductions
  (all twice differentiable, as needed for forces by autograd inside a loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from matsciml.common.errors import ConfigError, DataError, closest

__all__ = [
    "ACTIVATIONS",
    "READOUTS",
    "get_activation",
    "build_mlp",
    "AtomEmbedding",
    "BesselBasis",
    "PolynomialCutoff",
    "scatter_sum",
    "scatter_mean",
    "scatter_max",
    "readout",
    "check_readout",
]

#: Activation names accepted in configs (matched case-insensitively, ``_``/``-`` ignored).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mish": nn.Mish,
    "identity": nn.Identity,
}

#: Readout (pooling) names accepted by :func:`readout`; ``"avg"`` is the upstream spelling of ``"mean"``.
READOUTS = ("sum", "mean", "avg", "max")


def get_activation(activation: str | nn.Module | type | None, where: str = "activation") -> nn.Module:
    """Return an activation module from a config value.

    Parameters
    ----------
    activation
        A name such as ``"relu"``, ``"silu"``, ``"SiLU"``, ``"leaky_relu"``, ``"gelu"`` (case and
        ``_``/``-`` ignored), a dotted import path (``"torch.nn.SiLU"``), a module class, a module
        instance (returned as is) or ``None`` (identity).
    where
        Name of the argument, used in error messages.

    Raises
    ------
    ConfigError
        Unknown name; the message lists the closest valid names.
    """
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, type):
        return activation()
    if not isinstance(activation, str):
        raise ConfigError(f"{where}={activation!r}: expected a name such as 'relu' or 'silu'")
    if "." in activation:
        from matsciml.common.config import resolve_class

        return resolve_class(activation, where)()
    key = activation.lower().replace("_", "").replace("-", "")
    if key not in ACTIVATIONS:
        raise ConfigError(f"{where}={activation!r} is not a known activation; {closest(key, ACTIVATIONS)}")
    return ACTIVATIONS[key]()


def build_mlp(
    dims: Sequence[int],
    activation: str | nn.Module | type | None = "silu",
    activate_last: bool = False,
    bias_last: bool = True,
) -> nn.Sequential:
    """Build a multilayer perceptron ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    Parameters
    ----------
    dims
        Layer widths, at least two entries (input and output width).
    activation
        Activation after every hidden layer (see :func:`get_activation`); default ``"silu"``.
    activate_last
        Also apply the activation after the last linear layer (default ``False``).
    bias_last
        Whether the last linear layer has a bias (default ``True``).

    Raises
    ------
    ConfigError
        Fewer than two widths or a non-positive width.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ConfigError(f"MLP widths {dims} must hold at least an input and an output width, all positive")
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = k == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=bias_last or not last))
        if not last or activate_last:
            layers.append(get_activation(activation))
    return nn.Sequential(*layers)


class AtomEmbedding(nn.Module):
    """A learnable vector per atomic number.

    Parameters
    ----------
    num_elements
        Size of the table: atomic numbers ``0 .. num_elements - 1`` are accepted (default 100).
    embedding_dim
        Width of each vector.
    **embedding_kwargs
        Passed on to :class:`torch.nn.Embedding` (e.g. ``max_norm``).

    Raises
    ------
    DataError
        In ``forward``, for an atomic number outside ``0 .. num_elements - 1`` (not checked while
        ``torch.export`` traces the module).
    """

    def __init__(self, num_elements: int, embedding_dim: int, **embedding_kwargs) -> None:
        super().__init__()
        self.num_elements = int(num_elements)
        self.embedding = nn.Embedding(self.num_elements, int(embedding_dim), **embedding_kwargs)

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Embed ``atomic_numbers`` ``[num_nodes]`` into ``[num_nodes, embedding_dim]``.

        The range check reads tensor values, so it is skipped while ``torch.export`` traces
        the model (``torch.compiler.is_exporting()``): an exported program does not check
        its atomic numbers.
        """
        if not torch.compiler.is_exporting() and atomic_numbers.numel():
            lo, hi = int(atomic_numbers.min()), int(atomic_numbers.max())
            if lo < 0 or hi >= self.num_elements:
                bad = hi if hi >= self.num_elements else lo
                raise DataError(
                    f"atomic number {bad} is outside the embedding table (0..{self.num_elements - 1}); "
                    "raise the encoder's number of element embeddings (num_atom_embedding / num_elements)"
                )
        return self.embedding(atomic_numbers.long())


class BesselBasis(nn.Module):
    r"""Radial Bessel basis :math:`\sqrt{2/c}\,\sin(n\pi r/c)/r`, ``n = 1 .. num_basis``.

    Parameters
    ----------
    num_basis
        Number of basis functions (default 8).
    cutoff
        Cutoff radius ``c`` in Å.
    trainable
        Make the frequencies ``n pi / c`` learnable (default ``False``).
    """

    def __init__(self, num_basis: int = 8, cutoff: float = 5.0, trainable: bool = False) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        freqs = torch.arange(1, int(num_basis) + 1, dtype=torch.get_default_dtype()) * math.pi / self.cutoff
        if trainable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)
        self.prefactor = math.sqrt(2.0 / self.cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """Evaluate the basis on distances ``r`` ``[num_edges]`` (Å, > 0): ``[num_edges, num_basis]``."""
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.freqs * r) / r


class PolynomialCutoff(nn.Module):
    r"""Smooth envelope that goes from 1 at ``r = 0`` to 0 at ``r = cutoff``.

    :math:`u(x) = 1 - \frac{(p+1)(p+2)}{2} x^p + p(p+2) x^{p+1} - \frac{p(p+1)}{2} x^{p+2}`
    for :math:`x = r / c < 1` and 0 beyond (Klicpera et al., DimeNet, 2020). Its value and
    first two derivatives vanish at the cutoff, so energies and forces stay continuous when
    a neighbour crosses it.

    Parameters
    ----------
    cutoff
        Cutoff radius ``c`` in Å.
    exponent
        Polynomial exponent ``p`` (default 6).
    """

    def __init__(self, cutoff: float, exponent: int = 6) -> None:
        super().__init__()
        if cutoff <= 0:
            raise ConfigError(f"cutoff={cutoff} must be positive (Å)")
        self.cutoff = float(cutoff)
        self.exponent = int(exponent)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """Evaluate the envelope on distances ``r`` ``[...]`` (Å), same shape."""
        p = self.exponent
        x = r / self.cutoff
        env = 1.0 - (p + 1) * (p + 2) / 2 * x.pow(p) + p * (p + 2) * x.pow(p + 1) - p * (p + 1) / 2 * x.pow(p + 2)
        return env * (x < 1.0).to(env.dtype)


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` ``[n, ...]`` into ``dim_size`` segments given by ``index`` ``[n]``."""
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.index_add(0, index, src)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Mean of rows of ``src`` per segment (empty segments give zeros)."""
    total = scatter_sum(src, index, dim_size)
    count = torch.bincount(index, minlength=dim_size).clamp(min=1).to(src.dtype)
    return total / count.view(-1, *([1] * (src.dim() - 1)))


def scatter_max(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Element-wise maximum of rows of ``src`` per segment (empty segments give zeros)."""
    expanded = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    out = src.new_zeros((dim_size, *src.shape[1:]))
    return out.scatter_reduce(0, expanded, src, reduce="amax", include_self=False)


_READOUT_FUNCS = {"sum": scatter_sum, "mean": scatter_mean, "avg": scatter_mean, "max": scatter_max}


def readout(x: torch.Tensor, index: torch.Tensor, num_segments: int, mode: str = "sum") -> torch.Tensor:
    """Pool per-atom rows ``x`` ``[num_nodes, D]`` into ``[num_segments, D]``.

    Parameters
    ----------
    x
        Per-atom features.
    index
        Structure index of each atom ``[num_nodes]``.
    num_segments
        Number of structures.
    mode
        ``"sum"``, ``"mean"`` (alias ``"avg"``) or ``"max"``.

    Raises
    ------
    ConfigError
        Unknown ``mode``.
    """
    if mode not in _READOUT_FUNCS:
        raise ConfigError(f"readout={mode!r} is not supported; {closest(mode, _READOUT_FUNCS)}")
    return _READOUT_FUNCS[mode](x, index, num_segments)


def check_readout(mode: str, extra: Sequence[str] = ()) -> str:
    """Validate a readout name at construction time and return it.

    Raises
    ------
    ConfigError
        ``mode`` is neither in :data:`READOUTS` nor in ``extra``.
    """
    valid = (*READOUTS, *extra)
    if mode not in valid:
        raise ConfigError(f"readout={mode!r} is not supported; {closest(str(mode), valid)}")
    return mode
