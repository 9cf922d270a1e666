"""Target normalisation: heads predict ``(y - mean) / std``; predictions are returned as ``y``.

``normalize_kwargs`` holds ``<key>_mean`` and ``<key>_std`` for each target (upstream
names)::

    task_args:
      normalize_kwargs: {band_gap_mean: 1.2, band_gap_std: 1.5}

A key without an entry uses mean 0 and std 1. Entries for targets the task does not
predict are ignored (a dataset config may list more targets than one task uses).

Derived targets (the force task) have no statistics of their own: forces
``-dE/dpos`` and stress ``(1/V) dE/dstrain`` are derivatives of the energy, so their
scale is the energy's std and their mean is 0. ``forces_mean``/``forces_std`` (and
``stress_*``) are ignored with a warning, because a separate scale would make the
predicted forces inconsistent with the predicted energy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_warn

from matsciml.common.errors import ConfigError

__all__ = ["TargetNormalizer"]


class TargetNormalizer:
    """Per-key affine normalisation of targets.

    Parameters
    ----------
    normalize_kwargs
        ``{<key>_mean: float, <key>_std: float}``; ``None`` for no normalisation.
    keys
        Target keys with statistics of their own.
    derived
        ``{derived_key: parent_key}``: keys scaled by their parent's std, with mean 0
        (``{"forces": "energy", "stress": "energy"}`` for the force task).
    where
        Name of the argument, for error messages.

    Raises
    ------
    ConfigError
        A key that does not end in ``_mean``/``_std``, a non-numeric value, or a std
        that is not positive and finite.
    """

    def __init__(
        self,
        normalize_kwargs: Mapping[str, float] | None,
        keys: Iterable[str],
        derived: Mapping[str, str] | None = None,
        where: str = "normalize_kwargs",
    ) -> None:
        stats: dict[str, dict[str, float]] = {}
        for name, value in (normalize_kwargs or {}).items():
            base, _, kind = str(name).rpartition("_")
            if kind not in ("mean", "std") or not base:
                raise ConfigError(
                    f"{where}: key {name!r} must be '<target>_mean' or '<target>_std' (e.g. 'energy_mean')"
                )
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
            if not math.isfinite(number) or (kind == "std" and number <= 0.0):
                raise ConfigError(f"{where}.{name}: must be finite{' and > 0' if kind == 'std' else ''}, got {value!r}")
            stats.setdefault(base, {})[kind] = number
        self.derived = dict(derived or {})
        for key in self.derived:
            if key in stats:
                rank_zero_warn(
                    f"{where}: {key}_mean/{key}_std are ignored: {key} is a derivative of "
                    f"{self.derived[key]} and is scaled by {self.derived[key]}_std (mean 0)"
                )
        self.keys = list(keys)
        self._stats = stats

    def given(self, key: str) -> dict[str, float]:
        """The values given for ``key``: ``{"mean": m, "std": s}`` (either may be missing; empty if none)."""
        return dict(self._stats.get(key, {}))

    def mean(self, key: str) -> float:
        """Mean of ``key`` in data units (0 for derived keys and keys without statistics)."""
        if key in self.derived:
            return 0.0
        return self._stats.get(key, {}).get("mean", 0.0)

    def std(self, key: str) -> float:
        """Scale of ``key`` in data units (the parent's std for derived keys; default 1)."""
        key = self.derived.get(key, key)
        return self._stats.get(key, {}).get("std", 1.0)

    def norm(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Data units -> normalised units: ``(value - mean) / std``."""
        return (value - self.mean(key)) / self.std(key)

    def denorm(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Normalised units -> data units: ``value * std + mean``."""
        return value * self.std(key) + self.mean(key)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{key: {"mean": m, "std": s}}`` for every key and derived key (for reports)."""
        keys = list(dict.fromkeys([*self.keys, *self.derived]))
        return {k: {"mean": self.mean(k), "std": self.std(k)} for k in keys}
