"""``-c`` overrides of the runner: ``dataset.debug.batch_size.16`` -> set a value in a loaded config.

The first word names the config (``trainer``, ``model``, ``dataset``), the last word is the
value (typed as YAML types it), the words between are the key path. ``-c key=value`` keeps
dots inside values (paths, floats); see ``docs/runner.rst``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from matsciml.common.errors import ConfigError, closest

if TYPE_CHECKING:
    from matsciml.runner.configs import ConfigFile

__all__ = ["OVERRIDE_TARGETS", "lookup", "parse_value", "apply_override", "apply_overrides"]

#: The configs a ``-c`` override may address.
OVERRIDE_TARGETS = ("trainer", "model", "dataset")


def lookup(data: dict, keys: list[str]) -> Any:
    """Return ``data[k0][k1]...`` (``KeyError`` when a key is missing)."""
    node: Any = data
    for key in keys:
        node = node[key]
    return node


def parse_value(text: str) -> Any:
    """Type a command-line value as YAML does (``16`` -> int, ``0.001`` -> float, ``true`` -> bool, ``1e-3`` -> float)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_override(parts: list[str], data: dict) -> tuple[list[str], str]:
    """Split ``parts`` (after the config name) into a key path and a value string.

    A word holding ``/`` or ``\\``, or an empty word (from ``./``, ``../``), starts the value
    (a file path), whether or not the keys before it exist. Otherwise the key path follows
    existing keys as far as they go; where it leaves the existing config, the last word is
    the value, except that two trailing words forming a number (``lr.0.001``) make one value.
    """
    node: Any = data
    i = 0
    # A word holding a path separator, or an empty word (from './' or '../'), starts a
    # value: key names never hold them ('train_path./data/x.lmdb' on an absent key).
    for j, word in enumerate(parts[1:], start=1):
        if word == "" or "/" in word or "\\" in word:
            return parts[:j], ".".join(parts[j:])
    while i < len(parts) - 1 and isinstance(node, dict) and parts[i] in node:
        node = node[parts[i]]
        i += 1
    if not isinstance(node, dict):
        return parts[:i], ".".join(parts[i:])
    rest = parts[i:]
    if len(rest) >= 3 and _is_number(".".join(rest[-2:])):
        return parts[:i] + rest[:-2], ".".join(rest[-2:])
    return parts[:-1], parts[-1]


def apply_override(text: str, configs: dict[str, ConfigFile]) -> tuple[str, list[str], Any]:
    """Apply one ``-c`` override (``dataset.debug.batch_size.16``) in place.

    Parameters
    ----------
    text
        ``<config>.<key>...<key>.<value>``; ``<config>`` is ``trainer``, ``model`` or ``dataset``.
    configs
        The configs in use, keyed by ``trainer``/``model``/``dataset`` (modified in place).

    Returns
    -------
    tuple
        ``(config name, key path, typed value)``.

    Raises
    ------
    ConfigError
        Unknown config name, no key or value, or a key path that runs through a list or a scalar.
    """
    explicit = None
    if "=" in text:  # <config>.<key path>=<value>: the value may hold dots (file paths)
        text_keys, explicit = text.split("=", 1)
        parts = text_keys.split(".")
    else:
        parts = text.split(".")
    target = parts[0]
    if target not in OVERRIDE_TARGETS:
        raise ConfigError(f"-c {text}: the first word names the config to change; {closest(target, OVERRIDE_TARGETS)}")
    if len(parts) < (2 if explicit is not None else 3) or not parts[1]:
        raise ConfigError(
            f"-c {text}: expected <config>.<key path>.<value> (e.g. dataset.debug.batch_size.16) "
            "or <config>.<key path>=<value> (e.g. dataset.experiment.train_path=/data/train.extxyz)"
        )
    file = configs[target]
    if explicit is not None:
        if not all(parts[1:]):
            raise ConfigError(f"-c {text}: empty key in the key path")
        keys, raw = parts[1:], explicit
    else:
        keys, raw = _split_override(parts[1:], file.data)
    if not keys:
        raise ConfigError(f"-c {text}: {file.where(parts[1])} is a section; name a key inside it")
    node = file.data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            kind = "a list" if isinstance(child, list) else "a value"
            raise ConfigError(
                f"-c {text}: {file.where('.'.join(keys[: depth + 1]))} is {kind}, not a section; "
                "only keys of nested mappings can be set from the command line (not lists such as callbacks, "
                "loggers or transforms)"
            )
        node = child
    old = node.get(keys[-1])
    if isinstance(old, dict):
        raise ConfigError(
            f"-c {text}: {file.where('.'.join(keys))} is a section; only single values can be set from the command line"
        )
    if isinstance(old, list):
        raise ConfigError(
            f"-c {text}: {file.where('.'.join(keys))} is a list; only keys of nested mappings can be set from the "
            "command line (not lists such as callbacks, loggers or transforms)"
        )
    value = parse_value(raw)
    node[keys[-1]] = value
    return target, keys, value


def apply_overrides(overrides: list[str] | None, configs: dict[str, ConfigFile]) -> list[tuple[str, list[str], Any]]:
    """Apply every ``-c`` override in order (see :func:`apply_override`)."""
    return [apply_override(text, configs) for text in overrides or []]
