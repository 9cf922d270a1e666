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
    :class:`LossScalingScheduler`, :class:`TrainingDynamicsReport`, :class:`ParamCountCallback`,
    :class:`TrackOutputsCallback`, :class:`DatasetStatsCallback`,
    :class:`AtomAttributionCallback` (per-atom attribution pictures).
Periodic work, stopping and best checkpoints
    :class:`PeriodicCallback`, :class:`PeriodicDataIteratorCallback`, :class:`MetricEarlyStopping`,
    :class:`FixedBudgetStopping`, :class:`TerminateOnNaN`, :class:`BestCheckpoint`,
    :class:`BestMetricTracker`, :func:`fire_event`, :func:`isolate`, :class:`StopTrainingError`
    (raise it anywhere to end training cleanly) and :class:`StopTrainingCheckpoint`.
Train-end pipeline
    :class:`TestOnTrainEnd`, :class:`ExportOnTrainEnd`, :class:`ArchiveOnTrainEnd`, :class:`MetadataLogger`.
Prediction writers (``trainer.predict``)
    :class:`InferenceWriter`, :class:`LeaderboardWriter` (in :mod:`matsciml.lightning.writers`).
Batch jobs and logs
    :class:`PreemptionCheckpoint` (resume checkpoint at a step boundary, requeue),
    :class:`RNGStateCallback` (generator states in checkpoints), :class:`LogProgressBar`.
Experiment trackers and emissions (extras ``tracking`` and ``emissions``)
    :class:`UploadCheckpoint` (best checkpoint, config, report, metadata to MLflow and W&B),
    :class:`CodeCarbonCallback` (energy and CO2-equivalent emissions per epoch and in total).

Layout: shared helpers in ``_utils`` (no callback imports), base classes in ``_base``
(import ``_utils`` only), one callback per module (imports ``_utils``, ``_base`` and the task
protocol, never another callback).
Configuration
    :func:`build_callbacks` (``class_path``/``init_args`` and ``kind`` + ``every_n_*`` styles).
"""

from __future__ import annotations

import sys

from matsciml.lightning.callbacks._base.isolation import CallbackError, IsolatedCallback, isolate
from matsciml.lightning.callbacks._base.periodic import PeriodicCallback
from matsciml.lightning.callbacks._base.train_end import TrainEndCallback
from matsciml.lightning.callbacks.atom_attribution import AtomAttributionCallback
from matsciml.lightning.callbacks.autocorrelation import ModelAutocorrelation
from matsciml.lightning.callbacks.best import BestCheckpoint, BestMetricTracker
from matsciml.lightning.callbacks.builder import build_callbacks, register_builtin_callbacks
from matsciml.lightning.callbacks.data_iterator import PeriodicDataIteratorCallback
from matsciml.lightning.callbacks.dataset_stats import DatasetStatsCallback
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks.emissions import CodeCarbonCallback
from matsciml.lightning.callbacks.events import fire_event
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
from matsciml.lightning.callbacks.metadata import MetadataLogger
from matsciml.lightning.callbacks.nan import ForwardNaNDetection
from matsciml.lightning.callbacks.param_count import ParamCountCallback
from matsciml.lightning.callbacks.preemption import PreemptionCheckpoint, TrainingPreempted
from matsciml.lightning.callbacks.progress import LogProgressBar
from matsciml.lightning.callbacks.report import TrainingDynamicsReport
from matsciml.lightning.callbacks.rng_state import RNGStateCallback
from matsciml.lightning.callbacks.sam import SAM
from matsciml.lightning.callbacks.stop_training import StopTrainingCheckpoint, StopTrainingError
from matsciml.lightning.callbacks.stopping import FixedBudgetStopping, MetricEarlyStopping, TerminateOnNaN
from matsciml.lightning.callbacks.throughput import ThroughputCallback
from matsciml.lightning.callbacks.track_outputs import TrackOutputsCallback
from matsciml.lightning.callbacks.train_end import ArchiveOnTrainEnd, ExportOnTrainEnd, TestOnTrainEnd
from matsciml.lightning.callbacks.unused import UnusedParametersCallback
from matsciml.lightning.callbacks.upload import UploadCheckpoint
from matsciml.lightning.writers import InferenceWriter, LeaderboardWriter

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
    "PeriodicCallback",
    "PeriodicDataIteratorCallback",
    "MetricEarlyStopping",
    "FixedBudgetStopping",
    "TerminateOnNaN",
    "BestCheckpoint",
    "BestMetricTracker",
    "fire_event",
    "IsolatedCallback",
    "isolate",
    "CallbackError",
    "TrainEndCallback",
    "TestOnTrainEnd",
    "ExportOnTrainEnd",
    "ArchiveOnTrainEnd",
    "MetadataLogger",
    "InferenceWriter",
    "LeaderboardWriter",
    "PreemptionCheckpoint",
    "TrainingPreempted",
    "RNGStateCallback",
    "LogProgressBar",
    "StopTrainingError",
    "ParamCountCallback",
    "AtomAttributionCallback",
    "DatasetStatsCallback",
    "TrackOutputsCallback",
    "StopTrainingCheckpoint",
    "UploadCheckpoint",
    "CodeCarbonCallback",
    "build_callbacks",
]

register_builtin_callbacks(sys.modules[__name__])
