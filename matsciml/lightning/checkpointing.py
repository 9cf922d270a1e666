"""Checkpoint files that are never half-written, and finding the checkpoint to resume from.

* :class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin: every checkpoint is
  written to a temporary file in the folder of its final name, flushed to disk
  (``fsync``) and renamed over the final name with :func:`os.replace`. A process killed
  while saving leaves the previous file of that name (or none) and a stray temporary
  file, never a truncated checkpoint.
* :func:`find_resume_checkpoint` picks the newest *usable* checkpoint of a run folder:
  one that :func:`torch.load` reads with ``weights_only=True`` and that holds the
  training state (loops and optimizer states), not weights only.

Temporary files are named ``.partial-<pid>-<random hex>``: the name has no ``.ckpt``
suffix and no ``ckpt_`` (Lightning numbers its ``hpc_ckpt_<n>.ckpt`` files from every
name containing ``ckpt_`` in the folder), so neither Lightning nor
:func:`find_resume_checkpoint` ever takes one for a checkpoint.

Example (what the runner does)::

    from lightning.pytorch import Trainer
    from matsciml.lightning.checkpointing import AtomicCheckpointIO, find_resume_checkpoint

    trainer = Trainer(plugins=[AtomicCheckpointIO()], default_root_dir=run_dir)
    trainer.fit(task, datamodule=dm, ckpt_path=find_resume_checkpoint(run_dir))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from matsciml.common.atomic import TEMPORARY_PREFIX, atomic_path, atomic_write_text

__all__ = [
    "TEMPORARY_PREFIX",
    "AtomicCheckpointIO",
    "CheckpointInfo",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_text",
    "checkpoint_candidates",
    "find_resume_checkpoint",
    "is_temporary_file",
    "read_checkpoint_info",
]


def is_temporary_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file left by an interrupted :func:`atomic_torch_save`."""
    return Path(path).name.startswith(TEMPORARY_PREFIX)


def atomic_torch_save(obj: Any, path: str | os.PathLike, fsync: bool = True) -> Path:
    """:func:`torch.save` ``obj`` to ``path`` so that ``path`` is at every moment absent, old or complete.

    Parameters
    ----------
    obj
        What to save (a checkpoint dictionary).
    path
        Final file name; its folder is created when missing.
    fsync
        Flush the file (and the rename) to the storage device before returning (default
        ``True``). Without it a power loss or node crash, unlike a killed process, may
        still leave an empty file on some file systems.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        Writing or renaming failed (the temporary file is removed).
    """
    with atomic_path(path, suffix="", fsync=fsync) as tmp:  # no ".ckpt": a partial file never looks like a checkpoint
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
    return Path(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes each checkpoint atomically (temporary file, ``fsync``, rename).

    Lightning's own writer serialises into memory and then writes the final file in
    place, so a job killed during the write (time limit, preemption, out of memory)
    leaves a truncated ``last.ckpt`` and the run cannot resume. With this plugin the old
    file stays intact until the new one is complete. Remote paths (``s3://...``) fall
    back to the parent class.

    Used by the experiment runner for every trainer it builds; in Python::

        trainer = Trainer(plugins=[AtomicCheckpointIO()])

    Parameters
    ----------
    fsync
        Flush each checkpoint to the storage device before the rename (default ``True``).

    Raises
    ------
    TypeError
        ``storage_options`` given to ``save_checkpoint`` (as the parent class).
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = bool(fsync)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"Trainer.save_checkpoint(..., storage_options=...) is not supported by {type(self).__name__}"
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path, fsync=self.fsync)


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`read_checkpoint_info` learnt about one checkpoint file.

    Attributes
    ----------
    path
        The file.
    usable
        It loads with ``weights_only=True`` and holds a training state (loops, optimizer states).
    global_step, epoch
        Progress stored in the checkpoint (``-1`` when unreadable).
    mtime
        Modification time (s since the epoch).
    problem
        Why it is not usable (``""`` when it is).
    """

    path: Path
    usable: bool
    global_step: int = -1
    epoch: int = -1
    mtime: float = 0.0
    problem: str = ""


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Open a checkpoint safely (``weights_only=True``, memory-mapped) and report whether it can resume a run.

    Never raises for a bad file: a truncated, empty or foreign file gives ``usable=False``
    and the reason in ``problem``.
    """
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except OSError as err:
        return CheckpointInfo(path, False, problem=f"cannot stat: {err}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not usable"
        reason = " ".join(str(err).split())[:200]
        return CheckpointInfo(path, False, mtime=mtime, problem=f"does not load with weights_only=True: {reason}")
    if not isinstance(checkpoint, dict):
        return CheckpointInfo(path, False, mtime=mtime, problem=f"holds a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in ("state_dict", "loops", "optimizer_states") if key not in checkpoint]
    if missing:
        return CheckpointInfo(
            path, False, mtime=mtime, problem=f"has no {', '.join(missing)} (a weights-only checkpoint)"
        )
    return CheckpointInfo(
        path,
        True,
        global_step=int(checkpoint.get("global_step", -1)),
        epoch=int(checkpoint.get("epoch", -1)),
        mtime=mtime,
    )


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """The ``*.ckpt`` files a run may resume from: ``<run_dir>/*.ckpt`` (requeue checkpoints) and
    ``<run_dir>/checkpoints/*.ckpt`` (``last.ckpt`` and the best ones), temporary files excluded."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            found += [p for p in folder.glob("*.ckpt") if p.is_file() and not is_temporary_file(p)]
    return sorted(found)


def find_resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest usable checkpoint of a run folder, or ``None`` (start fresh).

    Candidates are those of :func:`checkpoint_candidates`; each is opened with
    ``torch.load(weights_only=True, mmap=True)`` (cheap: tensors are mapped, not read).
    The newest is the one with the most optimizer steps, then the latest modification
    time (a checkpoint written after the validation that followed a step wins over one
    written before it). Unusable files are skipped.

    Parameters
    ----------
    run_dir
        The run folder; a missing folder gives ``None``.
    """
    usable = [info for info in map(read_checkpoint_info, checkpoint_candidates(run_dir)) if info.usable]
    if not usable:
        return None
    best = max(usable, key=lambda info: (info.global_step, info.mtime))
    return best.path
