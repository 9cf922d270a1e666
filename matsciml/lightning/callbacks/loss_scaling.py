"""Loss-weight schedules, and the callback that applies them to a task's ``task_loss_scaling``.

A schedule maps a position in training to the weight of one task key's loss in the
total, ``task.task_loss_scaling[key]`` (curriculum-style loss scaling); the callback
:class:`LossScalingScheduler` applies it. The schedules are plain arithmetic (no
Lightning); :mod:`matsciml.lightning.loss_scaling` is their import path of earlier versions.

**Positions and the fraction of training.** With ``step_frequency="step"`` the
position ``i`` is the optimizer step about to be taken (``trainer.global_step``: 0 for
the first) and the schedule has ``N`` points, the number of optimizer steps of the run (``trainer.estimated_stepping_batches``); with
``"epoch"``, ``i`` is the epoch (``trainer.current_epoch``) and ``N`` the number of
epochs (``max_epochs``, or fewer when ``max_steps`` ends the run earlier). ``total``
overrides ``N``. The fraction of training is ::

    t(i) = min(i, N - 1) / (N - 1)        (t = 0 when N = 1)

so the first step or epoch uses ``initial_value`` and the last one ``end_value``; past
``N`` the value stays at ``t = 1``.

**Curves.** :class:`LinearScalingSchedule`::

    w(t) = initial + (end - initial) * t

:class:`SigmoidScalingSchedule` (``c`` = ``curvature`` in (0, 1), ``m`` = ``center_frac``)::

    w(t) = (end * c**m + initial * c**t) / (c**m + c**t)
         = initial + (end - initial) * sigmoid(ln(1/c) * (t - m))

a logistic ramp from ``initial`` to ``end`` centred at ``t = m`` whose steepness is
``ln(1/c)``: smaller ``c`` gives a sharper switch (``c = 5e-7``, the default, gives a
steepness of 14.5: the weight goes from 12 % to 88 % of the way within 28 % of training).

Both formulas are those of the upstream toolkit. Differences: positions are read from
the trainer at every step (a resumed run continues the schedule where it was; upstream
advanced an iterator after each step, one position late, and restarted it on resume), an ``end_value`` of ``0`` means zero (upstream
treated it as "not given"), and a ``curvature`` outside (0, 1) is refused instead of
producing a reversed or constant curve.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import log_scalars
from matsciml.lightning.callbacks._utils.steps import log_every_n_steps

__all__ = [
    "LossScalingScheduler",
    "BaseScalingSchedule",
    "LinearScalingSchedule",
    "SigmoidScalingSchedule",
    "schedule_length",
]

_FREQUENCIES = ("step", "epoch")


def schedule_length(trainer: Any, step_frequency: str) -> int:
    """Number of points ``N`` of a schedule over the run of ``trainer`` (see the module docstring).

    Raises
    ------
    ConfigError
        The run has no finite length (``max_epochs=-1`` and ``max_steps=-1``, or an
        iterable training set without ``max_steps``).
    """
    steps = float(trainer.estimated_stepping_batches)
    if step_frequency == "step":
        if not math.isfinite(steps):
            raise ConfigError(
                "loss scaling schedule with step_frequency='step': the run has no finite number of optimizer steps; "
                "set the trainer's max_steps (or max_epochs with a sized training set), or give the schedule total=..."
            )
        return max(1, int(steps))
    batches = float(trainer.num_training_batches)
    if math.isfinite(steps) and math.isfinite(batches) and batches > 0:
        per_epoch = math.ceil(batches / max(1, int(trainer.accumulate_grad_batches)))
        return max(1, math.ceil(steps / per_epoch))
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > 0:
        return int(max_epochs)
    raise ConfigError(
        "loss scaling schedule with step_frequency='epoch': the run has no finite number of epochs; "
        "set the trainer's max_epochs, or give the schedule total=..."
    )


class BaseScalingSchedule(ABC):
    """A loss weight as a function of the fraction of training ``t`` in ``[0, 1]``.

    Subclasses implement :meth:`curve`. The schedule is stateless apart from its length:
    :meth:`value_at` gives the weight at any position, so resuming needs no saved state.

    Parameters
    ----------
    key
        Task key whose weight the schedule sets (``task.task_loss_scaling[key]``).
    initial_value
        Weight at the first step / epoch.
    end_value
        Weight at the last step / epoch.
    step_frequency
        ``"step"`` (per optimizer step) or ``"epoch"``.
    total
        Number of points ``N``; default ``None``: from the trainer at the start of
        training (:func:`schedule_length`).

    Raises
    ------
    ConfigError
        A bad ``step_frequency``, a non-finite value, or ``total`` < 1.
    """

    def __init__(
        self,
        key: str,
        initial_value: float,
        end_value: float,
        step_frequency: Literal["step", "epoch"] = "epoch",
        total: int | None = None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{name}: key={key!r} must name a task key (e.g. 'energy')")
        if step_frequency not in _FREQUENCIES:
            raise ConfigError(f"{name}({key!r}): step_frequency={step_frequency!r} must be 'step' or 'epoch'")
        for arg, value in (("initial_value", initial_value), ("end_value", end_value)):
            try:
                ok = math.isfinite(float(value))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{name}({key!r}): {arg}={value!r} must be a finite number")
        check_int(total, "total", f"{name}({key!r})", optional=True)
        self.key = key
        self.initial_value = float(initial_value)
        self.end_value = float(end_value)
        self.step_frequency = step_frequency
        self.total = total
        self.num_points: int | None = total
        self._index = 0

    @abstractmethod
    def curve(self, t: float | np.ndarray) -> float | np.ndarray:
        """The weight at fraction of training ``t`` (``t`` in ``[0, 1]``)."""

    def setup(self, trainer: Any, pl_module: Any = None) -> None:
        """Fix the number of points from the trainer's run length (unless ``total`` was given)."""
        self.num_points = self.total if self.total is not None else schedule_length(trainer, self.step_frequency)

    def _length(self) -> int:
        if self.num_points is None:
            raise RuntimeError(
                f"{type(self).__name__}({self.key!r}) has no length yet: call setup(trainer) or give total=..."
            )
        return self.num_points

    def fraction(self, index: int) -> float:
        """Fraction of training ``t`` at position ``index`` (clamped to ``[0, 1]``)."""
        n = self._length()
        if n <= 1:
            return 0.0
        return min(max(int(index), 0), n - 1) / (n - 1)

    def value_at(self, index: int) -> float:
        """The weight at step / epoch ``index`` (0-based)."""
        return float(self.curve(self.fraction(index)))

    @property
    def grid(self) -> np.ndarray:
        """Fractions of training of all ``N`` points, ``np.linspace(0, 1, N)``."""
        return np.linspace(0.0, 1.0, self._length())

    def values(self) -> np.ndarray:
        """The weights at all ``N`` points."""
        return np.asarray(self.curve(self.grid), dtype=float)

    def __len__(self) -> int:
        return self._length()

    def step(self) -> float:
        """The next value of the schedule (an iterator over :meth:`values`; stays at the last one)."""
        value = self.value_at(self._index)
        self._index += 1
        return value

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(key={self.key!r}, initial_value={self.initial_value}, "
            f"end_value={self.end_value}, step_frequency={self.step_frequency!r})"
        )


