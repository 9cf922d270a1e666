"""Ending training on purpose from inside it: :class:`StopTrainingError` and the checkpoint it leaves.

Any callback hook or the task may ``raise StopTrainingError("reason")`` (pytorch-accelerated's
spelling) to end ``fit``. It is a :class:`SystemExit` with status ``0``: left uncaught, the
program ends normally; ``except Exception`` in user code does not swallow it; the runner
treats it as a normal end of training. :class:`StopTrainingCheckpoint` (on in every runner
trainer) writes a checkpoint of the state at the moment it was raised and logs the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from matsciml.lightning.callbacks._utils.checkpoint_io import checkpoint_dir, save_checkpoint_atomic

__all__ = ["StopTrainingError", "StopTrainingCheckpoint"]


class StopTrainingError(SystemExit):
    """Raised by a callback hook or the task to end training cleanly (exit status 0).

    Raise it on every rank (the condition should be one all ranks agree on): the checkpoint
    is a collective write.

    Parameters
    ----------
    reason
        Why training stops; written to the log and kept as :attr:`reason`.

    Attributes
    ----------
    reason
        The reason given.
    checkpoint
        The checkpoint :class:`StopTrainingCheckpoint` wrote (``None`` without that callback).
    epoch, global_step
        Where training stopped (set by :class:`StopTrainingCheckpoint`).
    """

    def __init__(self, reason: str = "stop requested") -> None:
        super().__init__(0)
        self.reason = str(reason)
        self.checkpoint: Path | None = None
        self.epoch: int | None = None
        self.global_step: int | None = None

    def __str__(self) -> str:
        where = "" if self.global_step is None else f" at epoch {self.epoch}, step {self.global_step}"
        saved = "" if self.checkpoint is None else f"; checkpoint {self.checkpoint}"
        return f"training stopped{where}: {self.reason}{saved}"


class StopTrainingCheckpoint(Callback):
    """Write a checkpoint and log the reason when :class:`StopTrainingError` ends training.

    Hooks it acts in: ``on_exception`` (only for :class:`StopTrainingError`; other errors
    are left to the rest of the trainer). The checkpoint holds the weights, optimizer and
    loop state after the last completed optimizer step (``trainer.global_step`` of them):
    a step in which the error was raised before its optimizer step is not in it. It is
    written atomically to ``<dirpath>/<filename>``.

    Example::

        callbacks:
          - kind: StopTrainingCheckpoint
            filename: stopped.ckpt

    Parameters
    ----------
    dirpath
        Folder of the checkpoint; ``None`` (default): the folder of the first
        ``ModelCheckpoint`` of the trainer, else ``<run folder>/checkpoints``.
    filename
        File name (default ``"stopped.ckpt"``).
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str = "stopped.ckpt") -> None:
        super().__init__()
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = str(filename)

    def _folder(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return self.dirpath
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath)
        return checkpoint_dir(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, StopTrainingError):
            return
        exception.epoch, exception.global_step = trainer.current_epoch, trainer.global_step
        exception.checkpoint = save_checkpoint_atomic(trainer, self._folder(trainer) / self.filename)
        rank_zero_info(f"StopTrainingError: {exception}")
