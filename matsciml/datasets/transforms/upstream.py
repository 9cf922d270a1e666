"""Transforms named by Open MatSciML Toolkit model configs, and what each does here.

Upstream's configs list transforms that prepared its DGL graphs for a particular model. Here the
encoders compute what they need from positions inside the model (so forces and stresses by
autograd see it), so most of these check their input and add what upstream added for reference:

=========================== ====================================================================
``MGLDataTransform``        checks the sample has a graph with periodic edges; the matgl wrappers
                            convert it (element indices, ``S @ cell`` shifts) at run time.
``DistancesTransform``      adds ``graph.r`` (edge lengths, periodic) and ``graph.mu`` (reduced
                            "mass" ``Za Zb / (Za + Zb)`` of atomic numbers), as upstream.
``GraphVariablesTransform`` adds ``sample["graph_variables"]`` (the 9 structure variables of
                            :func:`graph_variables`); :class:`~matsciml.models.MEGNet` computes the
                            same variables from positions itself.
``COMShift``                moves the atoms so that their centre of mass (atomic numbers as
                            masses) is at the origin: positions of the sample and of its graph.
``FrameAveraging``          prepares FAENet inputs; FAENet is not available (see
                            :mod:`matsciml.models.unavailable`), so it refuses to be built.
=========================== ====================================================================
"""

from __future__ import annotations

from typing import Any

import torch

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets import schema
from matsciml.datasets.neighbors import describe_structure

__all__ = [
    "MGLDataTransform",
    "DistancesTransform",
    "GraphVariablesTransform",
    "COMShift",
    "FrameAveraging",
    "graph_variables",
    "NUM_GRAPH_VARIABLES",
]

#: Number of structure variables of :func:`graph_variables`.
NUM_GRAPH_VARIABLES = 9


def _graph_of(sample: dict[str, Any], transform: str) -> Any:
    graph = sample.get(schema.GRAPH)
    if graph is None:
        raise DataError(
            f"{describe_structure(sample)}: {transform} needs the sample's graph; list "
            "PointCloudToGraphTransform (after PeriodicPropertiesTransform) before it in transforms"
        )
    return graph


