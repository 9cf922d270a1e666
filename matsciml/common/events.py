"""Custom events: a task, the trainer's owner or a callback raises a named event; callbacks that define it receive it.

Lightning calls a fixed set of hooks. For anything else (a task that noticed a
curriculum stage change, a callback that finished an evaluation and wants others to log
its result), :func:`fire_event` calls the method of that name on every callback of the
trainer that defines one, in the trainer's callback order, with the signature of a
Lightning hook plus keyword arguments::

    def on_stage_changed(self, trainer, pl_module, *, stage: int) -> None: ...

Example (inside a task's ``training_step``)::

    from matsciml.lightning.callbacks.events import fire_event

    if self.global_step == self.switch_step:
        fire_event(self.trainer, "on_stage_changed", stage=2)

Callbacks guarded by :mod:`~matsciml.lightning.callbacks._base.isolation` have their event
methods guarded too. This module imports nothing from the rest of matsciml's Lightning
layer, so a task may call it without depending on any callback.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from matsciml.common.errors import ConfigError

__all__ = ["fire_event", "event_receivers"]

_RESERVED = frozenset(n for n in dir(Callback) if not n.startswith("__"))
_ACTIVE: set[tuple[int, str]] = set()


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ConfigError(f"event name {name!r}: use a public Python identifier such as 'on_stage_changed'")
    if name in _RESERVED:
        raise ConfigError(
            f"event name {name!r} is a Lightning callback hook or method; Lightning calls it itself with its own "
            f"arguments. Choose another name (e.g. 'on_my_{name.removeprefix('on_')}')"
        )
    return name


def event_receivers(trainer: Any, name: str) -> list[Callback]:
    """The callbacks of ``trainer`` that define a callable ``name``, in callback order."""
    _check_name(name)
    return [cb for cb in getattr(trainer, "callbacks", []) or [] if callable(getattr(cb, name, None))]


def fire_event(trainer: Any, name: str, **payload: Any) -> list[Callback]:
    """Call ``callback.<name>(trainer, pl_module, **payload)`` on every callback that defines it.

    Parameters
    ----------
    trainer
        The Lightning trainer (``self.trainer`` in a task; the ``trainer`` argument in a callback).
    name
        Event name: a public identifier that is not a Lightning hook (``on_stage_changed``).
    **payload
        Keyword arguments passed to the receivers.

    Returns
    -------
    list[Callback]
        The callbacks reached, in call order (empty when none defines ``name``).

    Raises
    ------
    ConfigError
        ``name`` is not an identifier, is private, or is a Lightning hook name.
    RuntimeError
        A receiver fired the same event again while it was being delivered (endless recursion).
    """
    receivers = event_receivers(trainer, name)
    if not receivers:
        return []
    key = (id(trainer), name)
    if key in _ACTIVE:
        raise RuntimeError(
            f"event {name!r} was fired again while it was being delivered (a receiver fires its own event); "
            f"this would recurse without end"
        )
    pl_module = getattr(trainer, "lightning_module", None)
    _ACTIVE.add(key)
    try:
        for callback in receivers:
            getattr(callback, name)(trainer, pl_module, **payload)
    finally:
        _ACTIVE.discard(key)
    return receivers
