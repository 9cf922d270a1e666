"""Training callbacks, one per module.

=========================================== ==============================================
:class:`ExponentialMovingAverageCallback`   EMA of the weights, used for evaluation and saved
                                            as *the* weights of a checkpoint
:class:`SAM`                                sharpness-aware minimisation (two-pass update)
=========================================== ==============================================
"""

from __future__ import annotations

from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks.sam import SAM

__all__ = ["ExponentialMovingAverageCallback", "SAM"]
