"""How callbacks show things: scalars to every logger, images and histograms where supported.

Scalars go through :meth:`lightning.pytorch.loggers.Logger.log_metrics`, so CSV,
TensorBoard, W&B, MLflow and any other Lightning logger receive them. Images go to
loggers that can take them (TensorBoard's ``SummaryWriter``, W&B's ``log``, MLflow's
``log_image``), histograms to TensorBoard and W&B; when none can, images are written as
PNG files under ``<run folder>/figures`` and histograms as ``.npz`` files beside them. Messages go through :class:`RateLimitedWarner`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from matsciml.lightning.callbacks._utils.trackers import mlflow_image_key
from matsciml.lightning.checkpointing import atomic_path

__all__ = [
    "run_folder",
    "log_scalars",
    "log_image",
    "log_histogram",
    "RateLimitedWarner",
    "TrainingDynamicsWarning",
]


class TrainingDynamicsWarning(UserWarning):
    """A monitor saw something in the training dynamics that deserves a look."""


def run_folder(trainer: Any) -> Path:
    """The folder a run writes into: the first logger's ``log_dir``, else ``trainer.default_root_dir``."""
    for logger in getattr(trainer, "loggers", []) or []:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir)
    return Path(getattr(trainer, "default_root_dir", None) or os.getcwd())


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


@rank_zero_only
def log_scalars(trainer: Any, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Send scalar ``metrics`` to every logger of ``trainer`` (rank zero only).

    Parameters
    ----------
    trainer
        The Lightning trainer.
    metrics
        ``{name: number or 0-d tensor}``.
    step
        Step to record; defaults to ``trainer.global_step``.
    """
    if not metrics:
        return
    step = trainer.global_step if step is None else step
    values = {k: _as_float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def _experiment(logger: Any) -> Any:
    try:
        return logger.experiment
    except Exception:  # noqa: BLE001 - a logger without a usable experiment object
        return None


def _figure_to_array(figure: Any) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


@rank_zero_only
def log_image(trainer: Any, name: str, figure: Any, step: int | None = None) -> list[Path]:
    """Log a matplotlib figure or an ``[H, W, 3]`` uint8 array.

    Sent to TensorBoard (``add_image``), W&B (``log``) and MLflow loggers (``log_image`` with
    ``key=name`` and ``step``: the run's artifacts ``images/<name, / as ~>+step+<step>+...png``);
    when none of the loggers takes images the image is saved as
    ``<run folder>/figures/<name>_step<step>.png``. Returns the files written.
    """
    step = trainer.global_step if step is None else step
    image = _figure_to_array(figure) if hasattr(figure, "canvas") else np.asarray(figure)
    sent = False
    for logger in trainer.loggers:
        exp = _experiment(logger)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image(name, image, global_step=step, dataformats="HWC")
            sent = True
        elif exp is not None and type(exp).__module__.startswith("wandb"):
            import wandb  # noqa: PLC0415 - only when a W&B logger is in use

            exp.log({name: wandb.Image(image)}, step=step)
            sent = True
        elif exp is not None and isinstance(logger, MLFlowLogger):
            exp.log_image(logger.run_id, image, key=mlflow_image_key(name), step=step)
            sent = True
    if sent:
        return []
    out = run_folder(trainer) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name.replace('/', '_')}_step{step}.png"
    import matplotlib.pyplot as plt  # noqa: PLC0415 - keep matplotlib off the import path

    with atomic_path(path, suffix=".png") as tmp:
        plt.imsave(tmp, image)
    return [path]


@rank_zero_only
def log_histogram(trainer: Any, name: str, values: torch.Tensor, step: int | None = None) -> list[Path]:
    """Log a histogram of ``values`` to loggers that take histograms, else to an ``.npz`` file."""
    step = trainer.global_step if step is None else step
    data = values.detach().float().flatten().cpu()
    sent = False
    for logger in trainer.loggers:
        exp = _experiment(logger)
        if exp is not None and hasattr(exp, "add_histogram"):
            exp.add_histogram(name, data, global_step=step)
            sent = True
        elif exp is not None and type(exp).__module__.startswith("wandb"):
            import wandb  # noqa: PLC0415

            exp.log({name: wandb.Histogram(data.numpy())}, step=step)
            sent = True
    if sent:
        return []
    counts, edges = np.histogram(data.numpy(), bins=50)
    out = run_folder(trainer) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name.replace('/', '_')}_step{step}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, counts=counts, edges=edges)
    return [path]


class RateLimitedWarner:
    """Emit each kind of message at most once per ``min_interval_steps`` steps and ``max_per_key`` times.

    Messages are issued with :func:`warnings.warn` on rank zero only and are also kept in
    :attr:`history` as ``(step, key, message)`` for reports and tests.

    Parameters
    ----------
    min_interval_steps
        Steps between two messages of the same key (default 100).
    max_per_key
        Messages of one key in a whole run (default 5); ``None`` for no limit.
    category
        Warning category (default :class:`TrainingDynamicsWarning`).
    """

    def __init__(
        self,
        min_interval_steps: int = 100,
        max_per_key: int | None = 5,
        category: type[Warning] = TrainingDynamicsWarning,
    ) -> None:
        self.min_interval_steps = int(min_interval_steps)
        self.max_per_key = max_per_key
        self.category = category
        self._last: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self.history: list[tuple[int, str, str]] = []
        self._t0 = time.monotonic()

    def warn(self, key: str, message: str, step: int, rank: int = 0) -> bool:
        """Issue ``message`` under ``key`` at ``step`` unless rate-limited; return whether it was issued."""
        last = self._last.get(key)
        if last is not None and step - last < self.min_interval_steps:
            return False
        if self.max_per_key is not None and self._count.get(key, 0) >= self.max_per_key:
            return False
        self._last[key] = step
        self._count[key] = self._count.get(key, 0) + 1
        self.history.append((step, key, message))
        if rank == 0:
            warnings.warn(message, self.category, stacklevel=2)
        return True
