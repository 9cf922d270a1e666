"""``EveryN``: run any callback's training and validation hooks only in the periods that are due.

Used by the callback builder for ``every_n_epochs`` / ``every_n_updates`` /
``every_n_samples`` on a callback class that does not take that argument itself (the
Noether spelling: any callback may be given a period).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.lightning.callbacks._base.periodic import check_period, infer_batch_size

__all__ = ["EveryN", "GATED_PREFIXES"]

#: Hooks passed on only while the current period is due; every other hook is always passed on.
GATED_PREFIXES = ("on_train_batch_", "on_train_epoch_", "on_validation_", "on_before_", "on_after_")
_ALL_HOOKS = [name for name in dir(Callback) if name.startswith("on_")] + ["setup", "teardown"]


class EveryN(Callback):
    """Wrap ``callback`` so that its per-batch and per-epoch hooks run only in due periods.

    Due periods:

    * ``every_n_epochs=n``: the training epochs whose 1-based number is a multiple of ``n``
      (with the validation that runs inside them);
    * ``every_n_updates=n``: the training batches of the optimizer step that makes
      ``trainer.global_step`` a multiple of ``n`` (and a validation right after it);
    * ``every_n_samples=n``: the training batch during which the number of samples seen
      (all ranks) crosses a multiple of ``n`` (and a validation right after it).

    Gated hooks (:data:`GATED_PREFIXES`): ``on_train_batch_*``, ``on_train_epoch_*``,
    ``on_validation_*``, ``on_before_*`` and ``on_after_*``. Every other hook (``setup``,
    fit and train start/end, checkpoints, test and predict, exceptions) is always passed on.
    The wrapped callback's state is saved under its own key; the counters of this wrapper
    under :attr:`state_key`.

    Example (YAML)::

        callbacks:
          - kind: LearningRateMonitor
            every_n_epochs: 2

    Parameters
    ----------
    callback
        The callback to gate.
    every_n_epochs, every_n_updates, every_n_samples
        The period; exactly one, an integer >= 1.
    name
        Optional label (also set on the wrapped callback when it has no ``name``).
    """

    def __init__(
        self,
        callback: Callback,
        every_n_epochs: int | None = None,
        every_n_updates: int | None = None,
        every_n_samples: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        owner = f"{type(callback).__name__} (every_n_*)"
        self.period, self.n = check_period(
            owner, every_n_epochs=every_n_epochs, every_n_updates=every_n_updates, every_n_samples=every_n_samples
        )
        self.callback = callback
        self.name = name
        self.samples_seen = 0
        self.due = False
        for hook in _ALL_HOOKS:
            if hook not in ("on_train_batch_start", "on_train_epoch_start", "on_train_batch_end"):
                setattr(self, hook, self._forward(hook))

    def _forward(self, hook: str) -> Any:
        inner = getattr(self.callback, hook)
        gated = hook.startswith(GATED_PREFIXES)

        def call(*args: Any, **kwargs: Any) -> Any:
            if gated and not self.due:
                return None
            return inner(*args, **kwargs)

        return call

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(inner=self.callback.state_key, **{self.period: self.n, "name": self.name})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "inner": self.callback.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_seen = int(state_dict.get("samples_seen", 0))
        self.callback.load_state_dict(state_dict.get("inner", {}))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.period == "every_n_epochs":
            self.due = (trainer.current_epoch + 1) % self.n == 0
        if self.due:
            self.callback.on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.period == "every_n_updates":
            self.due = (trainer.global_step + 1) % self.n == 0
        elif self.period == "every_n_samples":
            after = self.samples_seen + infer_batch_size(batch) * trainer.world_size
            self.due = after // self.n > self.samples_seen // self.n
            self.samples_seen = after
        if self.due:
            self.callback.on_train_batch_start(trainer, pl_module, batch, i)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.due:
            self.callback.on_train_batch_end(trainer, pl_module, outputs, batch, i)

    def __repr__(self) -> str:
        return f"EveryN({self.callback!r}, {self.period}={self.n})"
