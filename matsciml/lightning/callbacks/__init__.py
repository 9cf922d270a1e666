"""Training callbacks, one per module.

=========================================== ==============================================
:class:`ExponentialMovingAverageCallback`   EMA of the weights, used for evaluation and saved
                                            as *the* weights of a checkpoint
=========================================== ==============================================
"""

from __future__ import annotations

from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback

__all__ = ["ExponentialMovingAverageCallback"]