class LinearScalingSchedule(BaseScalingSchedule):
    """Linear ramp of a key's loss weight: ``w(t) = initial + (end - initial) * t``.

    See the module docstring for ``t``.

    Parameters
    ----------
    key
        Task key (``task.task_loss_scaling[key]``).
    initial_value
        Weight at the first step / epoch.
    end_value
        Weight at the last step / epoch; default ``None``: ``initial_value`` (constant).
    step_frequency
        ``"step"`` or ``"epoch"`` (default, as upstream).
    total
        Number of points; default ``None``: the run's steps / epochs.

    Raises
    ------
    ConfigError
        See :class:`BaseScalingSchedule`.

    Example::

        - class_path: matsciml.lightning.callbacks.loss_scaling.LinearScalingSchedule
          init_args: {key: forces, initial_value: 1.0, end_value: 10.0, step_frequency: epoch}
    """

    def __init__(
        self,
        key: str,
        initial_value: float,
        end_value: float | None = None,
        step_frequency: Literal["step", "epoch"] = "epoch",
        total: int | None = None,
    ) -> None:
        super().__init__(key, initial_value, initial_value if end_value is None else end_value, step_frequency, total)

    def curve(self, t: float | np.ndarray) -> float | np.ndarray:
        """``initial + (end - initial) * t``."""
        return self.initial_value + (self.end_value - self.initial_value) * np.asarray(t, dtype=float)


