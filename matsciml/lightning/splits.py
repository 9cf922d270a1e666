"""Seeded train/validation/test splits of one file, and the split arguments of the data module.

``val_split``/``test_split`` are a fraction of ``train_path`` (split by
:func:`fractional_split`, the same for a given seed on every machine and rank) or a path
of their own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from matsciml.common.errors import ConfigError

__all__ = ["fractional_split"]


def fractional_split(num_items: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Split ``range(num_items)`` into train / val / test index lists.

    A permutation is drawn with ``torch.randperm(num_items,
    generator=torch.Generator().manual_seed(seed))``; its first ``n_val`` entries
    are the validation set, the next ``n_test`` the test set and the rest the
    training set, where ``n = floor(fraction * num_items + 0.5)``. Each list is
    returned sorted (file order).

    Parameters
    ----------
    num_items
        Number of records.
    val_fraction, test_fraction
        Fractions in ``[0, 1)``; their sum must leave at least one training record.
    seed
        Seed of the permutation.

    Returns
    -------
    dict[str, list[int]]
        ``{"train": [...], "val": [...], "test": [...]}``: disjoint, covering
        ``range(num_items)``.

    Raises
    ------
    ConfigError
        The fractions leave no training record, or a non-zero fraction selects none.
    """
    counts = {}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        count = int(math.floor(fraction * num_items + 0.5))
        if fraction > 0 and count == 0:
            raise ConfigError(
                f"{name}_split={fraction!r} of {num_items} records selects no record; "
                f"give a fraction of at least {1 / num_items:.3g} or a path"
            )
        counts[name] = count
    if counts["val"] + counts["test"] >= num_items:
        raise ConfigError(
            f"val_split={val_fraction!r} and test_split={test_fraction!r} of {num_items} records leave no "
            "training record; lower the fractions"
        )
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_val, n_test = counts["val"], counts["test"]
    return {
        "train": sorted(order[n_val + n_test :]),
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
    }


def _parse_split(value: Any, name: str) -> float | Path | None:
    """A split argument as a fraction in (0, 1), a path, or ``None`` (no split)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: give a fraction in [0, 1) or a path")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return Path(value).expanduser()
    if isinstance(value, (int, float)):
        fraction = float(value)
        if fraction == 0.0:
            return None
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"{name}={value!r}: a fraction must lie in [0, 1); give a path for a separate file")
        return fraction
    if isinstance(value, os.PathLike):
        return Path(value)
    raise ConfigError(f"{name}={value!r} ({type(value).__name__}): give a fraction in [0, 1) or a path")
