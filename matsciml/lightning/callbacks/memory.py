"""Process memory (resident set size) and peak CUDA memory during training."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.lightning.callbacks._base.optimizer_step import OptimizerStepCallback
from matsciml.lightning.callbacks._utils.names import MEMORY_CUDA_PEAK, MEMORY_RSS, MEMORY_RSS_PEAK
from matsciml.lightning.callbacks._utils.reporting import log_scalars

__all__ = ["PeakMemoryCallback", "rss_bytes", "peak_rss_bytes", "memory_snapshot"]

MIB = float(2**20)


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes.

    From ``psutil`` when installed, else ``/proc/self/statm`` (Linux), else the peak
    (:func:`peak_rss_bytes`).
    """
    try:
        import psutil  # noqa: PLC0415 - optional dependency

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Largest resident set size this process has had so far, in bytes (0 when unknown).

    ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (kilobytes on Linux, bytes on macOS);
    on Windows ``psutil``'s ``peak_wset`` when installed.
    """
    try:
        import resource  # noqa: PLC0415 - not on Windows
    except ImportError:
        try:
            import psutil  # noqa: PLC0415

            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
        except ImportError:
            return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def memory_snapshot(device: torch.device | None = None, reset_cuda_peak: bool = False) -> dict[str, float]:
    """Memory figures of this process, in MiB (2**20 bytes).

    Parameters
    ----------
    device
        A CUDA device to read the caching allocator of; ``None`` or a non-CUDA device:
        host figures only.
    reset_cuda_peak
        Reset the device's peak statistics after reading them, so that the next
        snapshot reports the peak since this one.

    Returns
    -------
    dict
        ``memory/rss_mb`` (current resident set size), ``memory/rss_peak_mb`` (largest
        so far) and, for a CUDA device, ``memory/cuda_peak_mb``
        (``torch.cuda.max_memory_allocated``: the largest amount held by tensors since
        the last reset) and ``memory/cuda_reserved_mb`` (``torch.cuda.memory_reserved``:
        held by the caching allocator now).
    """
    out = {MEMORY_RSS: rss_bytes() / MIB, MEMORY_RSS_PEAK: peak_rss_bytes() / MIB}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out[MEMORY_CUDA_PEAK] = torch.cuda.max_memory_allocated(device) / MIB
        out["memory/cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / MIB
        if reset_cuda_peak:
            torch.cuda.reset_peak_memory_stats(device)
    return out


class PeakMemoryCallback(OptimizerStepCallback):
    """Log the process's resident memory and the peak CUDA memory every few steps.

    Every ``every_n_steps`` optimizer steps it logs, to every logger
    (:func:`~matsciml.lightning.callbacks._utils.reporting.log_scalars`), in MiB (2**20 bytes;
    the names keep the customary ``mb``):

    =============================== =======================================================
    ``memory/rss_mb``               resident set size of the process now (``psutil`` when
                                    installed, else ``/proc/self/statm``)
    ``memory/rss_peak_mb``          largest resident set size so far (``getrusage``)
    ``memory/cuda_peak_mb``         ``torch.cuda.max_memory_allocated`` since the previous
                                    record (since the start of training for the first
                                    one), on CUDA only
    ``memory/cuda_reserved_mb``     ``torch.cuda.memory_reserved`` now, on CUDA only
    =============================== =======================================================

    Under a multi-process strategy each value is the maximum over the ranks (one small
    all-reduce per record). The run's maxima are kept in :attr:`peaks` and reported once
    at the end of training.

    Hooks it acts in:

    * ``on_train_start``: resets the CUDA peak statistics (with ``reset_cuda_peak``);
    * ``on_train_batch_end``: records when the optimizer step count reached a multiple
      of ``every_n_steps``;
    * ``on_train_end``: a last record, and an info message with the run's peaks.

    Parameters
    ----------
    every_n_steps
        Optimizer steps between two records, default ``50``.
    reset_cuda_peak
        Reset the CUDA peak statistics at the start of training and after each record
        (default ``True``), so ``memory/cuda_peak_mb`` is the peak of each window. Set
        ``False`` when other code reads ``torch.cuda.max_memory_allocated``; the value is
        then the peak since the process started.

    Attributes
    ----------
    peaks : dict[str, float]
        Largest value of each logged figure over the run, MiB.

    Raises
    ------
    ConfigError
        ``every_n_steps`` is not a positive integer (at construction).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.PeakMemoryCallback
              init_args: {every_n_steps: 50}
    """

    def __init__(self, every_n_steps: int = 50, reset_cuda_peak: bool = True) -> None:
        super().__init__()
        check_int(every_n_steps, "every_n_steps", "PeakMemoryCallback")
        self.every_n_steps = every_n_steps
        self.reset_cuda_peak = bool(reset_cuda_peak)
        self.peaks: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        values = memory_snapshot(pl_module.device, reset_cuda_peak=self.reset_cuda_peak)
        if trainer.world_size > 1:
            names = sorted(values)
            reduced = trainer.strategy.reduce(
                torch.tensor([values[n] for n in names], dtype=torch.float64, device=pl_module.device),
                reduce_op="max",
            )
            values = dict(zip(names, reduced.tolist()))
        for name, value in values.items():
            self.peaks[name] = max(self.peaks.get(name, 0.0), value)
        self.history.append({"step": float(step), **values})
        log_scalars(trainer, values, step=step)
        return values

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        device = pl_module.device
        if self.reset_cuda_peak and device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(device)

    @override
    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, step: int
    ) -> None:
        if step % self.every_n_steps == 0:
            self._record(trainer, pl_module, step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._record(trainer, pl_module, trainer.global_step)
        summary = ", ".join(f"{name.split('/', 1)[1]} {value:.0f} MiB" for name, value in sorted(self.peaks.items()))
        rank_zero_info(f"PeakMemoryCallback: peaks over training: {summary}")
