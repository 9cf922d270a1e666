"""Per-atom energy scale and shift of the force task, and the scales of its losses.

The network's per-atom output ``u_i`` (of order one) becomes an atomic energy

    e_i = scale * u_i + E0[Z_i]

and a structure's energy is ``E = sum_i e_i + energy_mean``. ``E0`` are per-element
reference energies (least squares on composition over the training split) and ``scale``
is the force RMS of the training split when forces are trained (the per-atom residual
energy scale otherwise), as in nequip and MACE: an untrained network whose outputs vary
by about one per Å then has forces of the data's order, and the network learns residuals
of order one. Forces and stress are derivatives of ``E``, so they are exact derivatives
of the predicted energy in data units.

The losses compare normalised values: energy ``(E - offset) / energy_loss_scale``
(``offset = sum_i E0[Z_i] + energy_mean``), forces ``F / forces_loss_scale`` and stress
``sigma / stress_loss_scale``.

Settings come, in this order of precedence, from hand-set ``normalize_kwargs``
(``energy_mean``, ``energy_std``: the old form, every scale is ``energy_std`` and there
are no per-element references), from automatic statistics (see
:mod:`matsciml.models.tasks.statistics`), or default to no normalisation (scales 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from matsciml.models.tasks.statistics import MAX_Z

__all__ = ["AtomicEnergyScale", "energy_settings"]

_LOSS_KEYS = ("energy", "forces", "stress")


def _positive(value: Any, name: str, fallback: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and number > 1e-12:
        return number
    rank_zero_warn(f"{name}={value!r} is not a positive finite scale; {fallback} is used instead")
    return fallback


def energy_settings(
    hand_set: Mapping[str, float] | None, stats: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """The settings of :class:`AtomicEnergyScale` from hand-set values or statistics.

    Parameters
    ----------
    hand_set
        ``{"mean": energy_mean, "std": energy_std}`` from ``normalize_kwargs`` (either may be
        missing), or ``None``/empty when not hand-set.
    stats
        Target statistics (:func:`~matsciml.models.tasks.statistics.target_statistics`) of
        ``energy``, ``forces`` and ``stress``, or ``None``.

    Returns
    -------
    dict
        ``scale``, ``energy_mean``, ``element_energies`` (``{Z: E0}``) and
        ``loss_scales`` (``{energy, forces, stress}``).
    """
    if hand_set:
        std = _positive(hand_set.get("std", 1.0), "normalize_kwargs.energy_std", 1.0)
        return {
            "scale": std,
            "energy_mean": float(hand_set.get("mean", 0.0)),
            "element_energies": {},
            "loss_scales": dict.fromkeys(_LOSS_KEYS, std),
        }
    stats = stats or {}
    energy, forces, stress = stats.get("energy") or {}, stats.get("forces") or {}, stats.get("stress") or {}
    references = {int(z): float(v) for z, v in (energy.get("element_energies") or {}).items()}
    if references:
        energy_mean = 0.0
        energy_scale = energy.get("residual_std", 1.0)
        per_atom = energy.get("residual_per_atom_std", 1.0)
    else:
        energy_mean = float(energy.get("mean", 0.0))
        energy_scale = energy.get("std", 1.0)
        per_atom = energy_scale
    forces_rms = forces.get("rms")
    scale = _positive(forces_rms if forces_rms is not None else per_atom, "atomic energy scale", 1.0)
    energy_loss = _positive(energy_scale, "energy loss scale", scale) if energy else scale
    return {
        "scale": scale,
        "energy_mean": energy_mean,
        "element_energies": references,
        "loss_scales": {
            "energy": energy_loss,
            "forces": scale,
            "stress": _positive(stress["rms"], "stress loss scale", scale) if "rms" in stress else scale,
        },
    }


class AtomicEnergyScale(nn.Module):
    """``e_i = scale * u_i + E0[Z_i]`` and ``E = sum_i e_i + energy_mean`` (see the module docstring).

    The settings are buffers that are not saved in the state dict: they are rebuilt from
    the task's hyperparameters (``normalize_kwargs``, ``target_stats``), plain data.

    Parameters
    ----------
    settings
        Output of :func:`energy_settings`; ``None`` for no normalisation.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("element_energies", torch.zeros(MAX_Z), persistent=False)
        self.register_buffer("scale", torch.tensor(1.0), persistent=False)
        self.register_buffer("energy_mean", torch.tensor(0.0), persistent=False)
        self.loss_scales: dict[str, float] = dict.fromkeys(_LOSS_KEYS, 1.0)
        self.configure(settings or energy_settings(None, None))

    def configure(self, settings: Mapping[str, Any]) -> None:
        """Set the scale, mean, references and loss scales (see :func:`energy_settings`)."""
        references = torch.zeros(MAX_Z, dtype=self.element_energies.dtype)
        for z, value in settings.get("element_energies", {}).items():
            references[int(z)] = float(value)
        self.element_energies.copy_(references)
        self.scale.fill_(float(settings.get("scale", 1.0)))
        self.energy_mean.fill_(float(settings.get("energy_mean", 0.0)))
        self.loss_scales = {k: float(v) for k, v in settings.get("loss_scales", {}).items()} or dict.fromkeys(
            _LOSS_KEYS, 1.0
        )

    def offset(self, atomic_numbers: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """``[num_graphs]`` energy of the references: ``sum_i E0[Z_i] + energy_mean``."""
        per_atom = self.element_energies.to(index.device)[atomic_numbers.long()]
        zeros = torch.zeros(num_graphs, dtype=per_atom.dtype, device=per_atom.device)
        return zeros.index_add(0, index, per_atom) + self.energy_mean

    def forward(self, outputs: torch.Tensor, index: torch.Tensor, num_graphs: int) -> torch.Tensor:
        """``[num_graphs]`` sum of ``scale * u_i`` per structure (the energy less the offset)."""
        scaled = outputs * self.scale.to(outputs.dtype)
        return scaled.new_zeros(num_graphs).index_add(0, index, scaled)

    def extra_repr(self) -> str:
        present = int((self.element_energies != 0).sum())
        return f"scale={float(self.scale):.4g}, energy_mean={float(self.energy_mean):.4g}, elements={present}"
