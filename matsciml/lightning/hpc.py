"""Batch jobs under SLURM (the import path of earlier versions).

The job's identity and requeue are in :mod:`matsciml.lightning.slurm`, the preemption
callback in :mod:`matsciml.lightning.callbacks.preemption`.
"""

from __future__ import annotations

from matsciml.lightning.callbacks.preemption import PreemptionCheckpoint, TrainingPreempted
from matsciml.lightning.slurm import (
    is_srun_launched,
    requeue_job,
    slurm_job_id,
    slurm_run_name,
    slurm_trainer_arguments,
)

__all__ = [
    "PreemptionCheckpoint",
    "TrainingPreempted",
    "is_srun_launched",
    "requeue_job",
    "slurm_job_id",
    "slurm_run_name",
    "slurm_trainer_arguments",
]
