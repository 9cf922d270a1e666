"""Training callbacks, one per module.

Weights and optimisation
    :class:`ExponentialMovingAverageCallback` (EMA weights used for evaluation and saved as
    *the* weights of a checkpoint), :class:`SAM` (sharpness-aware minimisation).
Catching faults
    :class:`GradientCheckCallback`, :class:`MonitorGradients`, :class:`ManualGradientClip`,
    :class:`UnusedParametersCallback`, :class:`ForwardNaNDetection`,
    :class:`TrainingHelperCallback`, :class:`ModelAutocorrelation`, :class:`LossSpikeDetection`.
Watching a run
    :class:`ThroughputCallback`, :class:`PeakMemoryCallback`, :class:`GarbageCallback`,
    :class:`LossScalingScheduler`, :class:`TrainingDynamicsReport`.
"""

from __future__ import annotations

from matsciml.lightning.callbacks.autocorrelation import ModelAutocorrelation
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks.garbage import GarbageCallback
from matsciml.lightning.callbacks.gradients import (
    GradientCheckCallback,
    ManualGradientClip,
    MonitorGradients,
    TrainingFaultError,
)
from matsciml.lightning.callbacks.helper import TrainingHelperCallback
from matsciml.lightning.callbacks.loss_scaling import LossScalingScheduler
from matsciml.lightning.callbacks.loss_spikes import LossSpikeDetection
from matsciml.lightning.callbacks.memory import PeakMemoryCallback
from matsciml.lightning.callbacks.nan import ForwardNaNDetection
from matsciml.lightning.callbacks.report import TrainingDynamicsReport
from matsciml.lightning.callbacks.sam import SAM
from matsciml.lightning.callbacks.throughput import ThroughputCallback
from matsciml.lightning.callbacks.unused import UnusedParametersCallback

__all__ = [
    "ExponentialMovingAverageCallback",
    "SAM",
    "GradientCheckCallback",
    "MonitorGradients",
    "ManualGradientClip",
    "TrainingFaultError",
    "UnusedParametersCallback",
    "ForwardNaNDetection",
    "TrainingHelperCallback",
    "ModelAutocorrelation",
    "LossSpikeDetection",
    "ThroughputCallback",
    "PeakMemoryCallback",
    "GarbageCallback",
    "LossScalingScheduler",
    "TrainingDynamicsReport",
]
