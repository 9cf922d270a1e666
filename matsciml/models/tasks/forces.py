"""``ForceRegressionTask``: energy, forces (and stress) of structures by autograd.

The energy is extensive: a head on every atom's embedding gives an atomic energy, and
a structure's energy is their sum. Forces are ``F = -dE/dpos`` and the stress
(ASE's sign and units, eV/Å^3) is ``sigma = (1/V) dE/d(strain)``, both by automatic
differentiation, so they are exact derivatives of the predicted energy.

The stress uses a symmetric strain ``eps`` applied to the positions and the cell
(``pos' = pos (I + eps)``, ``cell' = cell (I + eps)``) at ``eps = 0``; the encoder must
compute its edge vectors from ``graph.pos`` and ``graph.cell`` (as
:func:`matsciml.common.graph.edge_vectors` does).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from matsciml.common.errors import ConfigError, DataError
from matsciml.common.graph import atomic_numbers, cells, get_graph, graph_index, is_dgl_graph, positions
from matsciml.models.embeddings import Embeddings
from matsciml.models.heads import OutputHead
from matsciml.models.losses import masked_loss
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.energy_scale import AtomicEnergyScale, energy_settings
from matsciml.models.tasks.metrics import REGRESSION
from matsciml.models.tasks.normalization import TargetNormalizer
from matsciml.registry import register_task

__all__ = ["ForceRegressionTask", "energy_and_derivatives", "DEFAULT_FORCES_WEIGHT"]

#: Default weight of the (normalised) force loss; the energy's is 1.
DEFAULT_FORCES_WEIGHT = 10.0

_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _plain_graph(graph: Any) -> Any:
    """A shallow copy of a PyG graph whose tensors are usable by autograd.

    Tensors made under ``torch.inference_mode`` (Lightning's default for validation,
    test and predict) cannot take part in autograd; they are cloned into normal tensors
    (the caller must be outside inference mode).
    """
    if is_dgl_graph(graph):
        raise ConfigError("ForceRegressionTask needs PyG graphs (PointCloudToGraphTransform with backend: pyg)")
    out = copy.copy(graph)
    if any(isinstance(v, torch.Tensor) and v.is_inference() for v in out.to_dict().values()):
        out = out.apply(lambda t: t.clone())
    return out


def energy_and_derivatives(
    energy_fn: Callable[[Any], torch.Tensor],
    graph: Any,
    forces: bool = True,
    stress: bool = False,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Energy of each structure and its derivatives by autograd.

    Parameters
    ----------
    energy_fn
        ``energy_fn(graph) -> [num_graphs]`` energies; must compute geometry from
        ``graph.pos`` (and ``graph.cell`` for the stress).
    graph
        A PyG ``Data``/``Batch``; it is not modified (a shallow copy gets the new
        positions and cell).
    forces
        Return ``forces`` ``[num_nodes, 3]`` = ``-dE/dpos``.
    stress
        Return ``stress`` ``[num_graphs, 3, 3]`` = ``(1/V) dE/d(strain)``.
    create_graph
        Keep the graph of the derivatives (needed to train on them).

    Returns
    -------
    dict
        ``energy`` ``[num_graphs]`` and the requested derivatives, in the units of
        ``energy_fn`` (per Å for forces, per Å^3 for stress).

    Raises
    ------
    ConfigError
        The energy does not depend on the positions (the encoder reads precomputed
        geometry).
    DataError
        A stress is requested for a structure without a cell (zero volume).
    """
    graph = _plain_graph(graph)
    pos = positions(graph).detach().requires_grad_(forces)
    inputs = [pos] if forces else []
    if stress:
        cell = cells(graph).detach().to(pos.dtype)
        volume = torch.linalg.det(cell).abs()
        if bool((volume < 1e-8).any()):
            bad = torch.nonzero(volume < 1e-8).flatten().tolist()
            raise DataError(f"stress requested, but structures {bad} of the batch have no cell (volume 0)")
        displacement = torch.zeros_like(cell, requires_grad=True)
        strain = 0.5 * (displacement + displacement.transpose(1, 2))
        node_graph = graph_index(graph).to(pos.device)
        graph.pos = pos + torch.bmm(pos.unsqueeze(1), strain[node_graph]).squeeze(1)
        graph.cell = cell + torch.bmm(cell, strain)
        inputs.append(displacement)
    else:
        graph.pos = pos
    energy = energy_fn(graph)
    out = {"energy": energy}
    if not inputs:
        return out
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
    if any(g is None for g in grads):
        raise ConfigError(
            "the predicted energy does not depend on the atom positions: the encoder must compute edge vectors "
            "from graph.pos (and graph.cell), e.g. with matsciml.common.graph.edge_vectors"
        )
    if forces:
        out["forces"] = -grads[0]
    if stress:
        out["stress"] = grads[-1] / volume[:, None, None]
    return out


