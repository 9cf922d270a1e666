"""Random-number-generator state in checkpoints (the import path of earlier versions).

Now :mod:`matsciml.lightning.callbacks.rng_state`.
"""

from __future__ import annotations

from matsciml.lightning.callbacks.rng_state import RNGStateCallback, capture_rng_state, restore_rng_state

__all__ = ["RNGStateCallback", "capture_rng_state", "restore_rng_state"]