def _mean_std(values: torch.Tensor, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and population standard deviation (0 for empty groups)."""
    count = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, torch.ones_like(values))
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, values)
    mean = total / count.clamp_min(1)
    var = torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, index, (values - mean[index]) ** 2)
    var = var / count.clamp_min(1)
    # sqrt has an infinite slope at 0: a floor keeps gradients finite for identical values
    return mean, torch.sqrt(var.clamp_min(1e-12)) * (count > 0)


def graph_variables(graph: Any, edge_index: torch.Tensor | None = None, edge_length: torch.Tensor | None = None):
    """The 9 structure variables upstream's MEGNet configs use as its state ``[num_graphs, 9]``.

    For the atoms of the adsorbate (``tags == 2`` when the graph has ``tags``, else every atom)
    and of the rest: mean and standard deviation of their atomic numbers (4 values); over the
    edges: mean and standard deviation of the length and of the reduced "mass"
    ``Za Zb / (Za + Zb)`` of atomic numbers (4 values); the distance between the two centres of
    mass (atomic numbers as masses; 1 value). An empty group gives 0. Standard deviations are
    population ones (divided by ``n``), so a supercell has the same variables as its cell.

    Parameters
    ----------
    graph
        A PyG graph or batch (:mod:`matsciml.common.graph`).
    edge_index, edge_length
        The edges to use and their lengths (default: all edges of the graph, periodic lengths
        from positions, differentiable).
    """
    z = G.atomic_numbers(graph)
    pos = G.positions(graph)
    batch = G.graph_index(graph)
    n = int(G.num_graphs(graph))
    zf = z.to(pos.dtype)
    tags = getattr(graph, "tags", None)
    mol = torch.ones_like(z, dtype=torch.bool) if tags is None else tags.reshape(-1) == 2
    if edge_index is None:
        edge_index = G.edge_index(graph)
        edge_length = G.edge_vectors(graph).norm(dim=-1)
    out = []
    for mask in (mol, ~mol):
        idx = torch.where(mask, batch, torch.full_like(batch, n))
        mean, std = _mean_std(zf, idx, n + 1)
        out += [mean[:n], std[:n]]
    edge_graph = batch[edge_index[0]]
    za, zb = zf[edge_index[0]], zf[edge_index[1]]
    for values in (edge_length, za * zb / (za + zb)):
        mean, std = _mean_std(values, edge_graph, n)
        out += [mean, std]
    coms, present = [], []
    for mask in (mol, ~mol):
        idx = torch.where(mask, batch, torch.full_like(batch, n))
        mass = torch.zeros(n + 1, dtype=pos.dtype, device=pos.device).index_add(0, idx, zf)
        moment = torch.zeros(n + 1, 3, dtype=pos.dtype, device=pos.device).index_add(0, idx, zf[:, None] * pos)
        coms.append(moment[:n] / mass[:n, None].clamp_min(1e-12))
        present.append(mass[:n] > 0)
    both = present[0] & present[1]
    diff = torch.where(both[:, None], coms[0] - coms[1], torch.ones_like(coms[0]))
    out.append(torch.where(both, diff.norm(dim=-1), torch.zeros_like(diff[:, 0])))
    return torch.stack(out, dim=-1)


class MGLDataTransform:
    """Accept upstream's matgl preparation step: check that the sample has a periodic graph.

    The matgl wrappers (:class:`~matsciml.models.M3GNet`, ...) turn our graph into matgl's at run
    time (element indices from ``element_types``, Cartesian shifts ``S @ cell`` from the batch's
    cell, so that stresses by the strain trick work); nothing is stored here.

    Example YAML::

        transforms:
          - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
            init_args: {cutoff_radius: 6.5, adaptive_cutoff: true}
          - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
            init_args: {backend: dgl, cutoff_dist: 20.0, node_keys: [pos, atomic_numbers]}
          - class_path: matsciml.datasets.transforms.MGLDataTransform
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Check ``sample["graph"]`` and return the sample unchanged."""
        graph = _graph_of(sample, type(self).__name__)
        if getattr(graph, "cell_shifts", None) is None:
            raise DataError(
                f"{describe_structure(sample)}: MGLDataTransform needs periodic edges (graph.cell_shifts); "
                "list PeriodicPropertiesTransform before PointCloudToGraphTransform"
            )
        return sample


class DistancesTransform:
    """Add the edge lengths ``graph.r`` ``[E, 1]`` and reduced masses ``graph.mu`` ``[E, 1]``.

    Lengths include the periodic shift of each edge. Encoders do not read them (they compute
    lengths from positions, so that forces flow); they are kept for inspection and for code
    written against upstream's keys.

    Example YAML::

        - class_path: matsciml.datasets.transforms.DistancesTransform
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Add ``r`` and ``mu`` to ``sample["graph"]``."""
        graph = _graph_of(sample, type(self).__name__)
        ei = G.edge_index(graph)
        z = G.atomic_numbers(graph).to(G.positions(graph).dtype)
        graph.r = G.edge_vectors(graph).norm(dim=-1, keepdim=True)
        za, zb = z[ei[0]], z[ei[1]]
        graph.mu = (za * zb / (za + zb)).unsqueeze(-1)
        return sample


class GraphVariablesTransform:
    """Add ``sample["graph_variables"]`` ``[9]``: the structure variables of :func:`graph_variables`.

    :class:`~matsciml.models.MEGNet` computes the same variables inside the model from
    positions (so forces include their derivative); this transform stores them for inspection
    and for code written against upstream's key.

    Example YAML::

        - class_path: matsciml.datasets.transforms.DistancesTransform
        - class_path: matsciml.datasets.transforms.GraphVariablesTransform
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Add ``graph_variables`` to the sample."""
        graph = _graph_of(sample, type(self).__name__)
        sample["graph_variables"] = graph_variables(graph)[0]
        return sample


class COMShift:
    """Translate a structure so that its centre of mass is at the origin.

    Masses are the atomic numbers by default (upstream's choice). Positions of the sample and,
    when present, of its graph are shifted; edge vectors and every invariant quantity are
    unchanged.

    Parameters
    ----------
    pos_key
        Key of the positions (default ``"pos"``).
    mass_key
        Key of the masses (default ``"atomic_numbers"``).

    Example YAML::

        - class_path: matsciml.datasets.transforms.COMShift
    """

    def __init__(self, pos_key: str = "pos", mass_key: str = "atomic_numbers") -> None:
        self.pos_key = pos_key
        self.mass_key = mass_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pos_key={self.pos_key!r}, mass_key={self.mass_key!r})"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Shift the positions of ``sample`` (and of ``sample["graph"]``)."""
        for key in (self.pos_key, self.mass_key):
            if key not in sample:
                raise DataError(
                    f"{describe_structure(sample)}: COMShift needs the key {key!r} (keys: {sorted(sample)})"
                )
        pos = torch.as_tensor(sample[self.pos_key])
        mass = torch.as_tensor(sample[self.mass_key]).to(pos.dtype).reshape(-1)
        com = (mass[:, None] * pos).sum(0) / mass.sum()
        sample[self.pos_key] = pos - com
        graph = sample.get(schema.GRAPH)
        if graph is not None and getattr(graph, self.pos_key, None) is not None:
            setattr(graph, self.pos_key, getattr(graph, self.pos_key) - com.to(getattr(graph, self.pos_key).dtype))
        return sample


class FrameAveraging:
    """Upstream's frame-averaging inputs for FAENet; refused here, as FAENet is not available.

    Raises
    ------
    ConfigError
        Always, naming the encoders to use instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(
            "FrameAveraging prepares inputs for FAENet, which this toolkit does not provide; use an "
            "equivariant encoder instead (E3NNEncoder, MACEWrapper, TensorNet) and drop this transform"
        )
