"""E(n)-equivariant graph network (Satorras, Hoogeboom & Welling, ICML 2021) for periodic structures.

:class:`PLEGNNBackbone` takes the keyword arguments of the upstream Open MatSciML Toolkit
class of the same name, so its model YAMLs run unchanged. Differences from upstream, all
deliberate:

* messages use periodic edge vectors ``r_ij = pos[j] - pos[i] + S_ij @ cell`` (upstream used
  ``pos[j] - pos[i]``, wrong for crystals) and the coordinate updates move every periodic image
  of an atom together, so a crystal and its supercell give the same per-atom embeddings;
* ``embed_out_dim`` is honoured (upstream silently kept ``embed_hidden_dim``);
* the softmax attention normalises over the neighbours of each atom (upstream normalised over
  every edge of the batch, so a structure's energy depended on the other structures in its batch);
* the last layer has no coordinate network (its output would be unused: no unused parameters,
  so no ``find_unused_parameters`` is needed under DDP);
* with ``encoder_only: false`` the prediction MLP is applied per atom before the readout, so the
  result is still an :class:`~matsciml.models.embeddings.Embeddings` (see the class docstring).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.models.embeddings import Embeddings
from matsciml.models.layers import (
    AtomEmbedding,
    BesselBasis,
    PolynomialCutoff,
    build_mlp,
    check_readout,
    get_activation,
    readout,
    scatter_max,
    scatter_sum,
)

__all__ = ["PLEGNNBackbone", "EGNNConv", "ModeLinear"]

_ATTENTION_NORMS = ("sigmoid", "softmax")
#: Added to ``|r_ij|`` (Å) when ``normalize`` turns edge vectors into directions for the coordinate update.
_DIRECTION_EPS = 0.1
#: Added to the softmax denominator (an atom whose neighbours all sit at the cutoff gets zero weights).
_SOFTMAX_EPS = 1e-12


class ModeLinear(nn.Module):
    """``modes`` independent linear maps ``[..., modes, in_features] -> [..., modes, out_features]``.

    With ``modes = 1`` this is :class:`torch.nn.Linear` acting on an extra axis of size one.
    Initialisation follows :class:`torch.nn.Linear` (uniform in ``±1/sqrt(in_features)``).
    """

    def __init__(self, in_features: int, out_features: int, modes: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.modes = int(in_features), int(out_features), int(modes)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = nn.Parameter(torch.empty(self.modes, self.in_features, self.out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.modes, self.out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the maps to ``x`` ``[..., modes, in_features]``."""
        y = torch.einsum("...ki,kio->...ko", x, self.weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, modes={self.modes}, bias={self.bias is not None}"


def _mode_mlp(
    dims: list[int], modes: int, activation: str, activate_last: bool = False, bias_last: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = k == len(dims) - 2
        layers.append(ModeLinear(d_in, d_out, modes, bias=bias_last or not last))
        if not last or activate_last:
            layers.append(get_activation(activation))
    return nn.Sequential(*layers)


class EGNNConv(nn.Module):
    """One E(n)-equivariant message-passing layer on periodic edge vectors.

    With ``h`` the invariant node features and ``r_ij`` the current edge vectors::

        m_ij  = phi_e([h_i, h_j, |r_ij|^2, a_ij]) * gate_ij * u(|r0_ij|)
        h_i'  = phi_h([h_i, sum_j m_ij]) (+ h_i if residual)
        dx_i  = -sum_j d_ij * phi_x(m_ij) * u(|r0_ij|),   d_ij = r_ij / (|r_ij| + 0.1) if normalize else r_ij

    ``gate_ij`` is ``sigmoid(w . m_ij)`` (sigmoid attention), ``exp(s_ij) u_ij / sum_k exp(s_ik) u_ik``
    over the neighbours ``k`` of atom ``i`` (softmax attention) or 1; ``u`` is the cutoff envelope of
    the initial edge length ``|r0_ij|`` (1 when the backbone has no ``cutoff``). ``phi_x`` ends in a
    bias-free linear map initialised near zero (optionally followed by ``tanh``).

    Parameters
    ----------
    dim
        Width of the node features (in and out).
    message_dims, feat_dims, position_dims
        Widths of the hidden layers of ``phi_e`` (its last entry is the message width), of ``phi_h``
        and of ``phi_x``; ``position_dims=None`` builds no coordinate network (``dx`` is ``None``).
    edge_attributes_dim
        Width of the optional edge attributes ``a_ij`` (0 for none).
    activation
        Activation name (see :func:`~matsciml.models.layers.get_activation`).
    modes
        Number of independent copies of every weight (``embed_k_linears``).
    residual, normalize, tanh
        See the formulas above.
    attention_norm
        ``None``, ``"sigmoid"`` or ``"softmax"``.
    """

    def __init__(
        self,
        dim: int,
        message_dims: list[int],
        feat_dims: list[int],
        position_dims: list[int] | None,
        edge_attributes_dim: int = 0,
        activation: str = "silu",
        modes: int = 1,
        residual: bool = True,
        normalize: bool = True,
        tanh: bool = True,
        attention_norm: str | None = None,
    ) -> None:
        super().__init__()
        msg_dim = message_dims[-1]
        self.residual, self.normalize, self.tanh = residual, normalize, tanh
        self.attention_norm = attention_norm
        self.edge_mlp = _mode_mlp([2 * dim + 1 + edge_attributes_dim, *message_dims], modes, activation, True)
        self.node_mlp = _mode_mlp([dim + msg_dim, *feat_dims, dim], modes, activation)
        self.attention = ModeLinear(msg_dim, 1, modes) if attention_norm is not None else None
        self.position_mlp = None
        if position_dims is not None:
            self.position_mlp = _mode_mlp([msg_dim, *position_dims, 1], modes, activation, bias_last=False)
            last = self.position_mlp[-1]
            for w in last.weight:
                nn.init.xavier_uniform_(w, gain=1e-3)

    def forward(
        self,
        h: torch.Tensor,
        vec: torch.Tensor,
        edge_index: torch.Tensor,
        envelope: torch.Tensor | None = None,
        edge_attributes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update features and compute coordinate displacements.

        Parameters
        ----------
        h
            Node features ``[num_nodes, modes, dim]``.
        vec
            Current edge vectors ``[num_edges, modes, 3]`` (Å).
        edge_index
            ``[2, num_edges]``, row 0 centre ``i`` (messages are summed onto it), row 1 neighbour ``j``.
        envelope
            Cutoff envelope ``[num_edges, 1, 1]`` or ``None``.
        edge_attributes
            ``[num_edges, modes, edge_attributes_dim]`` or ``None``.

        Returns
        -------
        tuple
            New features ``[num_nodes, modes, dim]`` and displacements ``[num_nodes, modes, 3]``
            (``None`` without a coordinate network).
        """
        n = h.shape[0]
        i, j = edge_index[0], edge_index[1]
        inputs = [h[i], h[j], vec.pow(2).sum(-1, keepdim=True)]
        if edge_attributes is not None:
            inputs.append(edge_attributes)
        m = self.edge_mlp(torch.cat(inputs, dim=-1))
        if self.attention_norm == "sigmoid":
            m = m * torch.sigmoid(self.attention(m))
        elif self.attention_norm == "softmax":
            score = self.attention(m)
            shift = scatter_max(score.detach(), i, n)[i]
            weight = torch.exp(score - shift)
            if envelope is not None:
                weight = weight * envelope
            m = m * (weight / (scatter_sum(weight, i, n)[i] + _SOFTMAX_EPS))
        if envelope is not None and self.attention_norm != "softmax":
            m = m * envelope
        out = self.node_mlp(torch.cat([h, scatter_sum(m, i, n)], dim=-1))
        if self.residual:
            out = out + h
        if self.position_mlp is None:
            return out, None
        w = self.position_mlp(m)
        if self.tanh:
            w = torch.tanh(w)
        if envelope is not None:
            w = w * envelope
        direction = vec / (vec.norm(dim=-1, keepdim=True) + _DIRECTION_EPS) if self.normalize else vec
        return out, scatter_sum(-direction * w, i, n)


class PLEGNNBackbone(nn.Module):
    """E(n)-equivariant GNN encoder with the upstream ``PLEGNNBackbone`` arguments.

    Atoms are embedded by atomic number (width ``atom_embedding_dim`` or ``embed_in_dim``),
    projected to ``embed_hidden_dim``, passed through ``embed_depth`` :class:`EGNNConv` layers
    (features and, between layers, coordinates are updated; coordinates move equivariantly and
    the features stay invariant), projected to ``embed_out_dim``, averaged over the
    ``embed_k_linears`` modes, and passed through the node-projection MLP. The result is the
    per-atom embedding; the system embedding is its ``readout`` over the atoms of each structure.
    Both are E(3)-invariant. Edge vectors come from positions inside :meth:`forward`, so forces by
    autograd (``graph.pos.requires_grad_(True)``) are exact.

    Parameters
    ----------
    embed_in_dim
        Width of the atom embedding table (unless ``atom_embedding_dim`` is given).
    embed_hidden_dim
        Width of the node features inside the message-passing layers.
    embed_out_dim
        Width after the message-passing layers (input of the node projection).
    embed_depth
        Number of message-passing layers (>= 1).
    embed_feat_dims
        Hidden widths of the node-update MLP ``phi_h`` (may be empty).
    embed_message_dims
        Widths of the message MLP ``phi_e``; the last entry is the message width (non-empty).
    embed_position_dims
        Hidden widths of the coordinate MLP ``phi_x`` (may be empty).
    embed_edge_attributes_dim
        Width of edge attributes read from ``graph.edge_attr`` ``[num_edges, dim]``; 0 for none.
    embed_activation
        Activation name: ``relu``, ``silu``/``SiLU``, ``gelu``, ``leaky_relu``, ... or a dotted path.
    embed_residual
        Add each layer's input features to its output.
    embed_normalize
        Use directions ``r_ij / (|r_ij| + 0.1 Å)`` instead of raw edge vectors in coordinate updates.
    embed_tanh
        Squash the coordinate weights with ``tanh``.
    embed_activate_last
        Apply the activation after the last message-passing layer too.
    embed_k_linears
        Number of independent copies ("modes") of the message-passing weights, each with its own
        coordinate channel; their outputs are averaged (1 = a plain EGNN).
    embed_use_attention
        Weight messages by an attention score.
    embed_attention_norm
        ``"sigmoid"`` (independent gate per edge) or ``"softmax"`` (over each atom's neighbours).
    readout
        ``"sum"``, ``"mean"`` (alias ``"avg"``), ``"max"`` or ``"weight_and_sum"`` (sum of atom
        embeddings weighted by a learned sigmoid gate).
    node_projection_depth
        Number of linear layers of the node projection (0 = none).
    node_projection_hidden_dim
        Width of the node projection; the embedding width when ``node_projection_depth > 0``.
    node_projection_activation
        Activation between node-projection layers (none after the last).
    prediction_depth, prediction_hidden_dim, prediction_out_dim, prediction_activation
        Per-atom prediction MLP, built only when ``encoder_only`` is false.
    atom_embedding_dim
        Width of the atom embedding table; default ``None`` uses ``embed_in_dim``.
    num_atom_embedding
        Size of the atom embedding table: atomic numbers ``0 .. num_atom_embedding - 1`` (default 100).
    embedding_kwargs
        Extra keyword arguments for :class:`torch.nn.Embedding` (default ``{}``).
    encoder_only
        ``True`` (default): the embeddings are the node projection's output. ``False``: the prediction
        MLP is applied to every atom's embedding and the system embedding is the readout of those
        per-atom predictions, so ``embedding_dim == prediction_out_dim`` (upstream applied it to the
        pooled vector and returned a bare tensor).
    cutoff
        Optional cutoff radius in Å (not an upstream argument). When given, messages and coordinate
        weights are multiplied by a smooth polynomial envelope of the edge length that vanishes at
        ``cutoff``, so energies and forces are continuous as neighbours enter or leave the graph. Set
        it to the graph's cutoff radius. Default ``None``: no envelope (upstream behaviour).
    num_radial_basis
        Number of Bessel radial basis functions of the initial edge length, times the cutoff
        envelope, added to every message's input (not an upstream argument; needs ``cutoff``).
        Default 0: messages see the edge length only through ``|r_ij|^2``. Forces need a
        radial basis: in a near-equilibrium structure they come from the curvature of the
        energy in the distances, which ``|r_ij|^2`` fed to a near-linear MLP barely has (an
        untrained model then has forces about 1000 times smaller than the data's). 8 is
        the usual choice of the equivariant potentials.

    Attributes
    ----------
    embedding_dim : int
        Width ``D`` of both embeddings.

    Raises
    ------
    ConfigError
        Invalid widths, depth, activation, attention norm or readout (the message names the argument).

    Example YAML (``experiments/configs/models/egnn.yaml``)::

        encoder_class:
          class_path: matsciml.models.PLEGNNBackbone
        encoder_kwargs:
          embed_in_dim: 128
          embed_hidden_dim: 32
          embed_out_dim: 128
          embed_depth: 5
          embed_feat_dims: [128, 128, 128]
          embed_message_dims: [128, 128, 128]
          embed_position_dims: [64, 64]
          embed_edge_attributes_dim: 0
          embed_activation: relu
          embed_residual: true
          embed_normalize: true
          embed_tanh: true
          embed_activate_last: false
          embed_k_linears: 1
          embed_use_attention: false
          embed_attention_norm: sigmoid
          readout: sum
          node_projection_depth: 3
          node_projection_hidden_dim: 128
          node_projection_activation: relu
          prediction_out_dim: 1
          prediction_depth: 3
          prediction_hidden_dim: 128
          prediction_activation: relu
          encoder_only: true
    """

    def __init__(
        self,
        embed_in_dim: int,
        embed_hidden_dim: int,
        embed_out_dim: int,
        embed_depth: int,
        embed_feat_dims: list[int],
        embed_message_dims: list[int],
        embed_position_dims: list[int],
        embed_edge_attributes_dim: int,
        embed_activation: str,
        embed_residual: bool,
        embed_normalize: bool,
        embed_tanh: bool,
        embed_activate_last: bool,
        embed_k_linears: int,
        embed_use_attention: bool,
        embed_attention_norm: str,
        readout: str,
        node_projection_depth: int,
        node_projection_hidden_dim: int,
        node_projection_activation: str,
        prediction_depth: int,
        prediction_hidden_dim: int,
        prediction_out_dim: int,
        prediction_activation: str,
        atom_embedding_dim: int | None = None,
        num_atom_embedding: int = 100,
        embedding_kwargs: dict[str, Any] | None = None,
        encoder_only: bool = True,
        cutoff: float | None = None,
        num_radial_basis: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_in_dim", embed_in_dim),
            ("embed_hidden_dim", embed_hidden_dim),
            ("embed_out_dim", embed_out_dim),
            ("embed_depth", embed_depth),
            ("embed_k_linears", embed_k_linears),
            ("num_atom_embedding", num_atom_embedding),
        ):
            if int(value) < 1:
                raise ConfigError(f"PLEGNNBackbone: {name}={value} must be a positive integer")
        if not embed_message_dims:
            raise ConfigError("PLEGNNBackbone: embed_message_dims must hold at least one width (the message width)")
        if int(num_radial_basis) < 0 or (int(num_radial_basis) > 0 and cutoff is None):
            raise ConfigError(
                f"PLEGNNBackbone: num_radial_basis={num_radial_basis} needs to be >= 0, and a cutoff (Å) when > 0; "
                "set cutoff to the graph's cutoff radius"
            )
        if int(embed_edge_attributes_dim) < 0:
            raise ConfigError(f"PLEGNNBackbone: embed_edge_attributes_dim={embed_edge_attributes_dim} must be >= 0")
        if embed_attention_norm not in _ATTENTION_NORMS:
            raise ConfigError(
                f"PLEGNNBackbone: embed_attention_norm={embed_attention_norm!r} is not supported; "
                f"{closest(str(embed_attention_norm), _ATTENTION_NORMS)}"
            )
        self.readout_mode = check_readout(readout, extra=("weight_and_sum",))
        if int(node_projection_depth) < 0:
            raise ConfigError(f"PLEGNNBackbone: node_projection_depth={node_projection_depth} must be >= 0")
        # validate activation names early (errors name the argument)
        for name, act in (
            ("embed_activation", embed_activation),
            ("node_projection_activation", node_projection_activation),
        ):
            get_activation(act, f"PLEGNNBackbone: {name}")

        modes = int(embed_k_linears)
        depth = int(embed_depth)
        hidden = int(embed_hidden_dim)
        self.modes = modes
        self.encoder_only = bool(encoder_only)
        self.activate_last = bool(embed_activate_last)
        self.edge_attributes_dim = int(embed_edge_attributes_dim)

        atom_dim = int(atom_embedding_dim) if atom_embedding_dim else int(embed_in_dim)
        self.atom_embedding = AtomEmbedding(num_atom_embedding, atom_dim, **(embedding_kwargs or {}))
        self.in_projection = ModeLinear(atom_dim, hidden, modes)
        self.layers = nn.ModuleList(
            EGNNConv(
                hidden,
                [int(d) for d in embed_message_dims],
                [int(d) for d in embed_feat_dims],
                [int(d) for d in embed_position_dims] if k < depth - 1 else None,
                edge_attributes_dim=self.edge_attributes_dim + int(num_radial_basis),
                activation=embed_activation,
                modes=modes,
                residual=bool(embed_residual),
                normalize=bool(embed_normalize),
                tanh=bool(embed_tanh),
                attention_norm=embed_attention_norm if embed_use_attention else None,
            )
            for k in range(depth)
        )
        self.activation = get_activation(embed_activation)
        self.out_projection = ModeLinear(hidden, int(embed_out_dim), modes)

        proj_dims = [int(embed_out_dim)] + [int(node_projection_hidden_dim)] * int(node_projection_depth)
        self.node_projection = _plain_mlp(proj_dims, node_projection_activation)
        dim = proj_dims[-1]
        self.prediction = None
        if not self.encoder_only:
            if int(prediction_depth) < 1:
                raise ConfigError(f"PLEGNNBackbone: prediction_depth={prediction_depth} must be >= 1")
            get_activation(prediction_activation, "PLEGNNBackbone: prediction_activation")
            pred_dims = [dim] + [int(prediction_hidden_dim)] * (int(prediction_depth) - 1) + [int(prediction_out_dim)]
            self.prediction = _plain_mlp(pred_dims, prediction_activation)
            dim = int(prediction_out_dim)
        self.readout_gate = nn.Linear(dim, 1) if self.readout_mode == "weight_and_sum" else None
        self.envelope = PolynomialCutoff(cutoff) if cutoff is not None else None
        self.cutoff = None if cutoff is None else float(cutoff)
        self.num_radial_basis = int(num_radial_basis)
        self.radial_basis = BesselBasis(self.num_radial_basis, cutoff) if self.num_radial_basis else None
        self.embedding_dim: int = dim

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch, as every encoder does (see :mod:`matsciml.models.encoders`).

        Raises
        ------
        DataError
            Unknown atomic number, or missing/mis-shaped ``graph.edge_attr`` when
            ``embed_edge_attributes_dim > 0``.
        """
        graph, z, ei, vec0 = G.edge_geometry(batch)
        n, e, k = z.shape[0], ei.shape[1], self.modes

        envelope = None
        if self.envelope is not None:
            envelope = self.envelope(vec0.norm(dim=-1)).view(e, 1, 1)
        edge_attr = self._edge_attributes(graph, e, vec0.dtype)
        if self.radial_basis is not None:
            length = vec0.norm(dim=-1)
            radial = self.radial_basis(length.clamp_min(1e-6)) * envelope.view(e, 1)
            radial = radial.unsqueeze(1).expand(e, k, -1)
            edge_attr = radial if edge_attr is None else torch.cat([edge_attr, radial], dim=-1)

        h = self.atom_embedding(z).unsqueeze(1).expand(n, k, -1)
        h = self.in_projection(h)
        vec = vec0.unsqueeze(1).expand(e, k, 3)
        for idx, layer in enumerate(self.layers):
            h, disp = layer(h, vec, ei, envelope, edge_attr)
            if disp is not None:
                vec = vec + disp[ei[1]] - disp[ei[0]]
            if idx < len(self.layers) - 1 or self.activate_last:
                h = self.activation(h)
        point = self.node_projection(self.out_projection(h).mean(dim=1))
        if self.prediction is not None:
            point = self.prediction(point)
        index, count = G.graph_index(graph), G.num_graphs(graph)
        if self.readout_gate is not None:
            system = readout(torch.sigmoid(self.readout_gate(point)) * point, index, count, "sum")
        else:
            system = readout(point, index, count, self.readout_mode)
        return Embeddings(system_embedding=system, point_embedding=point)

    def _edge_attributes(self, graph: Any, num_edges: int, dtype: torch.dtype) -> torch.Tensor | None:
        if self.edge_attributes_dim == 0:
            return None
        attr = graph.edata.get("edge_attr") if G.is_dgl_graph(graph) else getattr(graph, "edge_attr", None)
        if attr is None:
            raise DataError(
                f"PLEGNNBackbone has embed_edge_attributes_dim={self.edge_attributes_dim} but the graph has no "
                "'edge_attr'; add edge attributes to the graphs or set embed_edge_attributes_dim: 0"
            )
        attr = attr.reshape(attr.shape[0], -1).to(dtype)
        if attr.shape != (num_edges, self.edge_attributes_dim):
            raise DataError(
                f"graph.edge_attr has shape {tuple(attr.shape)}, expected [{num_edges}, {self.edge_attributes_dim}] "
                "(embed_edge_attributes_dim)"
            )
        return attr.unsqueeze(1).expand(num_edges, self.modes, -1)


def _plain_mlp(dims: list[int], activation: str) -> nn.Module:
    """:func:`~matsciml.models.layers.build_mlp`, or the identity for a single width."""
    return build_mlp(dims, activation) if len(dims) > 1 else nn.Identity()