@register_task(aliases=["force_regression"])
class ForceRegressionTask(BaseTaskModule):
    """Train an encoder on energies and forces (and optionally stresses).

    A single head ``output_heads["energy"]`` maps each atom's embedding to an atomic
    energy; the structure energy is their sum (extensive). Forces ``-dE/dpos`` and, when
    ``"stress"`` is a task key, the stress ``(1/V) dE/d(strain)`` (eV/Å^3, ASE's sign)
    come from autograd (``create_graph=True`` when the loss is to be backpropagated).

    Parameters are those of :class:`~matsciml.models.tasks.base.BaseTaskModule`, with:

    task_keys
        Subset of ``["energy", "forces", "stress"]``, default ``["energy", "forces"]``.
        Targets: ``energy`` ``[B]`` (eV, total), ``forces`` ``[sum N, 3]`` (eV/Å),
        ``stress`` ``[B, 3, 3]`` (or Voigt ``[B, 6]`` in ASE order), eV/Å^3.
    loss_func
        Default ``torch.nn.L1Loss`` (per element).
    task_loss_scaling
        Default ``{energy: 1, forces: DEFAULT_FORCES_WEIGHT, stress: 1}`` on the
        normalised losses (see below): forces weigh more than energies, as in the
        interatomic potentials (nequip, MACE), because a structure has one energy and
        ``3N`` force components that carry most of the information.
    auto_normalize, target_stats
        Default: with no hand-set ``energy_mean``/``energy_std``, the training split's
        statistics set the per-atom energy ``e_i = scale * u_i + E0[Z_i]``: per-element
        reference energies ``E0`` by least squares on composition, ``scale`` the force
        RMS (see :mod:`~matsciml.models.tasks.energy_scale`); the energy loss is
        normalised by the RMS of the residuals ``E - sum E0``, the force loss by the
        force RMS.
    normalize_kwargs
        Only ``energy_mean`` and ``energy_std`` count; when given, they win over the
        statistics: ``E = energy_std * sum_i u_i + energy_mean`` and every loss is
        normalised by ``energy_std`` (forces and stress are scaled by it, mean 0, which
        keeps them the exact derivatives of the energy).

    Validation, test and prediction need gradients: the task enables them itself
    (``torch.inference_mode(False)`` and ``torch.enable_grad()``, cloning tensors made in
    inference mode), so ``Trainer(inference_mode=True)`` (the default) works; outside
    training the predictions are detached.

    Logged: ``<split>_loss``, ``<split>_total``, ``<split>_<key>`` and
    ``<split>_<key>_mae`` (forces: over every component of every atom).

    Example YAML (experiment config)::

        model: egnn
        dataset:
          lips:
            - task: ForceRegressionTask
              targets: [energy, forces]

    Raises
    ------
    ConfigError
        Unknown task keys, DGL graphs, an encoder whose energy ignores the positions.
    DataError
        Missing targets, or stress for a structure without a cell.
    """

    default_loss = nn.L1Loss
    default_loss_scaling = {"energy": 1.0, "forces": DEFAULT_FORCES_WEIGHT, "stress": 1.0}
    extensive_keys = ("energy",)
    default_task_keys = ("energy", "forces")
    allowed_task_keys = ("energy", "forces", "stress")
    metric_kind = REGRESSION

    def _make_output_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"energy": OutputHead(output_dim=1, **self.output_kwargs)})

    def _make_normalizer(self, normalize_kwargs: Any) -> TargetNormalizer:
        normalizer = TargetNormalizer(normalize_kwargs, ["energy"], derived={"forces": "energy", "stress": "energy"})
        hand = normalizer.given("energy")
        if not hasattr(self, "energy_scale"):
            self.energy_scale = AtomicEnergyScale(energy_settings(hand, None))
        return normalizer

    def _statistics_keys(self) -> list[str]:
        if "energy" in self._hand_set_keys():
            return []
        return [key for key in self.allowed_task_keys if key in self.task_keys]

    def _apply_target_stats(self, stats: dict[str, Any]) -> None:
        hand = self.normalizer.given("energy")
        self.energy_scale.configure(energy_settings(hand, stats))

    def _target_layout(self, key: str) -> str:
        return {
            "energy": "one energy per structure, [num_graphs]",
            "forces": "one force per atom, [num_nodes, 3]",
            "stress": "one 3x3 stress per structure, [num_graphs, 3, 3]",
        }[key]

    def _target(self, batch: Any, key: str, like: torch.Tensor) -> torch.Tensor:
        if key == "stress":
            target = batch.get("targets", {}).get("stress") if isinstance(batch, dict) else None
            if isinstance(target, torch.Tensor) and target.dim() == 2 and target.shape[-1] == 6:
                full = target.new_zeros(target.shape[0], 3, 3)
                for index, (i, j) in enumerate(_VOIGT):
                    full[:, i, j] = target[:, index]
                    full[:, j, i] = target[:, index]
                batch = {**batch, "targets": {**batch["targets"], "stress": full}}
        return super()._target(batch, key, like)

    def _predict(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, Any]:
        """``(predictions in data units, normalised predictions, energy offsets, embeddings)``.

        Normalised: energy ``(E - offset) / energy_loss_scale`` with ``offset`` the
        ``[num_graphs]`` energy of the references (``sum_i E0[Z_i] + energy_mean``), forces
        and stress divided by their loss scales (see :mod:`~matsciml.models.tasks.energy_scale`).
        """
        want_forces = "forces" in self.task_keys
        want_stress = "stress" in self.task_keys
        keep_graph = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        batch_size = self._batch_size(batch)
        holder: dict[str, Any] = {}

        def energy_fn(graph: Any) -> torch.Tensor:
            embeddings = self.encoder({**batch, "graph": graph} if isinstance(batch, dict) else graph)
            holder["embeddings"] = embeddings
            points = embeddings.point_embedding if isinstance(embeddings, Embeddings) else None
            if points is None:
                raise ConfigError(
                    f"{type(self.encoder).__name__} gives no point (per-atom) embedding; ForceRegressionTask sums "
                    "per-atom energies and needs Embeddings.point_embedding"
                )
            outputs = self.output_heads["energy"](points).squeeze(-1)
            index = graph_index(graph).to(outputs.device)
            residual = self.energy_scale(outputs, index, batch_size)
            offset = self.energy_scale.offset(atomic_numbers(graph).to(index.device), index, batch_size)
            holder["residual"], holder["offset"] = residual, offset.to(residual.dtype)
            return residual + holder["offset"]

        if not (want_forces or want_stress):
            out = energy_and_derivatives(energy_fn, get_graph(batch), forces=False)
        else:
            with torch.inference_mode(False), torch.enable_grad():
                out = energy_and_derivatives(
                    energy_fn, get_graph(batch), forces=want_forces, stress=want_stress, create_graph=keep_graph
                )
        scales = self.energy_scale.loss_scales
        normalised = {key: value / scales[key] for key, value in out.items() if key != "energy"}
        normalised["energy"] = holder["residual"] / scales["energy"]
        embeddings = holder["embeddings"]
        if not keep_graph:
            out = {key: value.detach() for key, value in out.items()}
            normalised = {key: value.detach() for key, value in normalised.items()}
            if isinstance(embeddings, Embeddings):
                embeddings = Embeddings(
                    *(
                        None if t is None else t.detach()
                        for t in (embeddings.system_embedding, embeddings.point_embedding)
                    )
                )
        return out, normalised, holder["offset"].detach(), embeddings

    def _raw_predictions(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Normalised predictions (see :meth:`_predict`) and the embeddings."""
        _, normalised, _, embeddings = self._predict(batch)
        return normalised, embeddings

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        """Forward pass and normalised losses (see the base class and :meth:`_predict`)."""
        predictions, normalised, offset, embeddings = self._predict(batch)
        scales = self.energy_scale.loss_scales
        per_key: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for key in self.task_keys:
            target = self._target(batch, key, predictions[key])
            if key == "energy":
                target = target - offset.to(target.dtype)
            per_key[key], counts[key] = masked_loss(self.loss_funcs[key], normalised[key], target / scales[key])
        loss = sum(float(self.task_loss_scaling.get(key, 1.0)) * per_key[key] for key in self.task_keys)
        return {
            "loss": loss,
            "per_key": per_key,
            "counts": counts,
            "predictions": {key: predictions[key] for key in self.task_keys},
            "batch_size": self._batch_size(batch),
            "embeddings": embeddings,
        }

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions ``{key: Tensor}`` in data units (eV, eV/Å, eV/Å^3)."""
        predictions, _, _, _ = self._predict(batch)
        return {key: predictions[key] for key in self.task_keys if key in predictions}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"ids", "natoms", "energy", "forces"[, "stress"]}`` in data units (forces concatenated)."""
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        natoms = batch.get("natoms") if isinstance(batch, dict) else None
        if natoms is not None:
            out["natoms"] = torch.as_tensor(natoms).detach().clone()
        return out
