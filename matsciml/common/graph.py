"""Container-independent access to a (batched) structure graph.

Models and callbacks read graphs only through these functions, so they do not
care whether a batch holds a PyG ``Data``/``Batch`` or a DGL graph.

Conventions (all graphs built by :mod:`matsciml.datasets.transforms`):

* ``pos`` ``[num_nodes, 3]`` Cartesian positions in Å.
* ``atomic_numbers`` ``[num_nodes]`` int64.
* ``edge_index`` ``[2, num_edges]`` int64: row 0 is the centre atom ``i``,
  row 1 its neighbour ``j``. The list is symmetric (``j -> i`` for every ``i -> j``).
* ``cell_shifts`` ``[num_edges, 3]``: integer lattice translations ``S`` (stored as
  float) such that the edge vector is ``r_ij = pos[j] - pos[i] + S @ cell``.
* ``cell`` ``[num_graphs, 3, 3]``: lattice vectors as rows, Å (zeros when
  not periodic).
* ``batch`` ``[num_nodes]``: index of the graph each node belongs to.

Edge vectors are always recomputed from positions (:func:`edge_vectors`), so
forces by autograd and rotations of the input stay exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = [
    "get_graph",
    "positions",
    "atomic_numbers",
    "edge_index",
    "cell_shifts",
    "cells",
    "graph_index",
    "num_graphs",
    "num_nodes_per_graph",
    "edge_vectors",
    "edge_geometry",
    "EdgeGeometry",
    "is_dgl_graph",
]


def is_dgl_graph(graph: Any) -> bool:
    """Return True for a DGL graph (checked without importing DGL)."""
    return type(graph).__module__.startswith("dgl")


def get_graph(batch: Any) -> Any:
    """Return the graph of a batch: ``batch["graph"]`` for a dict batch, else ``batch``."""
    if isinstance(batch, dict):
        if "graph" not in batch:
            raise KeyError(
                "batch has no 'graph' entry; add PointCloudToGraphTransform to the dataset "
                f"transforms (keys present: {sorted(batch)})"
            )
        return batch["graph"]
    return batch


def _node(graph: Any, key: str) -> torch.Tensor:
    if is_dgl_graph(graph):
        return graph.ndata[key]
    return getattr(graph, key)


def _edge(graph: Any, key: str) -> torch.Tensor:
    if is_dgl_graph(graph):
        return graph.edata[key]
    return getattr(graph, key)


def positions(graph: Any) -> torch.Tensor:
    """Node positions ``[num_nodes, 3]`` in Å."""
    return _node(graph, "pos")


def atomic_numbers(graph: Any) -> torch.Tensor:
    """Atomic numbers ``[num_nodes]`` (int64)."""
    return _node(graph, "atomic_numbers").long()


def edge_index(graph: Any) -> torch.Tensor:
    """Edges ``[2, num_edges]``: row 0 centre atom ``i``, row 1 neighbour ``j``."""
    if is_dgl_graph(graph):
        src, dst = graph.edges()
        return torch.stack([src, dst])
    return graph.edge_index


def cell_shifts(graph: Any) -> torch.Tensor:
    """Integer lattice shifts ``[num_edges, 3]`` of each edge (zeros if absent)."""
    try:
        shifts = _edge(graph, "cell_shifts")
    except (AttributeError, KeyError):
        shifts = None
    if shifts is None:
        n_edges = edge_index(graph).shape[1]
        return positions(graph).new_zeros(n_edges, 3)
    return shifts


def graph_index(graph: Any) -> torch.Tensor:
    """Graph index of each node ``[num_nodes]`` (all zeros for a single graph)."""
    if is_dgl_graph(graph):
        counts = graph.batch_num_nodes()
        return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    batch = getattr(graph, "batch", None)
    if batch is None:
        return torch.zeros(positions(graph).shape[0], dtype=torch.long, device=positions(graph).device)
    return batch


def num_graphs(graph: Any) -> int | torch.SymInt:
    """Number of structures in the graph batch.

    A Python ``int``, except while the graph is traced by ``torch.export`` with a dynamic
    number of structures: a symbolic size (``torch.SymInt``) is then returned as is, so
    that the export does not fix it to the example's value.
    """
    if is_dgl_graph(graph):
        return int(graph.batch_size)
    n = getattr(graph, "num_graphs", None)
    if n is None:
        return 1
    return n if isinstance(n, torch.SymInt) else int(n)


def num_nodes_per_graph(graph: Any) -> torch.Tensor:
    """Number of atoms of each structure ``[num_graphs]`` (int64)."""
    idx = graph_index(graph)
    return torch.bincount(idx, minlength=num_graphs(graph))


def cells(graph: Any) -> torch.Tensor:
    """Lattice vectors ``[num_graphs, 3, 3]`` (rows), zeros for non-periodic structures."""
    cell = getattr(graph, "cell", None)
    if cell is None:
        return positions(graph).new_zeros(num_graphs(graph), 3, 3)
    return cell.reshape(-1, 3, 3)


def edge_vectors(graph: Any, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Edge vectors ``r_ij = pos[j] - pos[i] + S_ij @ cell`` ``[num_edges, 3]`` in Å.

    Parameters
    ----------
    graph
        A PyG ``Data``/``Batch`` (or DGL graph) following the module conventions.
    pos
        Positions to use instead of the graph's own (e.g. a tensor that requires grad).
    """
    pos = positions(graph) if pos is None else pos
    ei = edge_index(graph)
    vec = pos[ei[1]] - pos[ei[0]]
    shifts = cell_shifts(graph)
    if shifts.numel():
        cell = cells(graph).to(pos.dtype)
        edge_graph = graph_index(graph)[ei[0]]
        vec = vec + torch.einsum("ek,ekl->el", shifts.to(pos.dtype), cell[edge_graph])
    return vec


class EdgeGeometry(NamedTuple):
    """What an encoder reads first from a batch (see :func:`edge_geometry`)."""

    graph: Any
    atomic_numbers: torch.Tensor
    edge_index: torch.Tensor
    edge_vectors: torch.Tensor


def edge_geometry(batch: Any) -> EdgeGeometry:
    """The graph of ``batch`` with its atomic numbers, edge list and edge vectors.

    Parameters
    ----------
    batch
        A batch dict with ``"graph"`` or a PyG ``Data``/``Batch`` (or DGL graph).

    Returns
    -------
    EdgeGeometry
        ``(graph, atomic_numbers [N], edge_index [2, E], edge_vectors [E, 3])``; the edge
        vectors are computed from the positions (:func:`edge_vectors`).
    """
    graph = get_graph(batch)
    return EdgeGeometry(graph, atomic_numbers(graph), edge_index(graph), edge_vectors(graph))
