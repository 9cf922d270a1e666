"""Exponential moving average (EMA) of a LightningModule's weights, evaluated in place of the raw weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.ema_math import check_warmup, effective_decay
from matsciml.lightning.callbacks._utils.ema_store import (
    EMAWeights,
    Holding,
    broadcast_from_rank_zero,
    lazy_names,
    owner_modules,
    read_torch_ema_state,
)
from matsciml.lightning.callbacks._utils.names import EMA_GAIN_PREFIX, VAL_RAW_PREFIX

__all__ = ["ExponentialMovingAverageCallback"]

_FORMAT = "matsciml.ema"
_VERSION = 1
#: ``_ema_in_for`` when the module keeps the EMA weights after fit.
_FIT_END = "fit end"
_SETTINGS = ("decay", "warmup", "decay_tau", "update_every_n_steps", "start_step")


class ExponentialMovingAverageCallback(Callback):
    """Keep an exponential moving average (EMA) of the weights and evaluate with it.

    After every optimizer step the callback updates, in one fused operation,
    ``ema <- d * ema + (1 - d) * w`` for every floating-point parameter and buffer ``w`` of
    the LightningModule (batch-norm running statistics included); integer and boolean
    buffers (``num_batches_tracked``) are copied. Training always uses the raw weights.
    Validation inside ``fit``, ``trainer.validate``, ``trainer.test`` and
    ``trainer.predict`` use the EMA weights, for any LightningModule and with no code in
    it; metrics keep their usual names. When ``fit`` ends the module holds the EMA weights
    (unless ``keep_raw_weights_after_fit=True``).

    Checkpoints, whenever they are written (``ModelCheckpoint`` at the end of validation,
    on an exception, Lightning's SLURM requeue handler from inside a signal handler):

    * ``checkpoint["state_dict"]`` holds the EMA weights, so ``Task.load_from_checkpoint``
      without this callback, or ``torch.load(path)["state_dict"]``, gives the EMA model;
    * ``checkpoint["callbacks"]["ExponentialMovingAverageCallback"]`` holds the raw
      weights (``"raw"``: name -> tensor), the update count, the last step seen and the
      settings (tensors and plain data only: loads with ``weights_only=True``).

    ``trainer.fit(..., ckpt_path=...)`` continues training from the raw weights with the
    EMA restored: an interrupted and resumed run ends bitwise equal to an uninterrupted
    one. Without a checkpoint to resume, the EMA starts at ``fit`` start as a copy of the
    module's current weights (e.g. weights loaded for fine-tuning).

    Warm-up (``n`` = number of the update, 1 for the first)::

        warmup="none":        d = decay
        warmup="torch_ema":   d = min(decay, (1 + n) / (10 + n))        (torch-ema's schedule)
        warmup="exponential": d = decay * (1 - exp(-n / decay_tau))

    Hooks it acts in:

    * ``setup``: checks that the module offers ``compute_losses`` when ``evaluate_raw``;
    * ``on_fit_start``: creates the EMA copy from the module's weights, or from the
      checkpoint being resumed, or from an imported torch-ema state; with lazy modules
      not yet materialised, it waits for ``on_before_optimizer_step`` of the first step
      (the weights are still those of the start then);
    * ``on_train_start``: reads ``trainer.global_step`` (restored by then);
    * ``on_train_batch_end``: updates the EMA when ``trainer.global_step`` advanced, i.e.
      once per optimizer step, never per micro-batch under ``accumulate_grad_batches``;
    * ``on_validation_start`` / ``on_validation_end`` (and the ``test`` and ``predict``
      ones): swap the EMA weights in and back out. This window encloses the whole loop,
      the module's own ``on_validation_epoch_start`` / ``_end`` included; checkpoints are
      right whenever they are written, swapped or not (``ModelCheckpoint``, always the
      last callback, saves after the swap-out);
    * ``on_validation_batch_end`` / ``on_validation_epoch_end``: with ``evaluate_raw``,
      evaluate the raw weights too and log ``val_raw_<key>`` and ``ema_gain_<key>``;
    * ``on_train_end``: leaves the EMA weights in the module;
    * ``state_dict`` / ``load_state_dict``, ``on_save_checkpoint`` / ``on_load_checkpoint``:
      the checkpoint layout above;
    * ``on_exception``: swaps the raw weights back if an evaluation was interrupted.

    The callback knows at every moment whether the module holds the raw or the EMA
    weights; every swap checks the state it expects and raises a ``RuntimeError`` that
    says what probably went wrong.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ExponentialMovingAverageCallback
              init_args:
                decay: 0.999
                warmup: torch_ema
                evaluate_raw: true

    and in Python::

        ema = ExponentialMovingAverageCallback(decay=0.999, warmup="exponential", decay_tau=2000)
        trainer = pl.Trainer(callbacks=[ema, ModelCheckpoint(monitor="val_energy")])
        trainer.fit(task, datamodule=dm)             # task now holds the EMA weights
        trainer.fit(task, datamodule=dm, ckpt_path="last.ckpt")  # resumes the raw weights

    To start from a torch-ema state (e.g. a MACE-style training checkpoint), see
    :meth:`from_torch_ema_state`.

    Parameters
    ----------
    decay
        Target decay ``d`` in ``[0, 1]``, default ``0.99``. The EMA's memory is about
        ``1 / (1 - d)`` updates.
    warmup
        ``"none"`` (default), ``"torch_ema"`` or ``"exponential"``: see above.
    decay_tau
        Time constant of the ``"exponential"`` warm-up, in updates, default ``2000``.
    update_every_n_steps
        Update after every ``n``-th optimizer step, default ``1``.
    start_step
        Index (0-based) of the first optimizer step after which the EMA is updated,
        default ``0``. Until then the EMA follows the raw weights (it is a copy).
        The update after step ``i`` happens when ``i >= start_step`` and
        ``(i - start_step) % update_every_n_steps == 0``.
    device
        Where the EMA copy lives: ``None`` (default) = with the module's tensors (follows
        the module when Lightning moves it); ``"cpu"`` keeps it off the accelerator (each
        update then copies the weights to the host).
    evaluate_raw
        Also evaluate the raw weights on every validation batch and log
        ``val_raw_<key>`` and ``ema_gain_<key> = val_raw_<key> - val_ema_<key>``
        (positive: the EMA weights have the lower loss) for each task key and for
        ``total``. Needs the task protocol's ``compute_losses(batch)``; the values are
        means over the validation set weighted by ``batch_size``. Default ``False``.
    keep_raw_weights_after_fit
        ``False`` (default): when ``fit`` ends the module holds the EMA weights (what you
        save, test and deploy). ``True``: it keeps the raw weights, and later
        ``validate`` / ``test`` / ``predict`` calls with this callback still swap the EMA
        weights in.
    verbose
        ``True`` (or ``"INFO"``/``"DEBUG"``) reports what is tracked, restored and
        swapped; ``False`` (default, or ``"WARN"``/``"WARNING"``) reports only problems.

    Raises
    ------
    ConfigError
        An argument out of range or an unknown ``warmup`` (at construction);
        ``evaluate_raw=True`` with a module that has no ``compute_losses`` (``setup``);
        a lazy module still unmaterialised after the first forward pass; a checkpoint or
        torch-ema state whose tensors do not match the module.
    RuntimeError
        A swap finds the module in the wrong state (e.g. an evaluation hook was skipped,
        or the module's weights were replaced behind the callback's back).
    """

    def __init__(
        self,
        decay: float = 0.99,
        warmup: Literal["none", "torch_ema", "exponential"] = "none",
        decay_tau: float = 2000.0,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        device: str | torch.device | None = None,
        evaluate_raw: bool = False,
        keep_raw_weights_after_fit: bool = False,
        verbose: bool | str = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(decay) <= 1.0:
            raise ConfigError(f"decay={decay!r} must lie in [0, 1] (typical values 0.99 to 0.9999)")
        if not float(decay_tau) > 0.0:
            raise ConfigError(f"decay_tau={decay_tau!r} must be > 0 (updates)")
        check_int(update_every_n_steps, "update_every_n_steps", "ExponentialMovingAverageCallback")
        check_int(start_step, "start_step", "ExponentialMovingAverageCallback", minimum=0)
        self.decay = float(decay)
        self.warmup = check_warmup(warmup)
        self.decay_tau = float(decay_tau)
        self.update_every_n_steps = int(update_every_n_steps)
        self.start_step = int(start_step)
        try:
            self.device = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f"device={device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...): {err}"
            ) from None
        self.evaluate_raw = bool(evaluate_raw)
        self.keep_raw_weights_after_fit = bool(keep_raw_weights_after_fit)
        if isinstance(verbose, str):
            if verbose.upper() not in ("WARN", "WARNING", "INFO", "DEBUG"):
                raise ConfigError(f"verbose={verbose!r}: use True/False or 'WARN', 'INFO', 'DEBUG'")
            verbose = verbose.upper() in ("INFO", "DEBUG")
        self.verbose = bool(verbose)

        # the averaged copy, and which weights the module holds
        self.store = EMAWeights(self.device)
        self._deferred = False  # waiting for lazy modules to materialise
        self._num_updates = 0
        self._last_step: int | None = None
        # why the module holds the EMA weights: None (it holds the raw ones), _FIT_END (kept after fit),
        # or the evaluation stage that swapped them in ("validation", "test", "predict")
        self._ema_in_for: str | None = None
        # restored from a checkpoint, applied at the next stage start
        self._pending: dict[str, Any] | None = None
        self._pending_state_dict: Mapping[str, Any] | None = None
        self._torch_ema: tuple[dict[str, Any], str] | None = None
        # evaluate_raw accumulators
        self._sums: dict[str, list[Tensor]] = {}
        self._weight = 0.0

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_torch_ema_state(
        cls, state: Mapping[str, Any], submodule: str = "", **kwargs: Any
    ) -> ExponentialMovingAverageCallback:
        """A callback whose EMA starts from a ``torch_ema.ExponentialMovingAverage.state_dict()``.

        The state (keys ``decay``, ``num_updates``, ``shadow_params``,
        ``collected_params``, as MACE-style trainers save it) is applied at the next
        ``fit`` start that does not resume a checkpoint of this callback: the shadow
        parameters become the EMA of the parameters they were taken from, the other
        tensors' EMA starts from the module's weights, and the update count continues
        from ``num_updates`` (so the warm-up continues). ``collected_params`` is ignored.

        Parameters
        ----------
        state
            The torch-ema state dict.
        submodule
            Dotted name of the submodule of the LightningModule whose ``.parameters()``
            torch-ema tracked, in that order; ``""`` (default) = the LightningModule
            itself. E.g. ``"encoder"`` when a MACE model became a task's encoder.
        **kwargs
            Other arguments of the callback. ``decay`` defaults to the state's
            ``decay``; ``warmup`` to ``"torch_ema"`` when the state counts updates
            (``num_updates`` not ``None``), else ``"none"``.

        Raises
        ------
        ConfigError
            ``state`` lacks a key or its ``shadow_params`` is not a list of tensors; at
            ``fit`` start, the number or shapes of the shadow parameters do not match
            the parameters of ``submodule``.
        """
        shadow, num_updates = read_torch_ema_state(state)
        kwargs.setdefault("decay", float(state["decay"]))
        kwargs.setdefault("warmup", "torch_ema" if num_updates is not None else "none")
        callback = cls(**kwargs)
        callback._torch_ema = (
            {"shadow_params": shadow, "num_updates": int(num_updates or 0)},
            str(submodule),
        )
        return callback

    # ------------------------------------------------------------------ public read-only views
    @property
    def num_updates(self) -> int:
        """Number of EMA updates made so far (what the warm-up counts)."""
        return self._num_updates

    @property
    def holding(self) -> str:
        """``"raw"`` or ``"ema"``: which weights the module holds now."""
        return self.store.holding.value

    # ------------------------------------------------------------------ layout
    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by state-dict name (references, not copies); empty before ``fit``."""
        return self.store.ema_state_dict()

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The raw (trained) tensors by state-dict name, wherever they are now (references)."""
        return self.store.raw_state_dict()

    def evaluation_weights(self) -> dict[str, Tensor] | None:
        """The weights to evaluate with when the module holds the raw ones; ``None`` otherwise.

        What evaluation helpers outside Lightning's loops ask for
        (:func:`~matsciml.lightning.callbacks._utils.inference.call_with_eval_weights`).
        """
        if self.store.holding is not Holding.RAW:
            return None
        return self.store.ema_state_dict() or None

    def _swap_in(self, where: str) -> None:
        self.store.swap_in(where)

    def _swap_out(self, where: str) -> None:
        self.store.swap_out(where)

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(f"[EMA] {message}")

    # ------------------------------------------------------------------ the math, per bucket
    def _update_for_step(self, global_step: int) -> None:
        """The update that follows optimizer step number ``global_step`` (1 after the first step)."""
        if self.store.holding is not Holding.RAW:
            raise RuntimeError(
                f"EMA update after optimizer step {global_step}: the module holds the EMA weights (swapped in at "
                f"{self.store.since}) instead of the raw ones, so training ran on the EMA weights. An evaluation "
                f"was probably interrupted without its end hook, or another callback swapped weights."
            )
        index = global_step - 1
        if index < self.start_step:
            self.store.update(0.0)  # before start_step the EMA is a copy of the raw weights
            return
        if (index - self.start_step) % self.update_every_n_steps:
            return
        self._num_updates += 1
        self.store.update(effective_decay(self.decay, self._num_updates, self.warmup, self.decay_tau))

    # ------------------------------------------------------------------ swapping
    # ------------------------------------------------------------------ initialisation paths
    def _apply_pending(self, pl_module: pl.LightningModule, where: str) -> None:
        """Restore a checkpoint of this callback: EMA from the checkpoint's state_dict, raw weights into the module."""
        state, saved = self._pending, self._pending_state_dict
        self._pending = self._pending_state_dict = None
        self._torch_ema = None  # a resumed run continues its own EMA, not an imported one
        assert state is not None
        self.store.restore(pl_module, state["raw"], saved)
        self.store.set_holding(Holding.RAW, where)
        self._ema_in_for, self._deferred = None, False
        self._num_updates = int(state["num_updates"])
        self._last_step = int(state["last_step"]) if state.get("last_step") is not None else None
        self._info(f"restored from checkpoint at {where}: {len(self.store.names)} tensors, {self._num_updates} updates")

    def _apply_torch_ema(self, pl_module: pl.LightningModule) -> None:
        assert self._torch_ema is not None
        state, submodule = self._torch_ema
        self._torch_ema = None
        count = self.store.import_shadow(pl_module, state["shadow_params"], submodule)
        self._num_updates = int(state["num_updates"])
        self._info(f"EMA of {count} parameters imported from torch-ema ({self._num_updates} updates)")

    def _fresh_start(self, pl_module: pl.LightningModule) -> None:
        self.store.attach(pl_module, init=True)
        self.store.set_holding(Holding.RAW, "fit start")
        self._ema_in_for = None
        self._num_updates = 0
        self._last_step = None
        if self._torch_ema is not None:
            self._apply_torch_ema(pl_module)
        n_avg = sum(len(b.model) for b in self.store.buckets if b.averaged)
        numel = sum(e.numel() for e in self.store.ema)
        self._info(
            f"tracking {len(self.store.names)} tensors ({numel:,} values): {n_avg} averaged, "
            f"{len(self.store.names) - n_avg} copied; decay {self.decay}, warm-up {self.warmup!r}"
        )

    def _prepare_eval(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the EMA weights in for an evaluation stage (when there is something to swap)."""
        if self._pending is not None:
            # e.g. trainer.test(ckpt_path=...): the module holds the checkpoint's state_dict (the EMA)
            self._apply_pending(pl_module, f"{stage} start")
            if not self.keep_raw_weights_after_fit:
                self._swap_in(f"{stage} start (checkpoint)")
                self._ema_in_for = _FIT_END
        self._pending_state_dict = None
        if not self.store.ready or self._deferred:
            return
        self.store.attach(pl_module, init=False)
        if self.store.holding is Holding.EMA and self._ema_in_for == _FIT_END:
            return  # the module keeps the EMA weights since the end of fit
        broadcast_from_rank_zero(self.store.averaged_buffers())
        self._swap_in(f"{stage} start")
        self._ema_in_for = stage

    def _finish_eval(self, stage: str) -> None:
        if self._ema_in_for in (None, _FIT_END):
            return
        if self._ema_in_for != stage:
            raise RuntimeError(
                f"EMA: {stage} ended while the EMA weights were swapped in for {self._ema_in_for}; "
                f"the hooks of two evaluation loops interleaved"
            )
        self._ema_in_for = None
        self._swap_out(f"{stage} end")

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.evaluate_raw and not callable(getattr(pl_module, "compute_losses", None)):
            raise ConfigError(
                f"evaluate_raw=True needs {type(pl_module).__name__}.compute_losses(batch) (the task protocol, "
                f"matsciml.models.tasks.protocol); this module has none. Set evaluate_raw=False."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.store.holding is Holding.EMA:
            if self._ema_in_for == _FIT_END:
                self.store.set_holding(Holding.RAW, "fit start")  # the EMA weights become the start
            else:
                rank_zero_warn("EMA: the module still held the EMA weights at fit start; restoring the raw weights")
                self._swap_out("fit start")
        self._ema_in_for, self._deferred = None, False
        if self._pending is not None:
            self._apply_pending(pl_module, "fit start")
            return
        self._pending_state_dict = None
        if lazy_names(pl_module):
            self.store.ready, self._deferred = False, True
            self._info("lazy modules are not materialised yet: the EMA starts at the first optimizer step")
            return
        self._fresh_start(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # strategies that restore the checkpoint after on_fit_start
            self._apply_pending(pl_module, "train start")
        step = trainer.global_step
        if self.store.ready and self._last_step is not None and self._last_step < step:
            # the checkpoint was written after the optimizer step but before this callback's update of it
            if step - self._last_step > 1:
                rank_zero_warn(f"EMA: resuming at step {step}, the EMA was last updated at step {self._last_step}")
            self._last_step = step
            self._update_for_step(step)
        self._last_step = step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._deferred:
            return
        lazy = lazy_names(pl_module)
        if lazy:
            raise ConfigError(
                f"{type(pl_module).__name__}: {lazy[:5]} of lazy modules {owner_modules(pl_module, lazy)} are "
                f"still uninitialised after the first forward pass (unused in the loss?); the EMA cannot track "
                f"them. Give these layers their input sizes or remove them."
            )
        self._deferred = False
        self._fresh_start(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.store.ready:
            return  # accumulating gradients: no optimizer step since the last call
        self._last_step = step
        self._update_for_step(step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.store.ready or self.keep_raw_weights_after_fit:
            return
        self.store.attach(pl_module, init=False)
        broadcast_from_rank_zero(self.store.averaged_buffers())
        self._swap_in("the end of fit")
        self._ema_in_for = _FIT_END
        self._info("fit ended: the module holds the EMA weights")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.store.ready and not self._deferred:
            self.store.attach(pl_module, init=False)  # follow the module if Lightning moved it (teardown)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_eval(pl_module, "validation")
        self._sums, self._weight = {}, 0.0

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_eval("validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_eval(pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_eval("test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_eval(pl_module, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_eval("predict")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.evaluate_raw or trainer.sanity_checking or self.store.holding is not Holding.EMA:
            return
        ema_out = pl_module.compute_losses(batch)
        self._swap_out("evaluate_raw")
        try:
            raw_out = pl_module.compute_losses(batch)
        finally:
            self._swap_in("evaluate_raw")
        weight = float(ema_out.get("batch_size", 1) or 1)
        pairs = {"total": (ema_out["loss"], raw_out["loss"])}
        for key, value in ema_out.get("per_key", {}).items():
            pairs[key] = (value, raw_out["per_key"][key])
        for key, (ema_value, raw_value) in pairs.items():
            sums = self._sums.setdefault(key, [torch.zeros((), device=ema_value.device)] * 2)
            sums[0] = sums[0] + weight * ema_value.detach().float()
            sums[1] = sums[1] + weight * raw_value.detach().float()
        self._weight += weight

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.evaluate_raw or not self._sums or trainer.sanity_checking:
            return
        for key, (ema_sum, raw_sum) in self._sums.items():
            raw = raw_sum / self._weight
            pl_module.log(f"{VAL_RAW_PREFIX}{key}", raw, on_step=False, on_epoch=True, sync_dist=True)
            pl_module.log(
                f"{EMA_GAIN_PREFIX}{key}", raw - ema_sum / self._weight, on_step=False, on_epoch=True, sync_dist=True
            )
        self._sums, self._weight = {}, 0.0

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._ema_in_for not in (None, _FIT_END) and self.store.holding is Holding.EMA:
            self._ema_in_for = None
            self._swap_out("an exception")

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Raw weights (name -> tensor), update count, last step seen and settings; ``{}`` before ``fit``."""
        if self._pending is not None:
            return dict(self._pending)
        if not self.store.ready:
            return {}
        raw = self.raw_state_dict()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "settings": {name: getattr(self, name) for name in _SETTINGS},
            "num_updates": self._num_updates,
            "last_step": self._last_step,
            "raw": {name: raw[name] for name in self.store.names},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _FORMAT or "raw" not in state_dict:
            raise ConfigError(
                f"the checkpoint's ExponentialMovingAverageCallback state is not in the {_FORMAT!r} format "
                f"(keys: {sorted(state_dict)}); it was written by another EMA implementation"
            )
        if int(state_dict.get("version", 0)) > _VERSION:
            raise ConfigError(
                f"the checkpoint's EMA state has version {state_dict['version']}; this matsciml reads up to {_VERSION}"
            )
        saved = state_dict.get("settings", {})
        changed = {k: (saved[k], getattr(self, k)) for k in _SETTINGS if k in saved and saved[k] != getattr(self, k)}
        if changed:
            rank_zero_warn(f"EMA settings differ from the checkpoint's (saved, now): {changed}; using the new ones")
        self._pending = dict(state_dict)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the EMA weights are the checkpoint's state_dict; keep a reference until the state is applied
        self._pending_state_dict = checkpoint.get("state_dict")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Write the EMA weights into ``checkpoint["state_dict"]``, whatever the module holds right now."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if self._pending is not None and self._pending_state_dict is not None:
            source = self._pending_state_dict
            for key in list(state):
                if key in source:
                    state[key] = source[key]
            return
        if not self.store.ready:
            return
        for key, index in self.store.keys.items():
            if key in state:
                state[key] = self.store.ema[index].detach()
