"""``CrystalSymmetryClassificationTask``: space group and crystal system of each structure.

Labels come from the data (``targets["spacegroup"]``, or upstream's
``batch["symmetry"]["number"]``: the international space-group number 1-230;
``targets["crystal_system"]``: 0-6 in the order of :data:`CRYSTAL_SYSTEMS`). A batch without them gets them computed from the structure
(positions, cell, atomic numbers) with spglib through pymatgen's
``SpacegroupAnalyzer`` (tolerance ``symprec``); the crystal system follows from the
space-group number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from matsciml.common.errors import ConfigError, DataError
from matsciml.common.graph import atomic_numbers, cells, get_graph, graph_index, positions
from matsciml.models.heads import OutputHead
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.metrics import MULTICLASS
from matsciml.models.tasks.normalization import TargetNormalizer
from matsciml.registry import register_task

__all__ = ["CrystalSymmetryClassificationTask", "CRYSTAL_SYSTEMS", "crystal_system_index", "spacegroup_numbers"]

#: Crystal systems, in the order of their class index.
CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
#: Last space-group number of each crystal system (International Tables).
_LAST_NUMBER = (2, 15, 74, 142, 167, 194, 230)
_NUM_CLASSES = {"spacegroup": 230, "crystal_system": len(CRYSTAL_SYSTEMS)}


def crystal_system_index(number: torch.Tensor) -> torch.Tensor:
    """Crystal-system class (0-6, :data:`CRYSTAL_SYSTEMS`) of space-group numbers 1-230; NaN stays NaN."""
    number = torch.as_tensor(number, dtype=torch.float64)
    bounds = torch.tensor(_LAST_NUMBER, dtype=torch.float64, device=number.device)
    index = torch.searchsorted(bounds, number.clamp(1, 230), right=False).to(torch.float64)
    valid = torch.isfinite(number) & (number >= 1) & (number <= 230)
    return torch.where(valid, index, torch.full_like(index, float("nan")))


def spacegroup_numbers(graph: Any, symprec: float = 0.01) -> torch.Tensor:
    """International space-group number of every structure of a batched graph (spglib via pymatgen).

    Parameters
    ----------
    graph
        PyG batch with ``pos``, ``atomic_numbers``, ``cell`` (``[B, 3, 3]``) and ``batch``.
    symprec
        Distance tolerance in Å.

    Returns
    -------
    torch.Tensor
        ``[B]`` float64 numbers; NaN where spglib finds no symmetry (it gives none for
        a structure without a cell).
    """
    from pymatgen.core import Lattice, Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    pos = positions(graph).detach().cpu().double()
    numbers = atomic_numbers(graph).detach().cpu().long()
    cell = cells(graph).detach().cpu().double().reshape(-1, 3, 3)
    index = graph_index(graph).detach().cpu()
    out = torch.full((cell.shape[0],), float("nan"), dtype=torch.float64)
    for g in range(cell.shape[0]):
        mask = index == g
        if abs(float(torch.linalg.det(cell[g]))) < 1e-8:
            continue
        structure = Structure(
            Lattice(cell[g].numpy()), numbers[mask].tolist(), pos[mask].numpy(), coords_are_cartesian=True
        )
        try:
            out[g] = float(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())
        except Exception:  # noqa: BLE001 - spglib failing on one structure leaves its label missing
            continue
    return out


class _ClassIndexLoss(nn.Module):
    """Calls a classification loss with the class indices as ``long`` (tasks pass float targets, NaN = missing)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(pred, target.long())


