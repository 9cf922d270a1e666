"""Loader settings the runner chooses from the machine when a dataset config leaves them out.

Rules (``num_workers: auto`` in a dataset config asks for them explicitly):

* ``num_workers``: on a GPU, ``min(4, CPUs per device - 1)`` worker processes, so the
  next batches are ready while the accelerator computes; on a CPU, ``0``: the graph cache
  makes the loader cheap after the first epoch, and worker processes would take cores
  from the model itself.
* ``persistent_workers``: ``True`` when there are workers (no process start per epoch).
* ``in_process_if_cached``: ``True`` with workers chosen here: when the memory graph cache
  holds the whole data set within the columns limit, the data module loads in the training
  process after all (a batch gathered from columns costs less than one received from a
  worker and pinned; see :class:`~matsciml.lightning.MatSciMLDataModule`).
* ``pin_memory``: ``True`` when training on a GPU (page-locked batches; Lightning then
  copies them to the device with ``non_blocking=True``).

Example YAML (dataset config)::

    experiment:
      train_path: /data/train.extxyz
      num_workers: auto      # or leave it out
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["uses_gpu", "machine_loader_defaults", "apply_loader_defaults"]

_GPU_ACCELERATORS = ("gpu", "cuda")


def uses_gpu(trainer_args: dict[str, Any]) -> bool:
    """Whether a trainer with these arguments trains on a CUDA GPU."""
    accelerator = str(trainer_args.get("accelerator", "auto")).lower()
    if accelerator in _GPU_ACCELERATORS:
        return True
    if accelerator != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _devices(trainer_args: dict[str, Any]) -> int:
    devices = trainer_args.get("devices", 1)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    import torch

    return max(1, torch.cuda.device_count())


def machine_loader_defaults(gpu: bool, devices: int = 1, cpus: int | None = None) -> dict[str, Any]:
    """``{num_workers, persistent_workers, pin_memory}`` for this machine (see the module docs).

    Parameters
    ----------
    gpu
        Training on a GPU.
    devices
        Processes (devices) sharing the machine's CPUs.
    cpus
        CPUs available to this process (default: ``os.sched_getaffinity`` or ``os.cpu_count``).
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(0, min(4, cpus // max(1, devices) - 1)) if gpu else 0
    return {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": bool(gpu)}


def apply_loader_defaults(kwargs: dict[str, Any], trainer_args: dict[str, Any]) -> dict[str, Any]:
    """Fill ``num_workers`` (absent or ``"auto"``; then also ``in_process_if_cached``), ``persistent_workers`` and
    ``pin_memory`` (absent) in place."""
    gpu = uses_gpu(trainer_args)
    defaults = machine_loader_defaults(gpu, _devices(trainer_args) if gpu else 1)
    if kwargs.get("num_workers", "auto") == "auto":
        kwargs["num_workers"] = defaults["num_workers"]
        kwargs.setdefault("persistent_workers", defaults["persistent_workers"])
        if defaults["num_workers"]:
            kwargs.setdefault("in_process_if_cached", True)
    kwargs.setdefault("pin_memory", defaults["pin_memory"])
    return kwargs
