"""Plain data (``None``, bool, int, float, str, lists, string-keyed dicts) from configuration and
run values, for YAML and JSON files and for checkpoint hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["to_plain"]


def to_plain(value: Any, other: Callable[[Any], Any] = repr) -> Any:
    """``value`` as plain data.

    Subclasses of the plain scalar types (``IntEnum``, torch's ``TorchVersion``) become the
    plain type; mappings become dicts with string keys; lists, tuples and sets become lists;
    paths become strings; one-element tensors and numpy scalars their number, other tensors
    nested lists; classes their dotted path; anything else ``other(value)`` (default
    :func:`repr`).
    """
    if value is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, other) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_plain(v, other) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    return other(value)