@register_task(aliases=["crystal_symmetry_classification", "symmetry"])
class CrystalSymmetryClassificationTask(BaseTaskModule):
    """Classify structures by space group (230 classes) and/or crystal system (7 classes).

    One :class:`~matsciml.models.heads.OutputHead` per key maps the system embedding to
    class logits; the loss is ``CrossEntropyLoss`` on the class index (space-group
    number minus one, or the crystal-system index). Predictions (``forward``,
    ``predict_step``, metrics) are class probabilities ``[B, num_classes]``. Structures
    whose label is missing (NaN, or spglib found none) are left out of the loss and the
    metrics.

    Parameters are those of :class:`~matsciml.models.tasks.base.BaseTaskModule`, with:

    task_keys
        Subset of ``["spacegroup", "crystal_system"]``, default ``["spacegroup"]`` (the
        upstream task).
    loss_func
        Default ``torch.nn.CrossEntropyLoss``.
    freeze_embedding
        Freeze the encoder's ``atom_embedding`` (upstream argument), default ``False``.
    symprec
        spglib tolerance (Å) when labels are computed, default 0.01 (pymatgen's).

    Logged: ``<split>_loss``, ``<split>_total``, ``<split>_<key>`` and
    ``<split>_<key>_accuracy`` (fraction of structures whose most probable class is right).

    Example YAML (experiment config)::

        dataset:
          oqmd_devset:
            - task: CrystalSymmetryClassificationTask
              targets: [spacegroup, crystal_system]

    Raises
    ------
    ConfigError
        Unknown task keys; ``freeze_embedding`` with an encoder without ``atom_embedding``.
    DataError
        A label outside its range.
    """

    default_loss = nn.CrossEntropyLoss
    default_task_keys = ("spacegroup",)
    allowed_task_keys = ("spacegroup", "crystal_system")
    metric_kind = MULTICLASS

    def __init__(self, *args: Any, freeze_embedding: bool = False, symprec: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freeze_embedding = bool(freeze_embedding)
        self.symprec = float(symprec)
        if self.freeze_embedding:
            embedding = getattr(self.encoder, "atom_embedding", None)
            if not isinstance(embedding, nn.Module):
                raise ConfigError(
                    f"{type(self).__name__}: freeze_embedding needs an encoder with an 'atom_embedding' module "
                    f"({type(self.encoder).__name__} has none); set freeze_embedding: false"
                )
            embedding.requires_grad_(False)
        self.hparams["freeze_embedding"] = self.freeze_embedding
        self.hparams["symprec"] = self.symprec

    def _make_output_heads(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {key: OutputHead(output_dim=_NUM_CLASSES[key], **self.output_kwargs) for key in self.task_keys}
        )

    def _make_losses(self, loss_func: Any) -> nn.ModuleDict:
        return nn.ModuleDict({key: _ClassIndexLoss(loss) for key, loss in super()._make_losses(loss_func).items()})

    def _make_normalizer(self, normalize_kwargs: Any) -> TargetNormalizer:
        return TargetNormalizer(None, self.task_keys)

    def _to_data_units(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.softmax(value, dim=-1)

    def _loss_target(self, key: str, target: torch.Tensor) -> torch.Tensor:
        return target

    def _target_layout(self, key: str) -> str:
        return "one class label per structure, [num_graphs]"

    def _target(self, batch: Any, key: str, like: torch.Tensor) -> torch.Tensor:
        """Class index ``[B]`` (float, NaN where missing): from the batch's targets or computed by spglib."""
        targets = batch.get("targets") if isinstance(batch, Mapping) else None
        targets = targets if isinstance(targets, Mapping) else {}
        upstream = batch.get("symmetry") if isinstance(batch, Mapping) else None
        if "spacegroup" not in targets and isinstance(upstream, Mapping) and "number" in upstream:
            targets = {**targets, "spacegroup": upstream["number"]}  # upstream's layout: batch["symmetry"]["number"]
        size = like.shape[0]
        if key in targets:
            value = torch.as_tensor(targets[key]).to(torch.float64).reshape(-1)
            if key == "spacegroup":
                value = value - 1.0
        elif "spacegroup" in targets:
            value = crystal_system_index(torch.as_tensor(targets["spacegroup"]).reshape(-1))
        else:
            number = spacegroup_numbers(get_graph(batch), self.symprec)
            if isinstance(batch, dict) and isinstance(batch.get("targets"), dict):
                batch["targets"]["spacegroup"] = number  # computed once per batch, reused by the metrics and SAM
            value = number - 1.0 if key == "spacegroup" else crystal_system_index(number)
        if value.numel() != size:
            raise DataError(
                f"{type(self).__name__}: target {key!r} has {value.numel()} values for {size} structures "
                f"({self._target_layout(key)})"
            )
        finite = value[torch.isfinite(value)]
        if finite.numel() and (bool((finite < 0).any()) or bool((finite >= _NUM_CLASSES[key]).any())):
            ids = list(batch.get("ids") or [])[:3] if isinstance(batch, Mapping) else []
            span = "1-230 (space-group numbers)" if key == "spacegroup" else f"0-{_NUM_CLASSES[key] - 1}"
            raise DataError(
                f"{type(self).__name__}: target {key!r} of the batch (first ids {ids}) is outside {span}; "
                "fix the labels or leave them out to compute them with spglib"
            )
        return value.to(device=like.device, dtype=like.dtype)
