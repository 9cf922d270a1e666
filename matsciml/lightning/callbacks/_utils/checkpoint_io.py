"""Where callbacks put checkpoints, and how they write them atomically (temporary file, then ``os.replace``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from matsciml.lightning._compat import dump_checkpoint
from matsciml.lightning.callbacks._utils.reporting import run_folder
from matsciml.lightning.checkpointing import TEMPORARY_PREFIX, atomic_torch_save

__all__ = ["checkpoint_dir", "save_checkpoint_atomic", "save_local_checkpoint_atomic"]


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """``<run folder>/checkpoints`` (see :func:`~matsciml.lightning.callbacks._utils.reporting.run_folder`)."""
    return run_folder(trainer) / "checkpoints"


def _temporary(path: Path) -> Path:
    # the same name on every rank (sharded strategies write into it from all ranks); the prefix marks it as
    # a temporary file for matsciml.lightning.checkpointing (never taken for a checkpoint to resume)
    return path.with_name(f"{TEMPORARY_PREFIX}{path.stem}")


def save_checkpoint_atomic(trainer: pl.Trainer, path: str | os.PathLike, weights_only: bool = False) -> Path:
    """Write a full trainer checkpoint to ``path`` so that ``path`` is either absent or complete.

    A collective call: every rank must make it (like :meth:`lightning.pytorch.Trainer.save_checkpoint`,
    which it uses); rank zero writes a temporary file beside ``path`` and renames it.

    Parameters
    ----------
    trainer
        The trainer whose state is saved.
    path
        Final file name.
    weights_only
        Passed to ``Trainer.save_checkpoint`` (default ``False``: loops, optimizers and callbacks too).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    tmp = _temporary(path)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trainer.save_checkpoint(tmp, weights_only=weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, path)
    finally:
        if trainer.is_global_zero and tmp.is_file():
            tmp.unlink()
    return path


def save_local_checkpoint_atomic(trainer: pl.Trainer, path: str | os.PathLike) -> Path:
    """Write this rank's view of the trainer state to ``path`` without talking to the other ranks.

    Used for error checkpoints: the rank that failed may be the only one here, so no barrier
    or collective may be used. The checkpoint holds the same entries as one from
    ``Trainer.save_checkpoint`` (``state_dict``, loops, optimizer states, callbacks); it is
    written with :func:`matsciml.lightning.checkpointing.atomic_torch_save` (temporary
    file, ``fsync``, rename). With sharded strategies (FSDP, DeepSpeed) it holds this
    rank's shard only.

    Returns
    -------
    Path
        ``path``.
    """
    # the trainer's own checkpoint content; Trainer.save_checkpoint would add a barrier
    checkpoint: dict[str, Any] = dump_checkpoint(trainer, weights_only=False)
    return atomic_torch_save(checkpoint, path)
