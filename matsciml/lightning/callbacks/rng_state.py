"""Random number generator states in checkpoints, so that a resumed run draws the same numbers.

``seed: N`` in an experiment config seeds every generator once at the start
(``lightning.pytorch.seed_everything``): model initialisation, dropout masks and the
loaders (whose order depends on ``(seed, epoch)`` only) are then the same on every run.
A run resumed from a checkpoint, however, starts from a fresh seed; without the
generator states its dropout masks after the resume differ from those of an
uninterrupted run. :class:`RNGStateCallback` stores the states of Python's ``random``,
NumPy's global generator, torch's CPU generator and (when used) the CUDA generators in
every checkpoint and puts them back at the first training step after a resume.

Example::

    callbacks:
      - class_path: matsciml.lightning.callbacks.rng_state.RNGStateCallback

The experiment runner adds one to every trainer it builds.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

__all__ = ["RNGStateCallback", "capture_rng_state", "restore_rng_state"]

_FORMAT = "matsciml.rng"
_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """The states of the global generators as plain data and tensors (loads with ``weights_only=True``).

    Returns
    -------
    dict
        ``{"python": ..., "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor, ...]}``;
        ``cuda`` is empty when CUDA has not been initialised.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def _as_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` wants tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def restore_rng_state(state: dict[str, Any]) -> list[str]:
    """Put back the states of :func:`capture_rng_state`; return the generators that could not be restored.

    CUDA states are restored when CUDA is in use and the number of devices matches.
    """
    skipped: list[str] = []
    if state.get("python") is not None:
        random.setstate(_as_tuple(state["python"]))
    numpy_state = state.get("numpy")
    if numpy_state:
        keys = numpy_state["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                numpy_state["kind"],
                keys.astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            skipped.append("cuda")
    return skipped


class RNGStateCallback(Callback):
    """Save the random generator states in checkpoints; restore them at the first step after a resume.

    Hooks it acts in:

    * ``state_dict`` (called whenever a checkpoint is written): captures the states at
      that moment. Checkpoints are written between steps (``ModelCheckpoint`` after
      validation, :class:`~matsciml.lightning.callbacks.preemption.PreemptionCheckpoint` at a step start),
      where nothing draws random numbers until the next training step, so the state
      saved is the one the next step of an uninterrupted run starts from;
    * ``load_state_dict``: keeps the states;
    * ``on_train_batch_start``: restores them once, at the first training step after the
      resume, after everything Lightning does at start-up (sanity check, loader set-up).

    Under several processes each rank draws from its own generators, and a checkpoint
    holds rank 0's states, which every rank restores. Seeded runs whose ranks draw the
    same numbers (same model, batches of equal shape: the usual case with ``seed``)
    resume exactly; otherwise the resumed random streams are valid but not those of an
    uninterrupted run.

    Example::

        trainer = Trainer(callbacks=[RNGStateCallback(), ModelCheckpoint(save_last=True)])

    A checkpoint state in another format is ignored with a warning (nothing is raised).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # restored states not applied yet are still the run's true states
        state = self._pending if self._pending is not None else capture_rng_state()
        return {"format": _FORMAT, "version": _VERSION, "state": state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _FORMAT or "state" not in state_dict:
            rank_zero_warn(
                f"RNGStateCallback: the checkpoint's state is not in the {_FORMAT!r} format; the random generators "
                "are not restored"
            )
            return
        self._pending = state_dict["state"]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        skipped = restore_rng_state(state)
        if skipped:
            rank_zero_warn(
                f"RNGStateCallback: could not restore the {', '.join(skipped)} generator states (other devices)"
            )
