"""An E(3)-equivariant interatomic encoder on e3nn (NequIP-style interactions).

Each atom carries features made of irreducible representations of O(3) (scalars ``0e``,
vectors ``1o``, rank-2 tensors ``2e``, ...). An interaction layer

1. mixes the channels of each atom (``o3.Linear``),
2. couples the neighbour's features with the spherical harmonics of the edge direction
   (``o3.TensorProduct``, one weight per path and channel, produced per edge by an MLP of a
   Bessel radial basis); messages are multiplied by a polynomial cutoff envelope, so they
   vanish smoothly at the cutoff,
3. sums the messages onto the centre atom, divided by ``sqrt(avg_num_neighbors)``,
4. adds a self-connection (``o3.Linear`` of the layer input), applies a gated nonlinearity
   (``e3nn.nn.Gate``: SiLU on scalars, sigmoid gates on higher orders) and, when input and
   output irreps agree, a residual connection.

The last layer outputs scalars only, and the irreps of each layer are pruned to those that
can reach the final scalars, so every parameter influences the output (no unused parameters).
The scalar channels of the last layer are projected linearly to ``embedding_dim`` per atom;
the system embedding is their readout. Both embeddings are E(3)-invariant; forces by autograd
are equivariant and the model is twice differentiable (force losses).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError
from matsciml.models import layers as L
from matsciml.models.embeddings import Embeddings

__all__ = ["E3NNEncoder", "NequIPEncoder", "Interaction", "plan_irreps"]

_SCALAR = o3.Irrep("0e")


def _products(ir_in: o3.Irrep, irreps_sh: o3.Irreps) -> set[o3.Irrep]:
    return {ir_out for _, ir_sh in irreps_sh for ir_out in ir_in * ir_sh}


def plan_irreps(hidden_irreps: o3.Irreps, irreps_sh: o3.Irreps, num_layers: int) -> tuple[o3.Irreps, list[o3.Irreps]]:
    """Choose the output irreps of every layer.

    Layers ``0 .. num_layers - 2`` target ``hidden_irreps``, the last layer its scalars
    (``0e``). An irrep is kept in a layer's output only if it can be produced from the layer's
    input (by a tensor product with ``irreps_sh`` or the self-connection) and if it can
    contribute to the final scalars, so no weight is left without effect on the output.

    Parameters
    ----------
    hidden_irreps
        Target irreps of the hidden layers (sorted, simplified); must contain ``0e``.
    irreps_sh
        Irreps of the edge spherical harmonics (``0e + 1o + 2e + ...``).
    num_layers
        Number of interaction layers (>= 1).

    Returns
    -------
    tuple
        The input irreps of the first layer (the scalars of ``hidden_irreps``) and the list of
        output irreps, one per layer.
    """
    num_scalars = sum(mul for mul, ir in hidden_irreps if ir == _SCALAR)
    first = o3.Irreps(f"{num_scalars}x0e")
    targets = [hidden_irreps] * (num_layers - 1) + [first]
    # forward: what each layer can produce from its input
    outs: list[o3.Irreps] = []
    current = first
    for target in targets:
        reach = {ir for _, ir in current}
        for _, ir in current:
            reach |= _products(ir, irreps_sh)
        current = o3.Irreps([(mul, ir) for mul, ir in target if ir in reach])
        outs.append(current)
    # backward: keep only what reaches the final scalars
    needed = {_SCALAR}
    for k in reversed(range(num_layers)):
        outs[k] = o3.Irreps([(mul, ir) for mul, ir in outs[k] if ir in needed])
        kept = {ir for _, ir in outs[k]}
        layer_in = outs[k - 1] if k else first
        needed = {ir for _, ir in layer_in if ir in kept or _products(ir, irreps_sh) & kept}
    return first, outs


class Interaction(nn.Module):
    """One NequIP-style interaction layer (see the module docstring).

    Parameters
    ----------
    irreps_in
        Irreps of the input node features.
    irreps_out
        Target output irreps (sorted, simplified); the true output is :attr:`irreps_out`.
    irreps_sh
        Irreps of the edge spherical harmonics.
    num_radial_basis
        Width of the radial basis fed to the weight MLP.
    radial_hidden
        Width of the two hidden layers of the weight MLP.
    activation
        Activation of the weight MLP and of the even scalars (odd scalars use ``tanh``).
    residual
        Add the input to the output when their irreps agree.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_radial_basis: int,
        radial_hidden: int,
        activation: str = "silu",
        residual: bool = True,
    ) -> None:
        super().__init__()
        allowed = {ir for _, ir in irreps_out}
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in allowed:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid, perm, _ = o3.Irreps(mid).sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]

        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        act = L.get_activation(activation)
        self.gate = Gate(
            scalars,
            [act if ir.p == 1 else torch.tanh for _, ir in scalars],
            o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps(""),
            [torch.sigmoid] if gated.num_irreps else [],
            gated,
        )
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = self.gate.irreps_out
        self.linear_in = o3.Linear(irreps_in, irreps_in)
        self.tp = o3.TensorProduct(
            irreps_in, irreps_sh, irreps_mid, instructions, shared_weights=False, internal_weights=False
        )
        self.radial = L.build_mlp([num_radial_basis, radial_hidden, radial_hidden, self.tp.weight_numel], activation)
        self.linear_out = o3.Linear(irreps_mid.simplify(), self.gate.irreps_in)
        self.self_connection = o3.Linear(irreps_in, self.gate.irreps_in)
        self.residual = bool(residual) and self.irreps_in == self.irreps_out

    def forward(
        self,
        h: torch.Tensor,
        sh: torch.Tensor,
        radial: torch.Tensor,
        edge_index: torch.Tensor,
        norm: torch.Tensor | float,
    ) -> torch.Tensor:
        """Update node features.

        Parameters
        ----------
        h
            Node features ``[num_nodes, irreps_in.dim]``.
        sh
            Edge spherical harmonics times the cutoff envelope ``[num_edges, irreps_sh.dim]`` (the
            tensor product is linear in them, so this is the same as enveloping the messages).
        radial
            Radial basis ``[num_edges, num_radial_basis]``.
        edge_index
            ``[2, num_edges]``: row 0 centre (messages summed onto it), row 1 neighbour.
        norm
            Factor applied to the summed messages (``1 / sqrt(avg_num_neighbors)``).

        Returns
        -------
        torch.Tensor
            ``[num_nodes, irreps_out.dim]``.
        """
        i, j = edge_index[0], edge_index[1]
        messages = self.tp(self.linear_in(h)[j], sh, self.radial(radial))
        aggregated = L.scatter_sum(messages, i, h.shape[0]) * norm
        out = self.gate(self.linear_out(aggregated) + self.self_connection(h))
        return out + h if self.residual else out


