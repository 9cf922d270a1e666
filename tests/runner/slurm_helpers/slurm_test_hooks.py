"""Callbacks the SLURM tests put into a training subprocess through its trainer config.

* :class:`PauseAt` stops the run at one chosen batch, writes a marker file and waits
  until :class:`~matsciml.lightning.hpc.PreemptionCheckpoint` has recorded a signal, so
  that the test sends the signal at a known point and every run takes the same steps.
* :class:`DumpWeights` writes each rank's final weights (EMA and raw) to a folder of the
  test, outside the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from matsciml.lightning.callbacks import ExponentialMovingAverageCallback
from matsciml.lightning.hpc import PreemptionCheckpoint


class PauseAt(Callback):
    """Pause at batch ``batch`` of epoch ``epoch`` until a signal is recorded.

    ``stage="train"``: between the backward pass (and SAM's second pass) and the optimizer
    step of that training batch; ``stage="val"``: at the start of that validation batch,
    while the EMA weights are swapped in. With ``rank`` set, only that rank pauses (the
    others wait for it in the next collective operation).
    """

    def __init__(
        self,
        marker: str,
        epoch: int,
        batch: int,
        stage: str = "train",
        rank: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.rank = rank
        self.marker = Path(marker)
        self.epoch, self.batch, self.stage = int(epoch), int(batch), stage
        self.timeout_s = float(timeout_s)
        self.done = False
        self._batch_idx = -1

    def _pause(self, trainer) -> None:
        if self.done or trainer.current_epoch != self.epoch:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        self.done = True
        watcher = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
        self.marker.write_text(f"{trainer.current_epoch} {trainer.global_step}\n")
        deadline = time.monotonic() + self.timeout_s
        while watcher.pending is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PauseAt: no signal within {self.timeout_s} s")
            time.sleep(0.01)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.stage == "train" and self._batch_idx == self.batch:
            self._pause(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "val" and not trainer.sanity_checking and batch_idx == self.batch:
            self._pause(trainer)


class DumpWeights(Callback):
    """At the end of ``fit``, save ``{"ema": module weights, "raw": EMA callback's raw weights}`` to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, ExponentialMovingAverageCallback))
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            "ema": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "raw": {k: v.detach().cpu().clone() for k, v in ema.raw_state_dict().items()},
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")
