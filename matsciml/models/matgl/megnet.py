"""MEGNet (Chen et al., 2019) from matgl as an encoder, with upstream's argument names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.datasets.transforms.upstream import NUM_GRAPH_VARIABLES, graph_variables
from matsciml.datasets.utils import element_types as all_elements
from matsciml.models.embeddings import Embeddings
from matsciml.models.matgl.base import MatGLEncoder
from matsciml.registry import register_encoder

__all__ = ["MEGNet"]


@register_encoder
class MEGNet(MatGLEncoder):
    """matgl's MEGNet: node, edge and structure-state blocks with Set2Set readouts.

    Upstream's arguments map onto ``matgl.models.MEGNet``: ``node_feat_dim`` ->
    ``dim_node_embedding``, ``edge_feat_dim`` -> ``dim_edge_embedding`` (number of Gaussians of
    the edge-length expansion), ``graph_feat_dim`` -> ``dim_state_embedding``, ``num_blocks`` ->
    ``nblocks``, ``hiddens`` -> ``hidden_layer_sizes_input``, ``conv_hiddens`` ->
    ``hidden_layer_sizes_conv``, ``s2s_num_layers``/``s2s_num_iters`` ->
    ``nlayers_set2set``/``niters_set2set``. The structure state is the 9 variables of
    :func:`~matsciml.datasets.transforms.upstream.graph_variables`, computed from positions
    inside the model (so ``graph_feat_dim`` must be 9).

    Embeddings (``C = conv_hiddens[-1]``, ``embedding_dim = 5 C``): the system embedding is
    matgl's readout ``[Set2Set(nodes) (2C), Set2Set(edges) (2C), state (C)]``; the embedding of
    atom ``i`` has the same layout with the atom's own features in place of the attention-weighted
    sums: ``[q_nodes, h_i, q_edges, mean of the features of i's edges, state]``, so
    :class:`~matsciml.models.ForceRegressionTask` can put a per-atom head on it. matgl's output
    MLP is replaced by ``nn.Identity`` (the task's head predicts).

    Parameters
    ----------
    edge_feat_dim, node_feat_dim, graph_feat_dim, num_blocks, hiddens, conv_hiddens
        See above.
    s2s_num_layers, s2s_num_iters
        Set2Set LSTM layers and iterations.
    output_hiddens, is_classification
        Upstream's output MLP; unused, as the task's head predicts (accepted for configs).
    dropout
        Dropout of the convolutions (``None``: none).
    node_embed, edge_embed, attr_embed, atom_embedding_dim, embedding_kwargs
        Upstream's custom embedding modules: only ``None``/empty is accepted.
    num_atom_embedding
        Number of elements known (atomic numbers ``1 .. num_atom_embedding``) when
        ``element_types`` is not given (default 100).
    encoder_only
        Must be ``True`` (default): the wrapper returns embeddings.
    element_types
        Element symbols (overrides ``num_atom_embedding``).
    cutoff
        Edges longer than this (Å) are not used (default 4.0, matgl's); the Gaussians span
        ``0 .. cutoff + 1``.
    gauss_width
        Width of the Gaussians (default 0.5, matgl's).

    Raises
    ------
    ConfigError
        matgl is missing (the message names the extra), ``graph_feat_dim`` other than 9,
        ``encoder_only: false`` or custom embedding modules.

    Example YAML (upstream's ``megnet_dgl.yaml``)::

        encoder_class:
          class_path: matsciml.models.MEGNet
        encoder_kwargs:
          conv_hiddens: [128, 128, 128]
          edge_feat_dim: 2
          encoder_only: true
          graph_feat_dim: 9
          hiddens: [256, 256, 128]
          is_classification: false
          node_feat_dim: 128
          num_blocks: 4
          output_hiddens: [64, 64]
          s2s_num_iters: 4
          s2s_num_layers: 5
    """

    def __init__(
        self,
        edge_feat_dim: int,
        node_feat_dim: int,
        graph_feat_dim: int,
        num_blocks: int,
        hiddens: list[int],
        conv_hiddens: list[int],
        s2s_num_layers: int,
        s2s_num_iters: int,
        output_hiddens: list[int] | None = None,
        is_classification: bool = False,
        node_embed: Any = None,
        edge_embed: Any = None,
        attr_embed: Any = None,
        dropout: float | None = None,
        atom_embedding_dim: int | None = None,
        num_atom_embedding: int = 100,
        embedding_kwargs: dict | None = None,
        encoder_only: bool = True,
        element_types: list[str] | tuple[str, ...] | None = None,
        cutoff: float = 4.0,
        gauss_width: float = 0.5,
    ) -> None:
        if element_types is None:
            element_types = all_elements()[: int(num_atom_embedding)]
        super().__init__(element_types, cutoff)
        for name, value in (("node_embed", node_embed), ("edge_embed", edge_embed), ("attr_embed", attr_embed)):
            if value is not None:
                raise ConfigError(f"MEGNet: {name} is not supported (matgl embeds elements itself); remove it")
        if atom_embedding_dim not in (None, node_feat_dim) or embedding_kwargs:
            raise ConfigError("MEGNet: atom_embedding_dim/embedding_kwargs are not supported; use node_feat_dim")
        if not encoder_only:
            raise ConfigError("MEGNet: encoder_only must be true: the task's output head makes the prediction")
        if int(graph_feat_dim) != NUM_GRAPH_VARIABLES:
            raise ConfigError(
                f"MEGNet: graph_feat_dim={graph_feat_dim}, but the structure state has {NUM_GRAPH_VARIABLES} "
                "variables (matsciml.datasets.transforms.upstream.graph_variables); set graph_feat_dim: 9"
            )
        if not hiddens or not conv_hiddens:
            raise ConfigError("MEGNet: hiddens and conv_hiddens must be non-empty lists of widths")
        library = self._library()
        self.model = library.MEGNet(
            dim_node_embedding=int(node_feat_dim),
            dim_edge_embedding=int(edge_feat_dim),
            dim_state_embedding=int(graph_feat_dim),
            nblocks=int(num_blocks),
            hidden_layer_sizes_input=tuple(int(h) for h in hiddens),
            hidden_layer_sizes_conv=tuple(int(h) for h in conv_hiddens),
            hidden_layer_sizes_output=tuple(int(h) for h in (output_hiddens or (32, 16))),
            nlayers_set2set=int(s2s_num_layers),
            niters_set2set=int(s2s_num_iters),
            is_classification=False,
            include_state=True,
            dropout=float(dropout or 0.0),
            element_types=self.element_types,
            cutoff=self.cutoff,
            gauss_width=float(gauss_width),
        )
        self.model.output_proj = nn.Identity()
        self.block_dim = int(conv_hiddens[-1])
        self.embedding_dim: int = 5 * self.block_dim

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch (dict with ``"graph"`` or a PyG graph); see the class docstring."""
        g = self.library_graph(batch)
        n = int(g.num_graphs)
        ei = g.edge_index
        length = (g.pos[ei[1]] + g.pbc_offshift - g.pos[ei[0]]).norm(dim=-1)
        state = graph_variables(g, ei, length)
        system = self.model(g, state).reshape(n, -1)
        features, self.model.feature_dict = self.model.feature_dict, {}
        last = features[f"gc_{len(self.model.blocks)}"]
        c = self.block_dim
        nodes, edges = last["node_feat"], last["edge_feat"]
        count = torch.zeros(nodes.shape[0], dtype=nodes.dtype, device=nodes.device).index_add(
            0, ei[0], torch.ones_like(length)
        )
        edge_mean = torch.zeros_like(nodes).index_add(0, ei[0], edges) / count.clamp_min(1)[:, None]
        per_graph = system[g.batch]
        point = torch.cat(
            [per_graph[:, :c], nodes, per_graph[:, 2 * c : 3 * c], edge_mean, per_graph[:, 4 * c :]], dim=-1
        )
        return Embeddings(system_embedding=system, point_embedding=point)
