"""Error types and a helper that suggests the closest valid names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["MatSciMLError", "DataError", "ConfigError", "closest"]


class MatSciMLError(Exception):
    """Base class of the errors raised by matsciml."""


class DataError(MatSciMLError, ValueError):
    """Bad input data: the message names the file, the record index, the key and a fix."""


class ConfigError(MatSciMLError, ValueError):
    """Bad configuration: the message names the file/key at fault and the closest valid names."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a human-readable hint listing the valid names closest to ``name``.

    >>> closest("ScalarRegresionTask", ["ScalarRegressionTask", "ForceRegressionTask"])
    "did you mean 'ScalarRegressionTask'?"
    """
    choices = sorted(set(choices))
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if matches:
        return "did you mean " + " or ".join(repr(m) for m in matches) + "?"
    shown = ", ".join(repr(c) for c in choices[:12])
    more = "" if len(choices) <= 12 else f", ... ({len(choices)} in all)"
    return f"valid names: {shown}{more}"
