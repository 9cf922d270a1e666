"""MACE (Batatia et al., 2022) from mace-torch as an encoder: ``matsciml.models.pyg.mace.MACEWrapper``.

The wrapper passes our periodic neighbour list to the MACE module unchanged (MACE computes
``r_ij = pos[j] - pos[i] + shift`` with ``shift = S @ cell``, our convention, the shift taken from
the batch's possibly strained cell so that stresses by the strain trick work) and returns the
invariant (``0e``) channels of every interaction layer as the per-atom embedding, as upstream did.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.models.embeddings import Embeddings
from matsciml.models.layers import check_readout, readout
from matsciml.models.optional import require
from matsciml.registry import register_encoder

__all__ = ["MACEWrapper"]

_SET_BY_WRAPPER = ("num_elements", "atomic_numbers", "atomic_energies", "hidden_irreps")
_READOUTS = {"add": "sum", "sum": "sum", "mean": "mean", "max": "max"}


class _NoReadout(nn.Module):
    """Stands in for MACE's energy readouts: the task's output head reads the embeddings."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.num_heads)


def _signature_names(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names


def _atomic_energies(value: Any, num_elements: int) -> torch.Tensor:
    if value is None:
        return torch.zeros(num_elements, dtype=torch.float64)
    if isinstance(value, Mapping):
        table = torch.zeros(num_elements, dtype=torch.float64)
        for z, energy in value.items():
            if not 1 <= int(z) <= num_elements:
                raise ConfigError(
                    f"MACEWrapper: atomic_energies has atomic number {z}, outside 1..{num_elements} "
                    "(num_atom_embedding)"
                )
            table[int(z) - 1] = float(energy)
        return table
    table = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if table.numel() != num_elements:
        raise ConfigError(
            f"MACEWrapper: atomic_energies has {table.numel()} values but num_atom_embedding is {num_elements}; "
            "give one energy per element 1..num_atom_embedding (or a mapping {Z: energy})"
        )
    return table


@register_encoder
class MACEWrapper(nn.Module):
    """mace-torch's MACE (or ``ScaleShiftMACE``, ...) as an encoder, with upstream's arguments.

    Embeddings: the point embedding concatenates the scalar (``0e``) channels of every
    interaction layer's output (``num_interactions x`` the scalars of ``hidden_irreps``: 256 for
    upstream's ``mace_pyg.yaml``); the system embedding is their ``readout_method`` over each
    structure. MACE's own energy readouts are replaced by parameter-free zeros: the task's output
    head predicts from the embeddings, so ``atomic_energies``, ``atomic_inter_scale`` and
    ``atomic_inter_shift`` (MACE's energy reference and scaling) are checked and stored in the
    module but do not change the embeddings; use the task's normalisation for reference energies.

    Parameters
    ----------
    atom_embedding_dim
        Number of scalar channels: ``hidden_irreps`` defaults to ``"{atom_embedding_dim}x0e"``.
    mace_module
        The MACE class (``class_instance: mace.modules.ScaleShiftMACE`` in YAML); default
        ``mace.modules.MACE``.
    num_atom_embedding
        Elements ``1 .. num_atom_embedding`` are known (one-hot node attributes, default 100).
    embedding_kwargs
        Upstream's; must be empty (MACE embeds elements itself).
    encoder_only
        Must be ``True`` (default).
    readout_method
        ``"add"`` (default, = ``"sum"``), ``"mean"`` or ``"max"``: system embedding from atoms.
    atomic_energies
        Per-element reference energies: a list/tensor of ``num_atom_embedding`` values (element
        ``Z`` at index ``Z - 1``), a mapping ``{Z: energy}`` or ``None`` (zeros).
    disable_forces
        Must be ``True`` (default): forces come from the task (autograd of its energy head).
    **mace_kwargs
        Arguments of the MACE class: ``r_max``, ``num_bessel``, ``num_polynomial_cutoff``,
        ``max_ell``, ``interaction_cls``, ``interaction_cls_first``, ``num_interactions``,
        ``MLP_irreps``, ``avg_num_neighbors``, ``correlation``, ``gate``, ``radial_type``,
        ``distance_transform``, ``atomic_inter_scale``, ``atomic_inter_shift`` (``ScaleShiftMACE``),
        ``hidden_irreps``, ...; an unknown key is an error naming the closest ones.

    Attributes
    ----------
    embedding_dim : int
        Width of both embeddings.

    Raises
    ------
    ConfigError
        mace-torch missing (the message says how to install it), an unknown or missing argument.

    Example YAML (from upstream's ``mace_pyg.yaml``)::

        encoder_class:
          class_path: matsciml.models.pyg.mace.MACEWrapper
        encoder_kwargs:
          mace_module: {class_instance: mace.modules.ScaleShiftMACE}
          MLP_irreps: {class_path: e3nn.o3.Irreps, init_args: {irreps: "16x0e"}}
          atom_embedding_dim: 128
          atomic_inter_scale: 0.8042
          atomic_inter_shift: 0.1641
          avg_num_neighbors: 61.96
          correlation: 3
          gate: {class_path: torch.nn.SiLU}
          interaction_cls: {class_instance: mace.modules.blocks.RealAgnosticResidualInteractionBlock}
          interaction_cls_first: {class_instance: mace.modules.blocks.RealAgnosticResidualInteractionBlock}
          max_ell: 3
          num_atom_embedding: 89
          num_bessel: 10
          num_interactions: 2
          num_polynomial_cutoff: 5.0
          r_max: 6.0
          radial_type: bessel
          distance_transform: None
    """

    def __init__(
        self,
        atom_embedding_dim: int,
        mace_module: Any = None,
        num_atom_embedding: int = 100,
        embedding_kwargs: Any = None,
        encoder_only: bool = True,
        readout_method: str = "add",
        atomic_energies: Any = None,
        disable_forces: bool = True,
        **mace_kwargs: Any,
    ) -> None:
        super().__init__()
        modules = require("mace.modules", "MACEWrapper")
        from e3nn import o3

        if embedding_kwargs:
            raise ConfigError(
                "MACEWrapper: embedding_kwargs is not used by MACE (it embeds elements itself); remove it"
            )
        if not encoder_only:
            raise ConfigError("MACEWrapper: encoder_only must be true: the task's output head makes the prediction")
        if not disable_forces:
            raise ConfigError(
                "MACEWrapper: disable_forces must be true: ForceRegressionTask computes forces (and stresses) "
                "by autograd of its energy"
            )
        if str(readout_method) not in _READOUTS:
            raise ConfigError(
                f"MACEWrapper: readout_method={readout_method!r}; {closest(str(readout_method), _READOUTS)}"
            )
        self.readout_mode = check_readout(_READOUTS[str(readout_method)])
        cls = modules.MACE if mace_module is None else mace_module
        if not (isinstance(cls, type) and issubclass(cls, modules.MACE)):
            raise ConfigError(
                f"MACEWrapper: mace_module must be a MACE class (e.g. class_instance: mace.modules.ScaleShiftMACE), "
                f"got {cls!r}"
            )
        valid = _signature_names(cls) - {"kwargs", "args"}
        for key in mace_kwargs:
            if key in _SET_BY_WRAPPER[:3]:
                raise ConfigError(
                    f"MACEWrapper: {key} is set from num_atom_embedding/atomic_energies; remove it from the config"
                )
            if key not in valid:
                raise ConfigError(f"MACEWrapper: {key!r} is not an argument of {cls.__name__}; {closest(key, valid)}")
        num_elements = int(num_atom_embedding)
        if num_elements < 1:
            raise ConfigError(f"MACEWrapper: num_atom_embedding={num_atom_embedding} must be positive")
        hidden = o3.Irreps(mace_kwargs.pop("hidden_irreps", f"{int(atom_embedding_dim)}x0e"))
        kwargs = dict(
            mace_kwargs,
            hidden_irreps=hidden,
            num_elements=num_elements,
            atomic_numbers=list(range(1, num_elements + 1)),
            atomic_energies=_atomic_energies(atomic_energies, num_elements).numpy(),
        )
        if isinstance(kwargs.get("MLP_irreps"), str):
            kwargs["MLP_irreps"] = o3.Irreps(kwargs["MLP_irreps"])
        required = [
            n
            for n, p in inspect.signature(cls).parameters.items()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for base in inspect.getmro(cls)[1:]:
            if base is modules.MACE:
                required += [
                    n
                    for n, p in inspect.signature(base).parameters.items()
                    if p.default is inspect.Parameter.empty and n not in required
                ]
        missing = [n for n in required if n not in kwargs and n != "kwargs"]
        if missing:
            raise ConfigError(f"MACEWrapper: {cls.__name__} needs the argument(s) {', '.join(missing)}")
        self.model = cls(**kwargs)
        self.model.readouts = nn.ModuleList(_NoReadout(len(self.model.heads)) for _ in self.model.readouts)
        scalar_index, offset = [], 0
        for product in self.model.products:
            irreps = o3.Irreps(product.linear.irreps_out)
            for (_, ir), sl in zip(irreps, irreps.slices()):
                if ir.l == 0 and ir.p == 1:
                    scalar_index.extend(range(offset + sl.start, offset + sl.stop))
            offset += irreps.dim
        self.register_buffer("scalar_index", torch.tensor(scalar_index, dtype=torch.long), persistent=False)
        self.num_elements = num_elements
        self.r_max = float(kwargs["r_max"])
        self.embedding_dim: int = len(scalar_index)

    def library_input(self, batch: Any) -> dict[str, torch.Tensor]:
        """The data dict MACE reads, built from our batch (see the module docstring).

        Raises
        ------
        DataError
            An atomic number outside ``1 .. num_atom_embedding``.
        """
        graph = G.get_graph(batch)
        z = G.atomic_numbers(graph)
        if z.numel() and (int(z.min()) < 1 or int(z.max()) > self.num_elements):
            raise DataError(
                f"MACEWrapper: atomic numbers {int(z.min())}..{int(z.max())} in the batch, but the model knows "
                f"1..{self.num_elements}; raise num_atom_embedding (and extend atomic_energies)"
            )
        pos = G.positions(graph)
        # MACE sets requires_grad on the positions it is given: give it its own leaf unless
        # the caller already differentiates through them
        positions = pos if pos.requires_grad else pos.detach()
        edge_index = G.edge_index(graph)
        unit_shifts = G.cell_shifts(graph).to(pos.dtype)
        batch_index = G.graph_index(graph)
        cell = G.cells(graph).to(pos.dtype)
        shifts = torch.einsum("ek,ekl->el", unit_shifts, cell[batch_index[edge_index[0]]])
        inside = (pos[edge_index[1]] - pos[edge_index[0]] + shifts).norm(dim=-1) < self.r_max
        if not bool(inside.all()):
            edge_index, shifts, unit_shifts = edge_index[:, inside], shifts[inside], unit_shifts[inside]
        counts = torch.bincount(batch_index, minlength=int(G.num_graphs(graph)))
        return {
            "positions": positions,
            "node_attrs": torch.nn.functional.one_hot(z - 1, self.num_elements).to(pos.dtype),
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "cell": cell.reshape(-1, 3),
            "batch": batch_index,
            "ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        }

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch (dict with ``"graph"`` or a PyG graph); see the class docstring.

        Raises
        ------
        DataError
            An atomic number outside ``1 .. num_atom_embedding``.
        """
        data = self.library_input(batch)
        out = self.model(data, training=self.training, compute_force=False)
        point = out["node_feats"].index_select(-1, self.scalar_index)
        num_graphs = data["ptr"].numel() - 1
        system = readout(point, data["batch"], num_graphs, self.readout_mode)
        return Embeddings(system_embedding=system, point_embedding=point)