class SigmoidScalingSchedule(BaseScalingSchedule):
    """Logistic ramp of a key's loss weight from ``initial_value`` to ``end_value``.

    ``w(t) = (end * c**m + initial * c**t) / (c**m + c**t)`` with ``c = curvature`` and
    ``m = center_frac``; see the module docstring.

    Parameters
    ----------
    key
        Task key (``task.task_loss_scaling[key]``).
    initial_value
        Weight at the start (the left asymptote).
    end_value
        Weight at the end (the right asymptote).
    center_frac
        Fraction of training at the middle of the ramp, in ``(0, 1)``.
    curvature
        ``c`` in ``(0, 1)``, default ``5e-7``: smaller is a sharper switch (steepness
        ``ln(1/c)`` per unit of ``t``). Values far from ``1e-9 .. 1e-2`` are allowed but
        rarely wanted; near 1 the curve does not reach the asymptotes within training.
    step_frequency
        ``"step"`` (default, as upstream) or ``"epoch"``.
    total
        Number of points; default ``None``: the run's steps / epochs.

    Raises
    ------
    ConfigError
        ``center_frac`` or ``curvature`` outside ``(0, 1)``, or see
        :class:`BaseScalingSchedule`.

    Example::

        - class_path: matsciml.lightning.callbacks.loss_scaling.SigmoidScalingSchedule
          init_args: {key: energy, initial_value: 1.0, end_value: 0.1, center_frac: 0.5, curvature: 1.0e-5}
    """

    def __init__(
        self,
        key: str,
        initial_value: float,
        end_value: float,
        center_frac: float,
        curvature: float = 5e-7,
        step_frequency: Literal["step", "epoch"] = "step",
        total: int | None = None,
    ) -> None:
        super().__init__(key, initial_value, end_value, step_frequency, total)
        if not 0.0 < float(center_frac) < 1.0:
            raise ConfigError(f"SigmoidScalingSchedule({key!r}): center_frac={center_frac!r} must lie in (0, 1)")
        if not 0.0 < float(curvature) < 1.0:
            raise ConfigError(
                f"SigmoidScalingSchedule({key!r}): curvature={curvature!r} must lie in (0, 1) (typically 1e-9 to "
                "1e-2; smaller is a sharper switch)"
            )
        self.center_frac = float(center_frac)
        self.curvature = float(curvature)

    def curve(self, t: float | np.ndarray) -> float | np.ndarray:
        """``initial + (end - initial) * sigmoid(ln(1/c) * (t - m))`` (overflow-free form)."""
        z = -math.log(self.curvature) * (np.asarray(t, dtype=float) - self.center_frac)
        # sigmoid(z) written so that neither branch overflows
        s = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
        return self.initial_value + (self.end_value - self.initial_value) * s


_log = logging.getLogger("matsciml.loss_scaling")


