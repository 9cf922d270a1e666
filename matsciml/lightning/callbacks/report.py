"""An end-of-fit figure of the training dynamics: losses, learning rate, gradient norms, EMA gain, speed, memory."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.optimizer_step import OptimizerStepCallback
from matsciml.lightning.callbacks._utils.names import (
    EMA_GAIN_PREFIX,
    GRAD_NORM_PREFIX,
    GRAD_NORM_TOTAL,
    MEMORY_CUDA_PEAK,
    MEMORY_RSS,
    MEMORY_RSS_PEAK,
    THROUGHPUT_ATOMS,
    THROUGHPUT_GRAPHS,
    VAL_RAW_PREFIX,
)
from matsciml.lightning.callbacks._utils.reporting import run_folder
from matsciml.lightning.callbacks._utils.steps import log_every_n_steps
from matsciml.lightning.checkpointing import atomic_path

__all__ = ["TrainingDynamicsReport", "PANEL_TITLES"]

#: Titles of the six panels, in reading order.
PANEL_TITLES = (
    "Loss",
    "Learning rate",
    "Gradient norm per module group",
    "EMA gain on validation",
    "Throughput",
    "Memory",
)

_TRAIN_LOSS = "train_loss"
_MAX_GRAD_LINES = 10


class _MetricTap(Logger):
    """A logger that hands every scalar it receives to the report (it writes nothing).

    Monitors send their scalars straight to the loggers
    (:func:`~matsciml.lightning.callbacks._utils.reporting.log_scalars`), outside
    ``trainer.callback_metrics``; listening as one more logger sees them whatever the
    other loggers are.
    """

    def __init__(self, report: TrainingDynamicsReport) -> None:
        super().__init__()
        self._report = report

    @property
    def name(self) -> str:
        return "training_dynamics_report"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._report._from_logger(metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None


def _float(value: Any) -> float | None:
    try:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return None
            value = value.detach().float().cpu().item()
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return out


def _run_name(trainer: Any) -> str:
    """The run folder's last two path parts (``name/version_3`` for CSV and TensorBoard loggers)."""
    folder = run_folder(trainer).resolve()
    return "/".join(folder.parts[-2:])


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average of ``values`` (what TensorBoard's smoothing slider does)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1.0 - weight) * value
        out.append(avg / (1.0 - weight**i))
    return out


class TrainingDynamicsReport(OptimizerStepCallback):
    """Write a one-page figure of how training went, ``training_dynamics.png``, at the end of ``fit``.

    Six panels against the optimizer step:

    ================================== ======================================================
    Loss                               training loss (what ``training_step`` returned,
                                       sampled every ``every_n_steps`` steps, and its
                                       bias-corrected exponential smoothing, weight 0.8)
                                       and the validation loss (``val_loss``, and ``val_raw_total``
                                       of the raw weights when EMA evaluates them)
    Learning rate                      of every parameter group, read from the optimizers
    Gradient norm per module group     every ``grad_norm/<group>`` scalar (``MonitorGradients``)
    EMA gain on validation             every ``ema_gain_<key>`` (``ExponentialMovingAverageCallback``
                                       with ``evaluate_raw=True``): raw minus EMA validation
                                       loss, positive when the EMA weights are better
    Throughput                         ``throughput/graphs_per_s`` (``ThroughputCallback``)
    Memory                             ``memory/*`` (``PeakMemoryCallback``)
    ================================== ======================================================

    A panel without data says so and names the callback that records it. The series are
    recorded during training, not read back from log files, so the report works with
    any logger: the training loss from the ``outputs`` of ``on_train_batch_end``, the
    learning rates from ``trainer.optimizers``, validation metrics from
    ``trainer.callback_metrics``, and the namespaced scalars that monitors send to the
    loggers (names with a ``/``) by listening as one more logger. That listener is added
    at ``on_fit_start`` only when the trainer has loggers (it never changes the run
    folder or checkpoint paths) and removed at the end; without loggers, scalars that
    monitors log through ``pl_module.log`` are read from ``trainer.callback_metrics``
    instead. The series are kept in checkpoints, so a resumed run's figure covers the
    whole run.

    Hooks it acts in:

    * ``on_fit_start``: attaches the listener; ``on_fit_end`` / ``on_exception`` /
      ``teardown`` detach it;
    * ``on_train_batch_end``: every ``every_n_steps`` optimizer steps (and after the
      first) records the training loss and learning rates (one host read of the loss);
    * ``on_validation_end``: records ``val_*`` and ``ema_gain_*`` (not during the
      sanity check);
    * ``on_train_start`` / ``on_train_epoch_end``: note the step and epoch counts;
    * ``on_fit_end``: draws the figure and writes ``<run folder>/<filename>`` (rank 0,
      through a temporary file and :func:`os.replace`); ``on_exception`` tries the same,
      so a run that fails still leaves its figure;
    * ``state_dict`` / ``load_state_dict``: the recorded series.

    The run folder is :func:`~matsciml.lightning.callbacks._utils.reporting.run_folder`: the
    first logger's ``log_dir``, else ``trainer.default_root_dir``.

    Parameters
    ----------
    filename
        File name in the run folder, default ``"training_dynamics.png"``.
    every_n_steps
        Optimizer steps between two samples of the training loss and learning rate;
        default ``None``: ``trainer.log_every_n_steps``.
    dpi
        Resolution of the PNG, default ``110`` (the figure is 15 x 8.5 inches).

    Attributes
    ----------
    series : dict[str, dict[int, float]]
        Recorded values: name -> {step: value}.
    path : pathlib.Path or None
        The file last written.
    panel_titles : tuple[str, ...]
        Titles of the panels of the last figure (also in the PNG's ``Description``
        text chunk).

    Raises
    ------
    ConfigError
        ``filename`` does not end in ``.png`` or ``every_n_steps`` is not a positive
        integer (at construction).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ThroughputCallback
            - class_path: matsciml.lightning.callbacks.PeakMemoryCallback
            - class_path: matsciml.lightning.callbacks.TrainingDynamicsReport
              init_args: {filename: training_dynamics.png}
    """

    def __init__(self, filename: str = "training_dynamics.png", every_n_steps: int | None = None, dpi: int = 110):
        super().__init__()
        if not isinstance(filename, str) or not filename.lower().endswith(".png") or os.sep in filename:
            raise ConfigError(f"TrainingDynamicsReport: filename={filename!r} must be a file name ending in .png")
        check_int(every_n_steps, "every_n_steps", "TrainingDynamicsReport", optional=True)
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.dpi = int(dpi)
        self.series: dict[str, dict[int, float]] = {}
        self.path: Path | None = None
        self.panel_titles: tuple[str, ...] = ()
        self._tap: _MetricTap | None = None
        self._had_loggers = False
        self._epochs = 0
        self._title = ""

    # ------------------------------------------------------------------ recording
    def _add(self, name: str, step: int, value: Any) -> None:
        number = _float(value)
        if number is not None:
            self.series.setdefault(name, {})[int(step)] = number

    def _from_logger(self, metrics: Mapping[str, Any], step: int | None) -> None:
        if step is None:
            return
        for name, value in metrics.items():
            if "/" in name:  # namespaced monitor scalars; task metrics are read from callback_metrics
                self._add(name, step, value)

    def _attach(self, trainer: pl.Trainer) -> None:
        self._detach(trainer)
        loggers = list(trainer.loggers)
        self._had_loggers = bool(loggers)
        if loggers:
            self._tap = _MetricTap(self)
            trainer.loggers = [*loggers, self._tap]

    def _detach(self, trainer: pl.Trainer) -> None:
        if self._tap is not None:
            trainer.loggers = [lg for lg in trainer.loggers if lg is not self._tap]
            self._tap = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer)

    @override
    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, step: int
    ) -> None:
        every = log_every_n_steps(trainer, self.every_n_steps)
        if step % every != 0 and step != 1:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, (torch.Tensor, float, int)):
            self._add(_TRAIN_LOSS, step, loss)
        for k, optimizer in enumerate(trainer.optimizers):
            for g, group in enumerate(optimizer.param_groups):
                name = f"lr/group{g}" if len(trainer.optimizers) == 1 else f"lr/optimizer{k}_group{g}"
                self._add(name, step, group.get("lr"))
        if self._tap is None:
            for name, value in trainer.callback_metrics.items():
                if "/" in name:
                    self._add(name, step, value)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("val_", EMA_GAIN_PREFIX)):
                self._add(name, trainer.global_step, value)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs = trainer.current_epoch + 1

    # ------------------------------------------------------------------ output
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach(trainer)
        if trainer.is_global_zero:
            self.write(run_folder(trainer) / self.filename, title=_run_name(trainer))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach(trainer)
        if not trainer.is_global_zero or not self.series:
            return
        try:
            path = self.write(run_folder(trainer) / self.filename, title=_run_name(trainer))
            rank_zero_info(f"TrainingDynamicsReport: training failed; the figure up to then is in {path}")
        except Exception as err:  # noqa: BLE001 - never mask the training error
            rank_zero_warn(f"TrainingDynamicsReport: could not write the figure after the failure: {err}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "series": {name: [[step, value] for step, value in points.items()] for name, points in self.series.items()},
            "epochs": self._epochs,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.series = {
            name: {int(step): float(value) for step, value in points}
            for name, points in state_dict.get("series", {}).items()
        }
        self._epochs = int(state_dict.get("epochs", 0))

    def write(self, path: str | os.PathLike, title: str = "") -> Path:
        """Draw the figure (:meth:`make_figure`) and save it to ``path`` atomically; returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - keep matplotlib off import

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure = self.make_figure(title)
        FigureCanvasAgg(figure)
        metadata = {
            "Title": self._title,
            "Description": "panels: " + "; ".join(self.panel_titles),
            "Software": "matsciml TrainingDynamicsReport",
        }
        with atomic_path(path, suffix=".png") as tmp:
            figure.savefig(tmp, format="png", dpi=self.dpi, metadata=metadata)
        self.path = path
        return path

    # ------------------------------------------------------------------ drawing
    def _xy(self, name: str) -> tuple[list[int], list[float]]:
        points = sorted(self.series.get(name, {}).items())
        return [p[0] for p in points], [p[1] for p in points]

    def _names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.series if n.startswith(prefix) and self.series[n])

    @staticmethod
    def _empty(ax: Any, title: str, message: str) -> None:
        ax.set_title(f"{title}: not recorded", fontsize=11)
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=10, linespacing=1.6)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_alpha(0.3)

    @staticmethod
    def _log_scale_if_wide(ax: Any, values: list[float]) -> None:
        positive = [v for v in values if math.isfinite(v)]
        if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
            ax.set_yscale("log")

    def _finish(self, ax: Any, panel: int, values: list[float], ylabel: str, message: str) -> None:
        """Title, label and (for a wide range) log-scale a line panel; or mark it empty with ``message``."""
        if values:
            ax.set_title(PANEL_TITLES[panel], fontsize=11)
            ax.set_ylabel(ylabel)
            self._log_scale_if_wide(ax, values)
        else:
            self._empty(ax, PANEL_TITLES[panel], message)

    def _plot(self, ax: Any, names: list[str], labels: list[str], **kwargs: Any) -> list[float]:
        values: list[float] = []
        for name, label in zip(names, labels):
            x, y = self._xy(name)
            if not x:
                continue
            style = {"marker": "o", "markersize": 3} if len(x) < 30 else {}
            ax.plot(x, y, label=label, **style, **kwargs)
            values += y
        return values

    def make_figure(self, title: str = "") -> Any:
        """The report as a :class:`matplotlib.figure.Figure` (no pyplot state involved)."""
        from matplotlib.figure import Figure  # noqa: PLC0415

        figure = Figure(figsize=(15, 8.5), layout="constrained")
        axes = figure.subplots(2, 3).ravel()
        monitors_need = (
            ""
            if self._had_loggers or self._tap is not None
            else "\nand a logger\n(monitors send their values to loggers)"
        )

        # 1. losses
        ax = axes[0]
        values: list[float] = []
        x, y = self._xy(_TRAIN_LOSS)
        if x:
            ax.plot(x, y, color="tab:blue", alpha=0.35, linewidth=0.9, label="train (sampled)")
            if len(y) >= 8:
                ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.8, label="train (smoothed)")
            values += y
        for name, label, color in (
            ("val_loss" if "val_loss" in self.series else "val_total", "validation", "tab:orange"),
            (VAL_RAW_PREFIX + "total", "validation, raw weights", "tab:green"),
        ):
            values += self._plot(ax, [name], [label], color=color)
        self._finish(
            ax, 0, values, "loss (normalised units)", "training_step returned no loss\nand no val_loss was logged"
        )

        # 2. learning rate
        ax = axes[1]
        names = self._names("lr/")
        values = self._plot(ax, names, [n.split("/", 1)[1].replace("_", " ") for n in names])
        self._finish(ax, 1, values, "learning rate", "no optimizer step was taken")

        # 3. gradient norms
        ax = axes[2]
        names = self._names(GRAD_NORM_PREFIX)
        if len(names) > _MAX_GRAD_LINES:  # keep the total and the largest groups
            rest = sorted((n for n in names if n != GRAD_NORM_TOTAL), key=lambda n: -max(self._xy(n)[1]))
            names = ([GRAD_NORM_TOTAL] if GRAD_NORM_TOTAL in names else []) + rest
            names = names[:_MAX_GRAD_LINES]
        values = self._plot(ax, names, [n.split("/", 1)[1] for n in names])
        self._finish(ax, 2, values, "gradient L2 norm", f"add MonitorGradients\nto the callbacks{monitors_need}")

        # 4. EMA gain
        ax = axes[3]
        names = self._names(EMA_GAIN_PREFIX)
        labels = [n[len(EMA_GAIN_PREFIX) :] for n in names]
        if len(names) == 2 and EMA_GAIN_PREFIX + "total" in names:  # one task key: its gain and the total coincide
            key = next(n for n in names if n != EMA_GAIN_PREFIX + "total")
            if self._xy(key) == self._xy(EMA_GAIN_PREFIX + "total"):
                names, labels = [EMA_GAIN_PREFIX + "total"], [f"total (= {key[len(EMA_GAIN_PREFIX) :]})"]
        values = self._plot(ax, names, labels)
        if values:
            ax.set_title(PANEL_TITLES[3], fontsize=11)
            ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
            ax.set_ylabel("val loss(raw) - val loss(EMA)\n(> 0: EMA weights better)")
        else:
            self._empty(
                ax,
                PANEL_TITLES[3],
                "EMA off, or on without raw evaluation:\nadd ExponentialMovingAverageCallback\n(evaluate_raw=True)",
            )

        # 5. throughput
        ax = axes[4]
        values = self._plot(ax, [THROUGHPUT_GRAPHS], ["structures / s"], color="tab:green")
        if values:
            ax.set_title(PANEL_TITLES[4], fontsize=11)
            ax.set_ylabel("structures per second")
            ax.set_ylim(bottom=0)
            x, atoms = self._xy(THROUGHPUT_ATOMS)
            if x:
                twin = ax.twinx()
                twin.plot(x, atoms, color="tab:purple", linestyle=":", label="atoms / s")
                twin.set_ylabel("atoms per second")
                twin.set_ylim(bottom=0)
                lines = ax.get_lines() + twin.get_lines()
                ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="lower right")
        else:
            self._empty(ax, PANEL_TITLES[4], f"add ThroughputCallback\nto the callbacks{monitors_need}")

        # 6. memory
        ax = axes[5]
        names = [n for n in (MEMORY_RSS, MEMORY_RSS_PEAK, MEMORY_CUDA_PEAK) if n in self.series]
        labels = {
            MEMORY_RSS: "host RSS",
            MEMORY_RSS_PEAK: "host RSS, peak so far",
            MEMORY_CUDA_PEAK: "CUDA peak allocated",
        }
        styles = {
            MEMORY_RSS: {"color": "tab:blue"},
            MEMORY_RSS_PEAK: {"color": "tab:blue", "linestyle": "--", "alpha": 0.6},
            MEMORY_CUDA_PEAK: {"color": "tab:red"},
        }
        values = []
        for name in names:
            values += self._plot(ax, [name], [labels[name]], **styles[name])
        if values:
            ax.set_title(PANEL_TITLES[5], fontsize=11)
            ax.set_ylabel("memory (MiB)")
            ax.set_ylim(0, 1.25 * max(values))
            ax.legend(fontsize=8, loc="lower right")
        else:
            self._empty(ax, PANEL_TITLES[5], f"add PeakMemoryCallback\nto the callbacks{monitors_need}")

        for ax in axes:
            if ax.has_data():
                ax.set_xlabel("optimizer step")
                ax.grid(True, alpha=0.3)
                if ax.get_legend() is None and len(ax.get_lines()) > 0:
                    ax.legend(fontsize=8)
        steps = max((max(points) for points in self.series.values() if points), default=0)
        head = f"Training dynamics: {title}" if title else "Training dynamics"
        self._title = f"{head}   ({steps} optimizer steps, {self._epochs} epochs)"
        figure.suptitle(self._title, fontsize=13)
        self.panel_titles = tuple(ax.get_title() for ax in axes)
        return figure
