"""Instantiate objects from YAML-style specs (``class_path`` + ``init_args``).

The convention is Lightning CLI's (jsonargparse): a mapping with ``class_path``
(a dotted import path) and optional ``init_args`` is an object to build; a mapping
with ``class_instance`` names a class to pass uninstantiated. Old
``pytorch_lightning.`` paths are mapped to ``lightning.pytorch.``.

Example YAML::

    norm:
      class_path: torch.nn.LayerNorm
      init_args: {normalized_shape: 128}
"""

from __future__ import annotations

import inspect
from typing import Any

from matsciml.common.errors import ConfigError, closest
from matsciml.registry import resolve

__all__ = ["resolve_class", "instantiate", "instantiate_all", "is_spec", "check_init_args"]


def resolve_class(path: str | type, where: str = "") -> Any:
    """Return the object named by ``path``: a registered short name or a dotted import path.

    Parameters
    ----------
    path
        ``"E3NNEncoder"`` (any name of :mod:`matsciml.registry`), ``"torch.nn.SiLU"``, or an
        already imported class (returned unchanged).
    where
        Where the path came from (file and key), used in error messages.

    Raises
    ------
    ConfigError
        Unknown name or unimportable path; the message lists the closest names.
    """
    return resolve(path, None, where)


def is_spec(value: Any) -> bool:
    """True when ``value`` is a mapping with ``class_path`` or ``class_instance``."""
    return isinstance(value, dict) and ("class_path" in value or "class_instance" in value)


def check_init_args(cls: Any, init_args: dict, where: str = "") -> None:
    """Raise :class:`ConfigError` for an ``init_args`` key that ``cls`` does not accept."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    at = f" ({where})" if where else ""
    for key in init_args:
        if key not in valid:
            name = getattr(cls, "__qualname__", str(cls))
            raise ConfigError(f"init_args key {key!r}{at} is not an argument of {name}; {closest(key, valid)}")


def instantiate(value: Any, where: str = "") -> Any:
    """Recursively build objects from specs; other values are returned with specs inside built.

    Parameters
    ----------
    value
        A spec mapping, a list/dict possibly holding specs, or a plain value.
    where
        Location for error messages (e.g. ``"models/egnn.yaml: output_kwargs.norm"``).
    """
    if isinstance(value, dict):
        if "class_instance" in value:
            return resolve_class(value["class_instance"], where)
        if "class_path" in value:
            unknown = set(value) - {"class_path", "init_args", "dict_kwargs"}
            if unknown:
                key = sorted(unknown)[0]
                raise ConfigError(
                    f"key {key!r} next to class_path {value['class_path']!r}"
                    f"{f' ({where})' if where else ''}: {closest(key, ['class_path', 'init_args'])}"
                )
            cls = resolve_class(value["class_path"], where)
            init_args = dict(value.get("init_args") or {})
            init_args.update(value.get("dict_kwargs") or {})
            check_init_args(cls, init_args, where)
            kwargs = {k: instantiate(v, f"{where}.init_args.{k}" if where else k) for k, v in init_args.items()}
            return cls(**kwargs)
        return {k: instantiate(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [instantiate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def instantiate_all(specs: list | None, where: str = "") -> list:
    """Instantiate a list of specs (callbacks, loggers, transforms); ``None`` gives ``[]``."""
    return [instantiate(s, f"{where}[{i}]") for i, s in enumerate(specs or [])]
