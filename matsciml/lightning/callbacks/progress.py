"""Batch logs: plain progress lines instead of a redrawn bar when the output is a file, warnings from rank 0.

A progress bar redraws itself with carriage returns; written to a SLURM output file it
becomes thousands of overwritten fragments. :class:`LogProgressBar` is a Lightning
progress bar that writes one complete line every ``interval_s`` seconds instead::

    2025-01-01 12:00:31 train epoch 2/15 batch 40/60 step 100/900 | loss 0.0213 | 4.1 steps/s 66 samples/s | elapsed 0:00:24 ETA 0:03:15
    2025-01-01 12:00:35 val   epoch 2/15 step 120/900 | val_energy_per_atom_mae 0.00951 val_loss 0.0192 | 1.2 s

``loss`` is the mean training loss over the steps since the previous line; throughput
counts optimizer steps and structures (all ranks); the ETA extrapolates the step rate
since the start of this run to ``trainer.estimated_stepping_batches``. Only rank 0 writes.

:func:`show_warnings_on_rank_zero_only` keeps a multi-process log readable: on ranks
other than 0, Python warnings are dropped unless their message says which rank it is
about (Lightning's ``[rank: N]`` prefix, :func:`lightning_utilities.core.rank_zero.rank_prefixed_message`),
which is how code marks a warning that differs per rank.

The experiment runner uses :class:`LogProgressBar` whenever its standard output is not a
terminal; to change the interval, list it among the trainer config's callbacks::

    callbacks:
      - class_path: matsciml.lightning.callbacks.progress.LogProgressBar
        init_args: {interval_s: 60}
"""

from __future__ import annotations

import datetime
import math
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from matsciml.common.errors import ConfigError

__all__ = ["LogProgressBar", "format_duration", "show_warnings_on_rank_zero_only"]


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``?`` for an unknown or infinite duration)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return "[...]"
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _batch_size(batch: Any) -> int | None:
    """Structures in a batch: its ``batch_size`` entry, else Lightning's guess from the first tensor."""
    if isinstance(batch, Mapping) and batch.get("batch_size") is not None:
        try:
            return int(batch["batch_size"])
        except (TypeError, ValueError):
            return None
    try:
        from lightning.pytorch.utilities.data import extract_batch_size

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:  # noqa: BLE001 - a batch we cannot size: throughput in steps only
        return None


