"""Argument checks shared across the package, with one message format.

``check_int(value, "every_n_steps", "ThroughputCallback")`` raises
``ConfigError("ThroughputCallback: every_n_steps=0 must be an integer >= 1")``.
"""

from __future__ import annotations

from typing import Any

from matsciml.common.errors import ConfigError

__all__ = ["check_int"]


def check_int(value: Any, name: str, owner: str, minimum: int = 1, optional: bool = False, hint: str = "") -> Any:
    """Return ``value`` when it is an integer (not a bool) ``>= minimum`` (or ``None`` when ``optional``).

    Parameters
    ----------
    value
        The argument as given.
    name, owner
        The argument's name and who takes it, for the message.
    minimum
        Smallest accepted value (default 1).
    optional
        Accept ``None`` too.
    hint
        Appended to the message (e.g. the unit: ``" (optimizer steps)"``).

    Raises
    ------
    ConfigError
        ``"<owner>: <name>=<value> must be an integer >= <minimum>[ or null]<hint>"``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        null = " or null" if optional else ""
        raise ConfigError(f"{owner}: {name}={value!r} must be an integer >= {minimum}{null}{hint}")
    return value
