"""TensorNet (Simeon & De Fabritiis, 2023) from matgl as an encoder."""

from __future__ import annotations

from typing import Any

from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.models.embeddings import Embeddings
from matsciml.models.matgl.base import MatGLEncoder, check_library_kwargs
from matsciml.registry import register_encoder

__all__ = ["TensorNet"]

_SET_BY_WRAPPER = ("element_types", "cutoff", "is_intensive", "task_type", "ntargets", "use_warp")


@register_encoder
class TensorNet(MatGLEncoder):
    """matgl's TensorNet: O(3)-equivariant Cartesian-tensor message passing.

    The point embedding is TensorNet's per-atom invariant features (norms of the scalar,
    skew and traceless parts of the atom tensors, normalised and projected to ``units``); the
    system embedding matgl's readout of them (``weighted_atom`` by default). matgl's final MLP
    is replaced by ``nn.Identity``: the task's head predicts. matgl's warp kernels are not used
    (``use_warp=False``): the plain PyTorch path runs on every device and dtype.

    Parameters
    ----------
    element_types
        Element symbols (see :class:`~matsciml.models.matgl.base.MatGLEncoder`); default all.
    cutoff
        Cutoff radius in Å (default 5.0, matgl's).
    **kwargs
        Any other argument of ``matgl.models.TensorNet``: ``units`` (64), ``nblocks`` (2),
        ``num_rbf`` (32), ``max_n``/``max_l`` (3, used by the ``SphericalBessel`` basis),
        ``rbf_type`` (``Gaussian``), ``use_smooth``, ``activation_type``,
        ``equivariance_invariance_group``, ``readout_type``, ...; an unknown key is an error.

    Attributes
    ----------
    embedding_dim : int
        ``units``.

    Raises
    ------
    ConfigError
        matgl is missing (the message names the extra) or an unknown argument.

    Example YAML (upstream's ``tensornet_dgl.yaml``)::

        encoder_class:
          class_path: matsciml.models.TensorNet
        encoder_kwargs:
          element_types:
            class_path: matsciml.datasets.utils.element_types
          num_rbf: 32
          max_n: 3
          max_l: 3
    """

    def __init__(
        self,
        element_types: list[str] | tuple[str, ...] | None = None,
        cutoff: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(element_types, cutoff)
        library = self._library()
        check_library_kwargs(library.TensorNet, kwargs, "TensorNet", _SET_BY_WRAPPER)
        if kwargs.get("include_state"):
            raise ConfigError(
                "TensorNet: include_state needs per-structure state attributes, which batches do not carry"
            )
        self.model = library.TensorNet(
            element_types=self.element_types,
            cutoff=self.cutoff,
            is_intensive=True,
            task_type="regression",
            use_warp=False,
            **kwargs,
        )
        self.model.final_layer = nn.Identity()
        self.embedding_dim: int = int(self.model.units)

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch (dict with ``"graph"`` or a PyG graph); see the class docstring."""
        g = self.library_graph(batch)
        point = self.model.forward_features(g)["readout"]
        system = self.model.readout(point, g.batch).reshape(int(g.num_graphs), -1)
        return Embeddings(system_embedding=system, point_embedding=point)
