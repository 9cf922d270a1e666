"""Apply loss-weight schedules to a task's ``task_loss_scaling`` during training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import log_scalars
from matsciml.lightning.loss_scaling import BaseScalingSchedule

__all__ = ["LossScalingScheduler"]

_log = logging.getLogger("matsciml.loss_scaling")


class LossScalingScheduler(Callback):
    """Set ``pl_module.task_loss_scaling[key]`` from schedules as training goes.

    Each schedule (:mod:`matsciml.lightning.loss_scaling`) gives the weight of one task
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
        One schedule per key (:class:`~matsciml.lightning.loss_scaling.LinearScalingSchedule`,
        :class:`~matsciml.lightning.loss_scaling.SigmoidScalingSchedule`, or any
        :class:`~matsciml.lightning.loss_scaling.BaseScalingSchedule`).
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
                  - class_path: matsciml.lightning.loss_scaling.SigmoidScalingSchedule
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
                "LossScalingScheduler needs at least one schedule (matsciml.lightning.loss_scaling."
                "LinearScalingSchedule or SigmoidScalingSchedule)"
            )
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, BaseScalingSchedule):
                raise ConfigError(
                    f"LossScalingScheduler: schedule {i} is a {type(item).__name__}, not a schedule from "
                    "matsciml.lightning.loss_scaling"
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
        every = max(1, int(trainer.log_every_n_steps or 1))
        self._apply(trainer, pl_module, "step", log=trainer.global_step % every == 0)
