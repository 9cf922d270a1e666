"""The SLURM job a run belongs to: its id, its run-folder name, its trainer arguments, its requeue.

* :func:`slurm_job_id`, :func:`slurm_run_name`: the job's id (``<array job>_<task>`` for
  array jobs) and the run-folder name derived from it, so that a requeued job finds its
  own checkpoints.
* :func:`is_srun_launched`, :func:`slurm_trainer_arguments`: whether the processes were
  started by ``srun``, and ``devices`` / ``num_nodes`` filled from the allocation.
* :func:`requeue_job`: ``scontrol requeue`` with clear messages when it cannot be run
  (``scontrol`` missing inside a container, for instance).

The preemption callback that uses them is
:class:`~matsciml.lightning.callbacks.preemption.PreemptionCheckpoint`.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from matsciml.common.errors import ConfigError

__all__ = ["is_srun_launched", "requeue_job", "slurm_job_id", "slurm_run_name", "slurm_trainer_arguments"]

_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job id, ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` for an array task; ``None`` outside SLURM.

    A requeued job keeps its id, so the id names what belongs to one job across its restarts.
    """
    env = os.environ if environ is None else environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def slurm_run_name(environ: Mapping[str, str] | None = None) -> str | None:
    """``slurm-<job id>`` (see :func:`slurm_job_id`), the run-folder name of a SLURM job; ``None`` outside SLURM."""
    job = slurm_job_id(environ)
    return f"slurm-{job}" if job else None


def is_srun_launched() -> bool:
    """Whether this process was started by ``srun`` inside a SLURM job (Lightning's ``SLURMEnvironment.detect``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def _int_or_none(text: str | None) -> int | None:
    if text is None or not re.fullmatch(r"\s*\d+\s*", text):
        return None
    return int(text)


def slurm_trainer_arguments(kwargs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Trainer arguments with ``devices`` and ``num_nodes`` taken from the SLURM allocation where the config leaves them.

    Lightning requires ``devices`` = tasks per node and ``num_nodes`` = nodes of the
    allocation. So that one trainer config runs on a laptop and on N nodes x M GPUs,
    ``devices`` that is absent, ``"auto"`` or ``-1`` becomes ``SLURM_NTASKS_PER_NODE``
    (else ``SLURM_NTASKS / SLURM_NNODES``), and an absent ``num_nodes`` becomes
    ``SLURM_NNODES``. Values the config sets explicitly are kept (Lightning reports a
    mismatch with the allocation).

    Parameters
    ----------
    kwargs
        The merged Trainer arguments of the config.
    environ
        Environment to read (default ``os.environ``).

    Returns
    -------
    dict
        A copy of ``kwargs`` with the filled values.
    """
    env = os.environ if environ is None else environ
    out = dict(kwargs)
    nodes = _int_or_none(env.get("SLURM_NNODES")) or _int_or_none(env.get("SLURM_JOB_NUM_NODES"))
    per_node = _int_or_none(env.get("SLURM_NTASKS_PER_NODE"))
    if per_node is None:
        tasks = _int_or_none(env.get("SLURM_NTASKS"))
        if tasks is not None and nodes:
            per_node = tasks // nodes
    if out.get("devices") in (None, "auto", -1, "-1") and per_node:
        out["devices"] = per_node
    if "num_nodes" not in out and nodes:
        out["num_nodes"] = nodes
    return out


def requeue_job(
    job_id: str, command: Sequence[str] = ("scontrol", "requeue", "{job_id}"), timeout: float = 60.0
) -> str:
    """Run the requeue command for ``job_id``; return ``""`` on success, else what went wrong.

    Parameters
    ----------
    job_id
        The job (``12345`` or ``12345_7`` for an array task).
    command
        The command, ``{job_id}`` replaced (default ``scontrol requeue {job_id}``).
    timeout
        Seconds to wait for it (default 60).

    Raises
    ------
    ConfigError
        ``job_id`` is not a SLURM job id (digits, optionally ``_<task>``).
    """
    if not _JOB_ID.match(str(job_id)):
        raise ConfigError(f"requeue_job: {job_id!r} is not a SLURM job id (digits, or <array job>_<task>)")
    cmd = [part.replace("{job_id}", str(job_id)) for part in command]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return f"{cmd[0]!r} was not found on PATH (inside a container, bind-mount it or run the job without one)"
    except subprocess.TimeoutExpired:
        return f"{' '.join(cmd)} did not finish within {timeout:g} s"
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout or "").split())[:300]
        return f"{' '.join(cmd)} exited with status {done.returncode}: {detail}"
    return ""
