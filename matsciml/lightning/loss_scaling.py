"""Loss-weight schedules (the import path of earlier versions).

Now in :mod:`matsciml.lightning.callbacks.loss_scaling`, beside the callback that applies them.
"""

from __future__ import annotations

from matsciml.lightning.callbacks.loss_scaling import (
    BaseScalingSchedule,
    LinearScalingSchedule,
    SigmoidScalingSchedule,
    schedule_length,
)

__all__ = ["BaseScalingSchedule", "LinearScalingSchedule", "SigmoidScalingSchedule", "schedule_length"]