class LossScalingScheduler(Callback):
    """Set ``pl_module.task_loss_scaling[key]`` from schedules as training goes.

    Each schedule (above) gives the weight of one task
    key's loss as a function of the optimizer step (``step_frequency="step"``) or the
    epoch (``"epoch"``). The task reads ``task_loss_scaling`` at every step (the task
    protocol, :mod:`matsciml.models.tasks.protocol`), so the total loss of step ``i`` is
    ``sum_k w_k(i) * loss_k``.

    Hooks it acts in:

    * ``on_train_start``: checks each key against ``pl_module.task_keys`` and fixes the
      schedules' lengths from the trainer (steps: ``trainer.estimated_stepping_batches``;
      epochs: ``max_epochs`` or what ``max_steps`` allows), then sets every weight for
      the current position (step 0 / epoch 0, or where a resumed run is);
    * ``on_train_epoch_start``: sets the ``"epoch"`` weights for ``trainer.current_epoch``;
    * ``on_train_batch_start``: sets the ``"step"`` weights for ``trainer.global_step``
      (the step about to be taken; every micro-batch of an accumulation window gets the
      same weight).

    The weights are functions of the trainer's counters only, so a resumed run continues
    the schedule exactly; nothing is stored in checkpoints. Each weight is logged as
    ``loss_scaling/<key>`` to every logger when it is set for an epoch, and for steps
    every ``trainer.log_every_n_steps`` steps.

    Parameters
    ----------
    *schedules
        One schedule per key (:class:`~matsciml.lightning.callbacks.loss_scaling.LinearScalingSchedule`,
        :class:`~matsciml.lightning.callbacks.loss_scaling.SigmoidScalingSchedule`, or any
        :class:`~matsciml.lightning.callbacks.loss_scaling.BaseScalingSchedule`).
    scaling_schedules
        The same as a list, for YAML configs (which cannot pass positional
        arguments); items may be ``class_path`` / ``init_args`` specs. Default ``None``.
    log_level
        Level of the ``matsciml.loss_scaling`` logger (``"INFO"`` default, ``"DEBUG"``
        reports every change), as upstream.

    Raises
    ------
    ConfigError
        No schedule, an item that is not a schedule, two schedules for the same key
        (at construction); a module without a ``task_loss_scaling`` dict, a key that is
        not one of ``pl_module.task_keys``, or a run of unknown length (at
        ``on_train_start``).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.LossScalingScheduler
              init_args:
                scaling_schedules:
                  - class_path: matsciml.lightning.callbacks.loss_scaling.SigmoidScalingSchedule
                    init_args: {key: forces, initial_value: 1.0, end_value: 10.0, center_frac: 0.5}

    and in Python (the upstream form)::

        scheduler = LossScalingScheduler(
            LinearScalingSchedule("energy", 1.0, 0.1, step_frequency="epoch"),
            SigmoidScalingSchedule("forces", 1.0, 10.0, center_frac=0.5),
        )
    """

    def __init__(
        self,
        *schedules: BaseScalingSchedule,
        scaling_schedules: Sequence[BaseScalingSchedule | dict] | None = None,
        log_level: str = "INFO",
    ) -> None:
        super().__init__()
        items = list(schedules) + [instantiate(s, "scaling_schedules") for s in (scaling_schedules or [])]
        if not items:
            raise ConfigError(
                "LossScalingScheduler needs at least one schedule (LinearScalingSchedule or SigmoidScalingSchedule "
                "of matsciml.lightning.callbacks.loss_scaling)"
            )
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, BaseScalingSchedule):
                raise ConfigError(
                    f"LossScalingScheduler: schedule {i} is a {type(item).__name__}, not a schedule from "
                    "matsciml.lightning.callbacks.loss_scaling"
                )
            if item.key in seen:
                raise ConfigError(f"LossScalingScheduler: two schedules for key {item.key!r}; keep one")
            seen.add(item.key)
        self.schedules = items
        try:
            _log.setLevel(log_level.upper())
        except (AttributeError, ValueError) as err:
            raise ConfigError(f"LossScalingScheduler: log_level={log_level!r}: use 'DEBUG', 'INFO', 'WARNING'") from err

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, frequency: str | None, log: bool) -> None:
        values: dict[str, float] = {}
        for schedule in self.schedules:
            if frequency is not None and schedule.step_frequency != frequency:
                continue
            index = trainer.global_step if schedule.step_frequency == "step" else trainer.current_epoch
            value = schedule.value_at(index)
            if pl_module.task_loss_scaling.get(schedule.key) != value:
                _log.debug("loss scaling of %r: %s at %s %d", schedule.key, value, schedule.step_frequency, index)
            pl_module.task_loss_scaling[schedule.key] = value
            values[f"loss_scaling/{schedule.key}"] = value
        if log and values:
            log_scalars(trainer, values)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaling = getattr(pl_module, "task_loss_scaling", None)
        name = type(pl_module).__name__
        if not isinstance(scaling, dict):
            raise ConfigError(
                f"LossScalingScheduler: {name} has no task_loss_scaling dict (the task protocol, "
                "matsciml.models.tasks.protocol); remove the callback or use a matsciml task"
            )
        keys = getattr(pl_module, "task_keys", None)
        for schedule in self.schedules:
            if keys is not None and schedule.key not in keys:
                raise ConfigError(
                    f"LossScalingScheduler: schedule key {schedule.key!r} is not a task key of {name} {list(keys)}"
                )
            schedule.setup(trainer, pl_module)
            _log.info(f"{schedule!r}: {len(schedule)} {schedule.step_frequency}s")
        self._apply(trainer, pl_module, None, log=True)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module, "epoch", log=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        every = log_every_n_steps(trainer)
        self._apply(trainer, pl_module, "step", log=trainer.global_step % every == 0)
