"""``PeriodicCallback``: do something every n epochs, optimizer updates or training samples.

A periodic callback separates two things:

* :meth:`PeriodicCallback.track`, called after **every** training batch (cheap: accumulate a
  sum, keep a counter);
* :meth:`PeriodicCallback.periodic`, called once per period (the expensive work:
  evaluate a dataset, write a plot, log a summary of what ``track`` collected).

The period is exactly one of ``every_n_epochs``, ``every_n_updates`` (optimizer steps,
``trainer.global_step``) or ``every_n_samples`` (training samples seen on all ranks
together). The counters are saved in checkpoints, so a resumed run makes the same
periodic calls as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.isolation import IsolatedCallback
from matsciml.lightning.callbacks._utils.state_key import StateKeyFields

__all__ = ["PeriodicCallback", "IntervalType", "infer_batch_size", "check_period"]

IntervalType = Literal["epochs", "updates", "samples"]
_PERIODS = ("every_n_epochs", "every_n_updates", "every_n_samples")


def infer_batch_size(batch: Any) -> int:
    """Number of samples (structures) in ``batch``.

    In order: a mapping's ``batch_size`` entry, the length of its ``ids``, the
    ``num_graphs`` of a PyG batch (or of the mapping's ``graph``), else Lightning's
    ``extract_batch_size`` (first dimension of the first tensor found).

    Raises
    ------
    ValueError
        No batch size can be found (Lightning's message).
    """
    if isinstance(batch, Mapping):
        if batch.get("batch_size") is not None:
            return int(batch["batch_size"])
        ids = batch.get("ids")
        if isinstance(ids, list | tuple):
            return len(ids)
        graph = batch.get("graph")
        if graph is not None and hasattr(graph, "num_graphs"):
            return int(graph.num_graphs)
    if hasattr(batch, "num_graphs"):
        return int(batch.num_graphs)
    return int(extract_batch_size(batch))


def check_period(owner: str, **periods: int | None) -> tuple[str, int]:
    """Validate that exactly one of the ``every_n_*`` arguments is given; return ``(name, n)``.

    Raises
    ------
    ConfigError
        None or several are given, or the one given is not an integer >= 1.
    """
    given = {k: v for k, v in periods.items() if v is not None}
    names = ", ".join(periods)
    if len(given) != 1:
        what = "none" if not given else ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ConfigError(f"{owner}: give exactly one of {names} (got {what})")
    ((name, value),) = given.items()
    check_int(value, name, owner)
    return name, value


class PeriodicCallback(StateKeyFields, IsolatedCallback):
    """Base class of callbacks that act every n epochs, optimizer updates or training samples.

    Subclasses override :meth:`track` (every training batch) and/or :meth:`periodic`
    (once per period); both are no-ops here. A subclass that overrides one of the hooks
    below calls ``super()`` in it. Both methods run on every rank (use ``rank_zero_*``
    helpers or :func:`~matsciml.lightning.callbacks._utils.reporting.log_scalars` to report), and
    hooks are guarded by :class:`~matsciml.lightning.callbacks._base.isolation.IsolatedCallback`.

    Counting:

    * ``every_n_epochs``: after the training epoch whose number (1-based, counted by the
      callback) is a multiple of ``n``, in ``on_train_epoch_end`` (after that epoch's
      validation). ``interval`` = epochs done.
    * ``every_n_updates``: after the optimizer step that makes ``trainer.global_step`` a
      multiple of ``n`` (once per step, not per micro-batch under
      ``accumulate_grad_batches``). ``interval`` = ``trainer.global_step``.
    * ``every_n_samples``: after the training batch during which the number of samples
      seen crosses a multiple of ``n`` (once, even if a batch crosses several).
      ``interval`` = samples seen. The count is global: each batch adds its size times
      ``trainer.world_size``. This is exact with the distributed samplers Lightning and
      :class:`~matsciml.lightning.MatSciMLDataModule` use, which pad every rank to the
      same number of samples (so every rank's batch ``i`` has the same size), and it costs
      no communication. The batch size comes from :meth:`batch_size_of`.

    The counters are stored by ``state_dict`` (key :attr:`state_key`, which includes the
    period and ``name``), so several instances coexist and a resumed run continues the
    same sequence of calls. A resume from a checkpoint without this callback's state
    starts the sample count at 0 (with a warning) and takes epochs and updates from the
    trainer.

    Hooks it acts in: ``on_train_start`` (counters of a run without saved state; after a
    resume from a checkpoint written by an earlier callback in ``on_train_batch_end``,
    the periodic call of that step if it was due),
    ``on_train_batch_end`` (``track``; updates and samples), ``on_train_epoch_end``
    (epochs), ``state_dict`` / ``load_state_dict``.

    Example::

        class LogWeightNorm(PeriodicCallback):
            def periodic(self, trainer, pl_module, interval_type, interval):
                norm = sum(p.detach().pow(2).sum() for p in pl_module.parameters()) ** 0.5
                log_scalars(trainer, {"weight_norm": norm})

    and from YAML::

        callbacks:
          - kind: mypackage.callbacks.LogWeightNorm
            every_n_updates: 500

    Parameters
    ----------
    every_n_epochs, every_n_updates, every_n_samples
        The period; exactly one, an integer >= 1.
    name
        Optional label added to :attr:`state_key` (to tell apart two instances with the
        same class and period).
    on_error, error_checkpoint
        See :class:`~matsciml.lightning.callbacks._base.isolation.IsolatedCallback` (default
        ``"stop"``, ``True``).

    Raises
    ------
    ConfigError
        Not exactly one period, or a period that is not an integer >= 1 (at construction).
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
        on_error: Literal["stop", "continue"] = "stop",
        error_checkpoint: bool = True,
    ) -> None:
        super().__init__(on_error=on_error, error_checkpoint=error_checkpoint)
        period, n = check_period(
            type(self).__name__,
            every_n_epochs=every_n_epochs,
            every_n_updates=every_n_updates,
            every_n_samples=every_n_samples,
        )
        self.every_n_epochs = n if period == "every_n_epochs" else None
        self.every_n_updates = n if period == "every_n_updates" else None
        self.every_n_samples = n if period == "every_n_samples" else None
        self.name = name
        self.samples_seen = 0  # on all ranks
        self.epochs_done = 0
        self.num_periodic_calls = 0
        self._last_step: int | None = None
        self._restored = False

    # ------------------------------------------------------------------ what subclasses write
    def track(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any) -> None:
        """Called after every training batch (micro-batch) with its ``outputs``; keep it cheap."""

    def periodic(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, interval_type: IntervalType, interval: int
    ) -> None:
        """Called once per period.

        Parameters
        ----------
        interval_type
            ``"epochs"``, ``"updates"`` or ``"samples"``.
        interval
            Epochs done, ``trainer.global_step``, or samples seen (all ranks).
        """

    def batch_size_of(self, batch: Any) -> int:
        """Samples in ``batch`` on this rank (default :func:`infer_batch_size`); used by ``every_n_samples``."""
        return infer_batch_size(batch)

    # ------------------------------------------------------------------ identity and state
    @property
    def period(self) -> tuple[IntervalType, int]:
        """``("epochs" | "updates" | "samples", n)``."""
        if self.every_n_epochs is not None:
            return "epochs", self.every_n_epochs
        if self.every_n_updates is not None:
            return "updates", self.every_n_updates
        assert self.every_n_samples is not None
        return "samples", self.every_n_samples

    @override
    def state_key_fields(self) -> dict[str, Any]:
        """The period and ``name``, when given (subclasses may add fields)."""
        kind, n = self.period
        fields: dict[str, Any] = {f"every_n_{kind}": n}
        if self.name is not None:
            fields["name"] = self.name
        return fields

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_seen": self.samples_seen,
            "epochs_done": self.epochs_done,
            "last_step": self._last_step,
            "num_periodic_calls": self.num_periodic_calls,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        self.epochs_done = int(state_dict.get("epochs_done", 0))
        last = state_dict.get("last_step")
        self._last_step = None if last is None else int(last)
        self.num_periodic_calls = int(state_dict.get("num_periodic_calls", 0))
        self._restored = True

    # ------------------------------------------------------------------ hooks
    def _fire(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: IntervalType, interval: int) -> None:
        self.num_periodic_calls += 1
        self.periodic(trainer, pl_module, kind, interval)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume: handle an optimizer step the checkpoint holds but this callback had not seen.

        That happens when another callback wrote the checkpoint in ``on_train_batch_end``
        before this one ran (``ModelCheckpoint`` always runs last, so not with it).
        """
        step = int(trainer.global_step)
        if self._last_step is None or step <= self._last_step:
            return
        missed, self._last_step = step - self._last_step, step
        if self.every_n_updates is not None and step % self.every_n_updates == 0:
            self._fire(trainer, pl_module, "updates", step)
        if self.every_n_samples is not None:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was written before this callback counted the samples of "
                f"its last {missed} step(s); the sample count resumes at {self.samples_seen}"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored:
            self._restored = False
            self._catch_up(trainer, pl_module)
            return
        self.epochs_done = int(trainer.current_epoch)
        self._last_step = int(trainer.global_step)
        self.samples_seen = 0
        if self.every_n_samples is not None and trainer.global_step > 0:
            rank_zero_warn(
                f"{type(self).__name__}: training starts at step {trainer.global_step} without a saved sample "
                f"count for this callback (state key {self.state_key!r}); counting samples from 0"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.track(trainer, pl_module, batch, outputs)
        # all counters first: a checkpoint written inside ``periodic`` then holds a consistent state
        step = int(trainer.global_step)
        new_step = step != self._last_step  # False while accumulating gradients
        self._last_step = step
        if self.every_n_samples is not None:
            before = self.samples_seen
            self.samples_seen += self.batch_size_of(batch) * max(1, int(trainer.world_size))
            if self.samples_seen // self.every_n_samples > before // self.every_n_samples:
                self._fire(trainer, pl_module, "samples", self.samples_seen)
        if new_step and self.every_n_updates is not None and step > 0 and step % self.every_n_updates == 0:
            self._fire(trainer, pl_module, "updates", step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs_done += 1
        if self.every_n_epochs is not None and self.epochs_done % self.every_n_epochs == 0:
            self._fire(trainer, pl_module, "epochs", self.epochs_done)