class E3NNEncoder(nn.Module):
    """E(3)-equivariant message-passing encoder with invariant outputs.

    Parameters
    ----------
    num_layers
        Number of interaction layers (default 3, >= 1).
    hidden_irreps
        Irreps of the hidden node features (default ``"32x0e + 16x1o + 8x2e"``); must contain ``0e``.
        Irreps that cannot reach the final scalars are dropped (see :func:`plan_irreps`).
    max_ell
        Highest order of the edge spherical harmonics (default 2).
    num_radial_basis
        Number of Bessel radial basis functions (default 8).
    cutoff
        Cutoff radius in Å (default 5.0). Edges longer than this are ignored; messages vanish smoothly
        at it (polynomial envelope, exponent ``envelope_exponent``). Build graphs with at least this radius.
    num_elements
        Size of the atom embedding table: atomic numbers ``0 .. num_elements - 1`` (default 100).
    embedding_dim
        Width ``D`` of the output embeddings (default 64).
    radial_hidden
        Width of the hidden layers of the radial weight MLP (default 64).
    avg_num_neighbors
        Messages summed onto an atom are divided by ``sqrt(avg_num_neighbors)``. Default ``None``: set
        from the first batch seen (edges per atom within ``cutoff``) and kept in the ``avg_num_neighbors``
        buffer, saved in checkpoints. Give a number (e.g. the training-set average) for runs that must
        not depend on the first batch. ``torch.export`` uses the buffer as it is: set it (or run a batch)
        before exporting.
    readout
        ``"mean"`` (default), ``"sum"`` or ``"max"`` over the atoms of each structure.
    envelope_exponent
        Exponent ``p`` of the polynomial cutoff envelope (default 6).
    activation
        Activation of the radial MLP and of the scalar channels (default ``"silu"``).
    residual
        Residual connections between layers with equal irreps (default ``True``).

    Attributes
    ----------
    embedding_dim : int
        Width ``D`` of both embeddings.

    Notes
    -----
    Under ``torch.export`` (``torch.compiler.is_exporting()``) the forward pass takes no decision on
    tensor values, so that one program serves any number of atoms, edges and structures: edges beyond
    ``cutoff`` are kept instead of dropped (the envelope is zero there, so their messages vanish and the
    predictions are the same, at the cost of the extra edges), ``avg_num_neighbors`` is read as a tensor
    and is not set from the batch, and atomic numbers are not range-checked.

    Raises
    ------
    ConfigError
        Invalid irreps, no ``0e`` channel, non-positive sizes or an unknown readout/activation.

    Example YAML::

        encoder_class:
          class_path: matsciml.models.E3NNEncoder
        encoder_kwargs:
          num_layers: 3
          hidden_irreps: 32x0e + 16x1o + 8x2e
          max_ell: 2
          num_radial_basis: 8
          cutoff: 5.0
          embedding_dim: 64
          radial_hidden: 64
          avg_num_neighbors: 40.0
          readout: mean
    """

    def __init__(
        self,
        num_layers: int = 3,
        hidden_irreps: str = "32x0e + 16x1o + 8x2e",
        max_ell: int = 2,
        num_radial_basis: int = 8,
        cutoff: float = 5.0,
        num_elements: int = 100,
        embedding_dim: int = 64,
        radial_hidden: int = 64,
        avg_num_neighbors: float | None = None,
        readout: str = "mean",
        envelope_exponent: int = 6,
        activation: str = "silu",
        residual: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("num_radial_basis", num_radial_basis),
            ("num_elements", num_elements),
            ("embedding_dim", embedding_dim),
            ("radial_hidden", radial_hidden),
        ):
            if int(value) < 1:
                raise ConfigError(f"E3NNEncoder: {name}={value} must be a positive integer")
        if int(max_ell) < 0:
            raise ConfigError(f"E3NNEncoder: max_ell={max_ell} must be >= 0")
        if avg_num_neighbors is not None and float(avg_num_neighbors) <= 0:
            raise ConfigError(f"E3NNEncoder: avg_num_neighbors={avg_num_neighbors} must be positive or null")
        try:
            hidden = o3.Irreps(hidden_irreps).sort().irreps.simplify()
        except (ValueError, AssertionError) as err:
            raise ConfigError(
                f"E3NNEncoder: hidden_irreps={hidden_irreps!r} is not an irreps string like '32x0e + 16x1o' ({err})"
            ) from None
        if not any(ir == _SCALAR and mul > 0 for mul, ir in hidden):
            raise ConfigError(f"E3NNEncoder: hidden_irreps={hidden_irreps!r} needs scalar channels ('Nx0e')")
        self.readout_mode = L.check_readout(readout)
        L.get_activation(activation, "E3NNEncoder: activation")

        self.cutoff = float(cutoff)
        self.embedding_dim: int = int(embedding_dim)
        self.irreps_sh = o3.Irreps.spherical_harmonics(int(max_ell))
        irreps_first, outs = plan_irreps(hidden, self.irreps_sh, int(num_layers))

        self.atom_embedding = L.AtomEmbedding(num_elements, irreps_first.dim)
        self.spherical_harmonics = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.radial_basis = L.BesselBasis(num_radial_basis, self.cutoff)
        self.envelope = L.PolynomialCutoff(self.cutoff, envelope_exponent)
        blocks, irreps = [], irreps_first
        for target in outs:
            layer = Interaction(irreps, target, self.irreps_sh, num_radial_basis, radial_hidden, activation, residual)
            blocks.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(blocks)
        self.output = nn.Linear(irreps.dim, self.embedding_dim)
        value = math.nan if avg_num_neighbors is None else float(avg_num_neighbors)
        self.register_buffer("avg_num_neighbors", torch.tensor(value, dtype=torch.float64))

    def forward(self, batch: Any) -> Embeddings:
        """Embed a batch, as every encoder does (see :mod:`matsciml.models.encoders`).

        Raises
        ------
        DataError
            Unknown atomic number.
        """
        graph, z, ei, vec = G.edge_geometry(batch)
        length = vec.norm(dim=-1)
        if torch.compiler.is_exporting():
            # no decision on tensor values: edges beyond the cutoff are kept (their envelope is 0,
            # so their messages are 0) and avg_num_neighbors is the value already set
            norm = self.avg_num_neighbors.pow(-0.5)
        else:
            inside = length < self.cutoff
            if not bool(inside.all()):
                ei, vec, length = ei[:, inside], vec[inside], length[inside]
            n = z.shape[0]
            if torch.isnan(self.avg_num_neighbors):
                with torch.no_grad():
                    self.avg_num_neighbors.fill_(max(ei.shape[1] / max(n, 1), 1.0))
            norm = float(self.avg_num_neighbors) ** -0.5

        sh = self.spherical_harmonics(vec) * self.envelope(length).unsqueeze(-1)
        radial = self.radial_basis(length)
        h = self.atom_embedding(z)
        for layer in self.layers:
            h = layer(h, sh, radial, ei, norm)
        point = self.output(h)
        system = L.readout(point, G.graph_index(graph), G.num_graphs(graph), self.readout_mode)
        return Embeddings(system_embedding=system, point_embedding=point)


#: Alias: the interaction layers follow NequIP (Batzner et al., 2022).
NequIPEncoder = E3NNEncoder