class LogProgressBar(ProgressBar):
    """A progress "bar" for batch jobs: one line every ``interval_s`` seconds, on rank 0.

    Lines (see the module docs for an example):

    * ``train``: epoch, batch in the epoch, optimizer step of the total, mean training
      loss since the previous line, steps/s and structures/s (all ranks together),
      elapsed time and ETA;
    * ``val``: after each validation pass (not the sanity check), ``val_loss`` and the
      logged ``val_*_mae`` / ``_accuracy`` / ``_rmse`` metrics (every ``val*`` metric when
      there are none of these), and the duration of the pass;
    * a first line with the planned steps and a last one with the total time.

    Hooks it acts in: ``on_train_start``, ``on_train_batch_end`` (accumulates the loss
    from the step output without a device synchronisation, writes when the interval has
    passed), ``on_validation_start`` / ``on_validation_end``, ``on_train_end``.

    Example::

        trainer = Trainer(callbacks=[LogProgressBar(interval_s=60)])

    Parameters
    ----------
    interval_s
        Seconds between two ``train`` lines, default 30. A line is also written after the
        first step.
    stream
        Where to write; ``None`` (default) = ``sys.stdout`` at the time of writing.
    validation_lines
        Write a ``val`` line after each validation pass (default ``True``).

    Raises
    ------
    ConfigError
        ``interval_s`` is not positive.
    """

    def __init__(self, interval_s: float = 30.0, stream: TextIO | None = None, validation_lines: bool = True) -> None:
        super().__init__()
        if not float(interval_s) > 0:
            raise ConfigError(f"LogProgressBar: interval_s={interval_s!r} must be > 0 (seconds)")
        self.interval_s = float(interval_s)
        self.stream = stream
        self.validation_lines = bool(validation_lines)
        self._enabled = True
        self._t_start = 0.0
        self._t_last = 0.0
        self._step_start = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._losses: list[torch.Tensor] = []
        self._window_steps = 0
        self._window_samples = 0
        self._samples_known = True
        self._last_step_seen: int | None = None
        self._first_line_done = False
        self._t_val = 0.0

    # ------------------------------------------------------------------ ProgressBar interface
    @override
    def disable(self) -> None:
        """Stop writing lines (Lightning calls it on ranks other than 0)."""
        self._enabled = False

    @override
    def enable(self) -> None:
        """Write lines again."""
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        """Whether lines are written (rank 0 only)."""
        return self._enabled and self._trainer is not None and self.trainer.is_global_zero

    @property
    def is_disabled(self) -> bool:
        """``not is_enabled``."""
        return not self.is_enabled

    @override
    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Write ``args`` as one line (``LightningModule.print`` goes through here on rank 0)."""
        self._write(sep.join(map(str, args)))

    # ------------------------------------------------------------------ output
    def _write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        stream.write(line.rstrip("\n") + "\n")
        stream.flush()

    @staticmethod
    def _stamp() -> str:
        return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")

    def _epochs(self, trainer: pl.Trainer) -> str:
        total = trainer.max_epochs
        return (
            f"{trainer.current_epoch + 1}/{total}"
            if total is not None and total > 0
            else f"{trainer.current_epoch + 1}"
        )

    def _total_steps(self, trainer: pl.Trainer) -> float:
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - unknown loader length
            return math.inf

    def _steps(self, trainer: pl.Trainer) -> str:
        total = self._total_steps(trainer)
        return f"{trainer.global_step}/{int(total)}" if math.isfinite(total) else f"{trainer.global_step}"

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_start = self._t_last = time.monotonic()
        self._step_start = trainer.global_step
        self._reset_window()
        self._last_step_seen = trainer.global_step
        self._first_line_done = False
        if not self.is_enabled:
            return
        total = self._total_steps(trainer)
        planned = f"{int(total)} optimizer steps" if math.isfinite(total) else "an open-ended number of steps"
        start = f", starting at step {trainer.global_step}" if trainer.global_step else ""
        self._write(
            f"{self._stamp()} start training: {planned}{start}, {trainer.world_size} process(es); "
            f"a line every {self.interval_s:g} s"
        )

    def _reset_window(self) -> None:
        self._loss_sum = None
        self._loss_count = 0
        self._losses = []
        self._window_steps = 0
        self._window_samples = 0
        self._samples_known = True

    def _fold_losses(self) -> None:
        """Add the losses collected since the last fold to the window's sum (one stack, one sum)."""
        if self._losses:
            total = torch.stack([loss.reshape(()).float() for loss in self._losses]).sum()
            self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
            self._loss_count += len(self._losses)
            self._losses = []

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_enabled:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())  # summed when a line is written, not at every step
            if len(self._losses) >= 256:
                self._fold_losses()
        size = _batch_size(batch)
        if size is None:
            self._samples_known = False
        else:
            self._window_samples += size
        if trainer.global_step != self._last_step_seen:
            self._window_steps += trainer.global_step - (self._last_step_seen or 0)
            self._last_step_seen = trainer.global_step
        now = time.monotonic()
        if now - self._t_last >= self.interval_s or not self._first_line_done:
            self._train_line(trainer, now)

    def _train_line(self, trainer: pl.Trainer, now: float) -> None:
        window = max(now - self._t_last, 1e-9)
        parts = [
            f"{self._stamp()} train epoch {self._epochs(trainer)}",
            f"batch {trainer.fit_loop.epoch_loop.batch_progress.current.processed}/{_count(self.total_train_batches)}",
            f"step {self._steps(trainer)}",
        ]
        line = " ".join(parts)
        self._fold_losses()
        if self._loss_sum is not None and self._loss_count:
            line += f" | loss {float(self._loss_sum) / self._loss_count:.4g}"
        rate = self._window_steps / window
        line += f" | {rate:.3g} steps/s"
        if self._samples_known and self._window_samples:
            line += f" {self._window_samples * trainer.world_size / window:.3g} samples/s"
        done = trainer.global_step - self._step_start
        elapsed = now - self._t_start
        remaining = self._total_steps(trainer) - trainer.global_step
        eta = remaining * elapsed / done if done > 0 else None
        line += f" | elapsed {format_duration(elapsed)} ETA {format_duration(eta)}"
        self._write(line)
        self._t_last = now
        self._first_line_done = True
        self._reset_window()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t_val = time.monotonic()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking or not self.validation_lines:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        chosen = {k: v for k, v in metrics.items() if k == "val_loss" or k.endswith(_VAL_SUFFIXES)} or metrics
        shown = " ".join(f"{k} {_format_value(v)}" for k, v in sorted(chosen.items())) or "(no val metrics)"
        self._write(
            f"{self._stamp()} val   epoch {self._epochs(trainer)} step {self._steps(trainer)} | {shown} | "
            f"{time.monotonic() - self._t_val:.1f} s"
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        elapsed = time.monotonic() - self._t_start
        self._write(
            f"{self._stamp()} end training: {trainer.current_epoch} epoch(s), step {trainer.global_step}, "
            f"{format_duration(elapsed)} in this run"
        )


#: Validation metrics shown besides ``val_loss`` (all ``val*`` metrics when none of these is logged).
_VAL_SUFFIXES = ("_mae", "_accuracy", "_rmse")


def _count(value: float | int) -> str:
    return str(int(value)) if isinstance(value, (int, float)) and math.isfinite(value) else "?"


def show_warnings_on_rank_zero_only() -> None:
    """On ranks other than 0, drop Python warnings unless their message names the rank (``[rank: N] ...``).

    Wraps :func:`warnings.showwarning`. The rank is read at each warning (Lightning's
    ``rank_zero_only.rank``, set from ``RANK``, ``LOCAL_RANK`` or ``SLURM_PROCID`` and by the
    trainer), so calling this before the trainer exists is fine; calling it again while
    the wrapper is in place does nothing.
    """
    previous = warnings.showwarning
    if getattr(previous, "_matsciml_rank_zero", False):
        return

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
        rank = getattr(rank_zero_only, "rank", 0) or 0
        if rank != 0 and "[rank:" not in str(message):
            return
        previous(message, category, filename, lineno, file, line)

    showwarning._matsciml_rank_zero = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
