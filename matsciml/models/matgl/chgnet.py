"""CHGNet (Deng et al., 2023) from matgl as an encoder."""

from __future__ import annotations

from typing import Any

from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.models.embeddings import Embeddings
from matsciml.models.matgl.base import MatGLEncoder, check_library_kwargs
from matsciml.registry import register_encoder

__all__ = ["CHGNet"]

_SET_BY_WRAPPER = ("element_types", "cutoff", "threebody_cutoff", "is_intensive", "task_type", "num_targets")


@register_encoder
class CHGNet(MatGLEncoder):
    """matgl's CHGNet: atom, bond and angle graphs with shared radial weights.

    matgl builds its directed bond (line) graph from our edges within ``threebody_cutoff``,
    using their integer periodic shifts to recognise back-tracking pairs. The point embedding is
    the atom features of the last block, the system embedding their pooling
    (``pooling_operation``: ``sum`` by default, as in matgl). matgl's final MLP is replaced by
    ``nn.Identity`` (the task's head predicts) and its site-wise magnetic-moment readout is off
    (``num_site_targets: 0``) unless asked for: its output is not part of the embeddings. The
    updates whose results cannot reach the atom features (bond features after the last atom
    layer, angle features after the last bond layer, and the shared bond weights when no atom
    layer updates bonds) are removed, so that every parameter is trained (no unused parameters
    under DDP) and no time is spent on them.

    Parameters
    ----------
    element_types
        Element symbols (see :class:`~matsciml.models.matgl.base.MatGLEncoder`); default all.
    cutoff
        Atom-graph cutoff in Å (default 6.0, matgl's).
    threebody_cutoff
        Bond-graph cutoff in Å (default 3.0, matgl's).
    num_site_targets
        Width of matgl's site-wise readout (default 0: off; its output is not used here).
    **kwargs
        Any other argument of ``matgl.models.CHGNet`` (``dim_atom_embedding``, ``num_blocks``,
        ``max_n``, ``max_f``, ``readout_field``, ...); an unknown key is an error. The
        ``readout_field`` must be ``atom_feat`` (the default): the point embedding is per atom.

    Attributes
    ----------
    embedding_dim : int
        ``dim_atom_embedding`` (64 by default).

    Raises
    ------
    ConfigError
        matgl is missing (the message names the extra), an unknown argument, another readout field.

    Example YAML (upstream's ``chgnet_dgl.yaml``)::

        encoder_class:
          class_path: matsciml.models.CHGNet
        encoder_kwargs:
          element_types:
            class_path: matsciml.datasets.utils.element_types
    """

    def __init__(
        self,
        element_types: list[str] | tuple[str, ...] | None = None,
        cutoff: float = 6.0,
        threebody_cutoff: float = 3.0,
        num_site_targets: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(element_types, cutoff)
        library = self._library()
        check_library_kwargs(library.CHGNet, kwargs, "CHGNet", _SET_BY_WRAPPER)
        if kwargs.get("readout_field", "atom_feat") != "atom_feat":
            raise ConfigError(
                f"CHGNet: readout_field={kwargs['readout_field']!r} is not supported by the encoder; use atom_feat"
            )
        if kwargs.get("dim_state_feats") is not None:
            raise ConfigError(
                "CHGNet: dim_state_feats needs per-structure state attributes, which batches do not carry"
            )
        self.model = library.CHGNet(
            element_types=self.element_types,
            cutoff=self.cutoff,
            threebody_cutoff=float(threebody_cutoff),
            num_site_targets=int(num_site_targets),
            **kwargs,
        )
        self.model.final_layer = nn.Identity()
        self.model.final_dropout = nn.Identity()
        _remove_dead_updates(self.model)
        self.embedding_dim: int = int(self.model.atom_embedding.embedding_dim)

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch (dict with ``"graph"`` or a PyG graph); see the class docstring."""
        g = self.library_graph(batch)
        pooled = self.model(g)
        features, self.model.feature_dict = self.model.feature_dict, {}
        point = features[f"gc_{self.model.n_blocks}"]["atom_feat"]
        return Embeddings(system_embedding=pooled.reshape(int(g.num_graphs), -1), point_embedding=point)


def _remove_dead_updates(model: nn.Module) -> None:
    """Drop the parts of a matgl CHGNet whose outputs never reach the last atom features."""
    last_atom = model.atom_graph_layers[-1]
    last_atom.conv.edge_update_func = None
    last_atom.bond_norm = None
    if model.bond_graph_layers is not None and len(model.bond_graph_layers):
        model.bond_graph_layers[-1].conv.edge_update_func = None
    if all(layer.conv.edge_update_func is None for layer in model.atom_graph_layers):
        model.bond_bond_weights = None
