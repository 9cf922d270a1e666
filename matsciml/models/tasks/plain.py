"""Plain data for hyperparameters: values ``torch.load(weights_only=True)`` accepts.

Classes become import paths, module instances ``class_path``/``init_args`` mappings,
tensors and NumPy scalars Python numbers (see :func:`to_plain`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError

__all__ = ["to_plain"]


def _class_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _module_spec(module: nn.Module) -> dict[str, Any]:
    """Best-effort ``class_path``/``init_args`` of a module instance (from its attributes)."""
    cls = type(module)
    init_args: dict[str, Any] = {}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    for name, param in params.items():
        if name in ("self", "device", "dtype") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(module, name):
            continue
        try:
            value = to_plain(getattr(module, name), strict=True)
        except ConfigError:
            continue
        default = param.default
        if default is not inspect.Parameter.empty and value == to_plain(default, strict=False):
            continue
        init_args[name] = value
    spec: dict[str, Any] = {"class_path": _class_path(cls)}
    if init_args:
        spec["init_args"] = init_args
    try:
        rebuilt = instantiate(spec)
        same = repr(rebuilt) == repr(module)
    except Exception:  # any failure means the spec does not rebuild the module
        same = False
    if not same:
        rank_zero_warn(
            f"the hyperparameters store {module!r} as {spec}, which may not rebuild it exactly; "
            "give it as a class_path/init_args mapping instead of an instance"
        )
    return spec


def to_plain(value: Any, strict: bool = False, where: str = "") -> Any:
    """Convert ``value`` to data that ``torch.load(weights_only=True)`` accepts.

    Classes become their import path, module instances a ``class_path``/``init_args``
    mapping (best effort, with a warning when it may not rebuild the instance), tuples
    lists, one-element tensors and NumPy scalars Python numbers.

    Parameters
    ----------
    value
        The value to convert (nested dicts/lists are converted recursively).
    strict
        Raise :class:`ConfigError` for a value that has no plain form; otherwise store
        ``None`` for it and warn.
    where
        Name of the argument, for messages.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, strict, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, strict, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, type):
        return _class_path(value)
    if isinstance(value, nn.Module):
        if strict:
            raise ConfigError(f"{where}: a module instance has no plain form")
        return _module_spec(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    if strict:
        raise ConfigError(f"{where}: {value!r} has no plain-data form")
    rank_zero_warn(
        f"hyperparameter {where or 'value'} = {value!r} cannot be stored as plain data; it is saved as None, so "
        "load_from_checkpoint needs it passed again"
    )
    return None
