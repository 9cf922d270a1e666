"""M3GNet (Chen & Ong, 2022) from matgl as an encoder."""

from __future__ import annotations

from typing import Any

from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.models.embeddings import Embeddings
from matsciml.models.matgl.base import MatGLEncoder, check_library_kwargs
from matsciml.registry import register_encoder

__all__ = ["M3GNet"]

_SET_BY_WRAPPER = ("element_types", "cutoff", "threebody_cutoff", "is_intensive", "task_type", "ntargets")


@register_encoder
class M3GNet(MatGLEncoder):
    """matgl's M3GNet: many-body graph network with three-body interactions.

    matgl builds its three-body (line) graph from our edges within ``threebody_cutoff``; no
    second neighbour list is computed. The point embedding is the node features of the last
    block, the system embedding matgl's readout of them (``readout_type``: ``weighted_atom``
    by default). matgl's final MLP is replaced by ``nn.Identity``: the task's head predicts.

    Parameters
    ----------
    element_types
        Element symbols (see :class:`~matsciml.models.matgl.base.MatGLEncoder`); default all.
    return_all_layer_output
        Accepted for upstream configs. The wrapper always reads the last block's node
        features (matgl >= 4 keeps every layer's output in ``feature_dict``), so it has no effect.
    cutoff
        Two-body cutoff in Å (default 5.0, matgl's).
    threebody_cutoff
        Three-body cutoff in Å (default 4.0, matgl's).
    **kwargs
        Any other argument of ``matgl.models.M3GNet`` (``dim_node_embedding``, ``units``,
        ``nblocks``, ``max_n``, ``max_l``, ``rbf_type``, ``readout_type``, ``include_state``,
        ...); an unknown key is an error. ``units`` must equal ``dim_node_embedding`` for the
        default readout so both embeddings have one width.

    Attributes
    ----------
    embedding_dim : int
        Width of both embeddings (64 with matgl's defaults).

    Raises
    ------
    ConfigError
        matgl is missing (the message names the extra), an unknown argument, unequal widths.

    Example YAML (upstream's ``m3gnet_dgl.yaml``)::

        encoder_class:
          class_path: matsciml.models.M3GNet
        encoder_kwargs:
          element_types:
            class_path: matsciml.datasets.utils.element_types
          return_all_layer_output: True
    """

    def __init__(
        self,
        element_types: list[str] | tuple[str, ...] | None = None,
        return_all_layer_output: bool = False,
        cutoff: float = 5.0,
        threebody_cutoff: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(element_types, cutoff)
        library = self._library()
        check_library_kwargs(library.M3GNet, kwargs, "M3GNet", _SET_BY_WRAPPER)
        if kwargs.get("include_state"):
            raise ConfigError("M3GNet: include_state needs per-structure state attributes, which batches do not carry")
        self.return_all_layer_output = bool(return_all_layer_output)
        self.model = library.M3GNet(
            element_types=self.element_types,
            cutoff=self.cutoff,
            threebody_cutoff=float(threebody_cutoff),
            is_intensive=True,
            task_type="regression",
            **kwargs,
        )
        self.model.final_layer = nn.Identity()
        node_dim = self.model.embedding.layer_node_embedding.embedding_dim
        readout = self.model.readout_type
        system_dim = {"weighted_atom": self.model.units, "set2set": 2 * node_dim}.get(readout, node_dim)
        if system_dim != node_dim:
            raise ConfigError(
                f"M3GNet: the {readout} readout gives {system_dim} features per structure but atoms have "
                f"dim_node_embedding={node_dim}; set units = dim_node_embedding (or readout_type: reduce_atom)"
            )
        self.embedding_dim: int = int(node_dim)

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch (dict with ``"graph"`` or a PyG graph); see the class docstring."""
        g = self.library_graph(batch)
        self.model(g)
        features, self.model.feature_dict = self.model.feature_dict, {}
        point = features[f"gc_{self.model.n_blocks}"]["node_feat"]
        system = features["readout"].reshape(int(g.num_graphs), -1)
        return Embeddings(system_embedding=system, point_embedding=point)
