"""What the matgl wrappers share: element types, argument checks and the graph matgl reads.

matgl (>= 4) models are plain PyTorch modules that read a PyG-like graph with the attributes
``node_type`` (element index into the model's ``element_types``), ``pos``, ``edge_index``
(row 0 the centre atom, row 1 its neighbour, sorted by centre), ``pbc_offshift`` (the Cartesian
periodic shift of each edge), ``pbc_offset`` (the integer one), ``batch`` and ``num_graphs``,
and compute ``bond_vec = pos[j] + pbc_offshift - pos[i]`` themselves. This is the convention of
:mod:`matsciml.common.graph`, so :func:`matgl_graph` passes our neighbour list in unchanged:
the shift is ``S @ cell`` computed from the graph's (possibly strained) cell, so forces and
stresses by autograd flow through matgl's own edge vectors.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets.utils import MAX_ATOMIC_NUMBER, atomic_number_map
from matsciml.datasets.utils import element_types as all_elements
from matsciml.models.optional import require

__all__ = ["MatGLEncoder", "check_library_kwargs", "matgl_graph"]


def check_library_kwargs(cls: type, kwargs: dict[str, Any], model: str, reserved: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` for a keyword the library class does not take.

    matgl constructors accept ``**kwargs`` and ignore unknown keys, so a misspelt argument
    would otherwise be dropped without a word.

    Parameters
    ----------
    cls
        The library class (e.g. ``matgl.models.M3GNet``).
    kwargs
        Keywords to be passed to it.
    model
        The wrapper's name, used in the message.
    reserved
        Keywords the wrapper sets itself (refused when given).
    """
    params = inspect.signature(cls).parameters
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key in reserved:
            raise ConfigError(f"{model}: encoder_kwargs.{key} is set by the wrapper; remove it from the config")
        if key not in valid:
            raise ConfigError(
                f"{model}: encoder_kwargs.{key} is not an argument of {cls.__module__}.{cls.__qualname__}; "
                f"{closest(key, [v for v in valid if v not in reserved])}"
            )


def matgl_graph(graph: Any, type_of_z: torch.Tensor, cutoff: float, model: str) -> SimpleNamespace:
    """The graph a matgl model reads, built from one of ours (see the module docstring).

    Edges longer than ``cutoff`` are dropped (our neighbour list may use a larger radius than
    the model), and the edges are ordered by centre atom as matgl's three-body indexing needs.

    Parameters
    ----------
    graph
        A PyG ``Data``/``Batch`` following :mod:`matsciml.common.graph`.
    type_of_z
        ``[MAX_ATOMIC_NUMBER + 1]`` int64: element index of each atomic number, ``-1`` if absent.
    cutoff
        The model's cutoff radius (Å).
    model
        The wrapper's name, for error messages.

    Raises
    ------
    DataError
        An element that is not among the model's ``element_types``.
    """
    z = G.atomic_numbers(graph)
    if z.numel() and (int(z.min()) < 1 or int(z.max()) > MAX_ATOMIC_NUMBER):
        raise DataError(
            f"{model}: atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {int(z.min())}..{int(z.max())}"
        )
    node_type = type_of_z[z]
    if z.numel() and bool((node_type < 0).any()):
        missing = sorted({int(v) for v in z[node_type < 0]})
        symbols = [all_elements()[v - 1] for v in missing]
        raise DataError(
            f"{model}: elements {symbols} of the batch are not in the model's element_types; "
            "add them, or use element_types: {class_path: matsciml.datasets.utils.element_types} (all elements)"
        )
    pos = G.positions(graph)
    edge_index = G.edge_index(graph)
    shifts = G.cell_shifts(graph).to(pos.dtype)
    batch = G.graph_index(graph)
    cell = G.cells(graph).to(pos.dtype)
    offshift = torch.einsum("ek,ekl->el", shifts, cell[batch[edge_index[0]]])
    vec = pos[edge_index[1]] - pos[edge_index[0]] + offshift
    keep = vec.norm(dim=-1) <= cutoff
    order = None
    if not bool(keep.all()):
        order = keep.nonzero().squeeze(1)
    centres = edge_index[0] if order is None else edge_index[0, order]
    if centres.numel() > 1 and not bool((centres[1:] >= centres[:-1]).all()):
        sort = torch.argsort(centres, stable=True)
        order = sort if order is None else order[sort]
    if order is not None:
        edge_index, offshift, shifts = edge_index[:, order], offshift[order], shifts[order]
    return SimpleNamespace(
        node_type=node_type,
        atomic_numbers=z,
        pos=pos,
        edge_index=edge_index,
        pbc_offshift=offshift,
        pbc_offset=shifts,
        batch=batch,
        num_graphs=G.num_graphs(graph),
    )


class MatGLEncoder(nn.Module):
    """Base of the matgl wrappers: element-type table, the library model, the graph conversion.

    Subclasses build ``self.model`` (the matgl module, whose own prediction head is replaced by
    ``nn.Identity``: the task's output heads play its role) and implement ``forward``.

    Parameters
    ----------
    element_types
        Element symbols the model knows (upstream configs give
        ``{class_path: matsciml.datasets.utils.element_types}``, all elements); ``None`` means all.
    cutoff
        The model's cutoff radius in Å; longer edges of our graph are not passed to it.
    """

    library_name: str = ""

    def __init__(self, element_types: list[str] | tuple[str, ...] | None, cutoff: float) -> None:
        super().__init__()
        name = type(self).__name__
        elements = list(all_elements() if element_types is None else element_types)
        table = atomic_number_map()
        unknown = [e for e in elements if e not in table]
        if unknown or not elements:
            raise ConfigError(
                f"{name}: element_types must be element symbols, got {unknown or elements!r}; "
                f"{closest(str(unknown[0]), table) if unknown else 'give at least one'}"
            )
        if len(set(elements)) != len(elements):
            raise ConfigError(f"{name}: element_types lists an element twice: {elements}")
        if float(cutoff) <= 0:
            raise ConfigError(f"{name}: cutoff={cutoff} must be positive")
        type_of_z = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)
        for index, symbol in enumerate(elements):
            type_of_z[table[symbol]] = index
        self.register_buffer("type_of_z", type_of_z, persistent=False)
        self.element_types = tuple(elements)
        self.cutoff = float(cutoff)

    def _library(self) -> Any:
        return require("matgl.models", type(self).__name__)

    def library_graph(self, batch: Any) -> SimpleNamespace:
        """The matgl input graph of a batch (see :func:`matgl_graph`)."""
        return matgl_graph(G.get_graph(batch), self.type_of_z, self.cutoff, type(self).__name__)
