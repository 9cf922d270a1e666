"""The checkpoint identity of a callback, from a few of its settings.

Lightning stores a callback's ``state_dict`` under its ``state_key``; two instances of
one class need different keys, made from the settings that tell them apart
(``MetricEarlyStopping{'monitor': 'val_loss', 'mode': 'min'}``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["StateKeyFields"]


class StateKeyFields:
    """Mixin of callbacks whose ``state_key`` is their class name and :meth:`state_key_fields`.

    Put it before ``Callback`` among the bases; a subclass adds its own fields with
    ``{**super().state_key_fields(), "dataset": self.dataset}``.
    """

    def state_key_fields(self) -> dict[str, Any]:
        """What identifies this instance in a checkpoint (subclasses add fields)."""
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields())  # type: ignore[attr-defined]
