"""Exponential moving average (EMA) of a LightningModule's weights, evaluated in place of the raw weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.ema_math import check_warmup, copy_, effective_decay, ema_update_, is_averaged

__all__ = ["ExponentialMovingAverageCallback"]

_FORMAT = "matsciml.ema"
_VERSION = 1
_SETTINGS = ("decay", "warmup", "decay_tau", "update_every_n_steps", "start_step")


@dataclass
class _Bucket:
    """Tensors of one kind (averaged or copied), one module device and one dtype."""

    averaged: bool
    model: list[Tensor]  # the module's parameters / buffers
    ema: list[Tensor]  # the moving averages (on the EMA device)
    stash: list[Tensor]  # raw weights while the EMA weights are swapped in (on the EMA device)
    staging: list[Tensor] | None  # copy of ``model`` on the EMA device, when it differs from the module's


def _collect(module: nn.Module) -> tuple[list[str], list[Tensor], dict[str, int]]:
    """Unique tensors of ``module.state_dict()``: first name of each, the tensors, and every key -> index."""
    names: list[str] = []
    tensors: list[Tensor] = []
    keys: dict[str, int] = {}
    seen: dict[int, int] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, Tensor):
            continue
        index = seen.get(id(tensor))
        if index is None:
            index = seen[id(tensor)] = len(tensors)
            names.append(key)
            tensors.append(tensor)
        keys[key] = index
    return names, tensors, keys


def _lazy_names(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that lazy modules have not materialised yet."""
    found = [n for n, p in module.named_parameters() if nn.parameter.is_lazy(p)]
    found += [n for n, b in module.named_buffers() if nn.parameter.is_lazy(b)]
    return found


def _owner_modules(module: nn.Module, names: list[str]) -> list[str]:
    """``'encoder.head (LazyLinear)'`` for each distinct owner module of ``names``."""
    owners: list[str] = []
    for name in names:
        path = name.rpartition(".")[0]
        sub = module.get_submodule(path) if path else module
        label = f"{path or '<root>'} ({type(sub).__name__})"
        if label not in owners:
            owners.append(label)
    return owners


def _broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values when a process group with several ranks is running."""
    dist = torch.distributed
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    nccl = dist.get_backend() == "nccl"
    with torch.no_grad():
        for tensor in tensors:
            if nccl and tensor.device.type != "cuda":
                on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.broadcast(on_device, src=0)
                tensor.copy_(on_device)
            else:
                dist.broadcast(tensor, src=0)


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
        if int(update_every_n_steps) < 1 or int(update_every_n_steps) != update_every_n_steps:
            raise ConfigError(f"update_every_n_steps={update_every_n_steps!r} must be an integer >= 1")
        if int(start_step) < 0 or int(start_step) != start_step:
            raise ConfigError(f"start_step={start_step!r} must be an integer >= 0")
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

        # state of the averaged copy
        self._names: list[str] = []  # first state_dict key of each tracked tensor
        self._keys: dict[str, int] = {}  # every state_dict key (tied weights) -> index
        self._ema: list[Tensor] = []
        self._stash: list[Tensor] | None = None
        self._buckets: list[_Bucket] = []
        self._order: list[int] = []  # tracked-tensor index of each bucket entry, bucket by bucket
        self._buffer_indices: list[int] = []  # averaged tensors that are buffers (may differ across ranks)
        self._ready = False
        self._deferred = False  # waiting for lazy modules to materialise
        self._num_updates = 0
        self._last_step: int | None = None
        # what the module holds: "raw" or "ema" (then the stash holds the raw weights)
        self._holding: Literal["raw", "ema"] = "raw"
        self._holding_since = "the start"
        self._committed = False  # the EMA weights were left in the module at the end of fit
        self._eval_swapped: str | None = None  # the evaluation stage that swapped the EMA weights in
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
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state]
        if missing:
            raise ConfigError(
                f"torch-ema state lacks {missing}: expected the dict returned by "
                f"ExponentialMovingAverage.state_dict() (keys decay, num_updates, shadow_params, collected_params)"
            )
        shadow = state["shadow_params"]
        if not isinstance(shadow, list | tuple) or not all(isinstance(t, Tensor) for t in shadow):
            raise ConfigError("torch-ema state: 'shadow_params' must be a list of tensors")
        num_updates = state["num_updates"]
        kwargs.setdefault("decay", float(state["decay"]))
        kwargs.setdefault("warmup", "torch_ema" if num_updates is not None else "none")
        callback = cls(**kwargs)
        callback._torch_ema = (
            {"shadow_params": list(shadow), "num_updates": int(num_updates or 0)},
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
        return self._holding

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by state-dict name (references, not copies); empty before ``fit``."""
        return {name: self._ema[i] for name, i in self._keys.items()} if self._ready else {}

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The raw (trained) tensors by state-dict name, wherever they are now (references)."""
        if not self._ready:
            return {}
        source = self._stash if self._holding == "ema" else [t.detach() for t in self._model_tensors()]
        assert source is not None
        return {name: source[i] for name, i in self._keys.items()}

    # ------------------------------------------------------------------ layout
    def _model_tensors(self) -> list[Tensor]:
        out: list[Tensor] = [None] * len(self._names)  # type: ignore[list-item]
        position = 0
        for bucket in self._buckets:
            for tensor in bucket.model:
                out[self._order[position]] = tensor
                position += 1
        return out

    def _target_device(self, tensor: Tensor) -> torch.device:
        return self.device if self.device is not None else tensor.device

    def _attach(self, pl_module: pl.LightningModule, init: bool) -> None:
        """Read the module's tensors; with ``init`` create the EMA as their copy, else check and re-bucket it."""
        names, tensors, keys = _collect(pl_module)
        lazy = [n for n, t in zip(names, tensors) if nn.parameter.is_lazy(t)]
        if lazy:
            raise ConfigError(
                f"{type(pl_module).__name__}: tensors {lazy[:5]} of lazy modules "
                f"{_owner_modules(pl_module, lazy)} are still uninitialised; the EMA needs materialised "
                f"weights. Give these layers their input sizes, or run one forward pass on a batch before fit."
            )
        with torch.inference_mode(False), torch.no_grad():
            if init:
                self._ema = [t.detach().to(self._target_device(t), copy=True) for t in tensors]
                self._stash = None
            else:
                if names != self._names:
                    added = sorted(set(names) - set(self._names))[:5]
                    removed = sorted(set(self._names) - set(names))[:5]
                    raise RuntimeError(
                        f"{type(pl_module).__name__}'s parameters and buffers changed since the EMA was created "
                        f"(new: {added}, gone: {removed}); the EMA copy no longer matches the module. Create the "
                        f"EMA callback after building the model, or start a new fit."
                    )
                for i, tensor in enumerate(tensors):
                    target = self._target_device(tensor)
                    if self._ema[i].shape != tensor.shape:
                        raise RuntimeError(
                            f"{names[i]}: shape {tuple(tensor.shape)} in the module but {tuple(self._ema[i].shape)} "
                            f"in the EMA copy; the module was changed after the EMA was created"
                        )
                    if self._ema[i].device != target:
                        self._ema[i] = self._ema[i].to(target)
                        if self._stash is not None:
                            self._stash[i] = self._stash[i].to(target)
            self._names, self._keys = names, keys
            self._buffer_indices = [
                i for i, t in enumerate(tensors) if not isinstance(t, nn.Parameter) and is_averaged(t)
            ]
            groups: dict[tuple[bool, torch.device, torch.dtype], list[int]] = {}
            for i, tensor in enumerate(tensors):
                groups.setdefault((is_averaged(tensor), tensor.device, tensor.dtype), []).append(i)
            self._buckets, self._order = [], []
            for (averaged, device, _), indices in groups.items():
                ema = [self._ema[i] for i in indices]
                stash = [self._stash[i] for i in indices] if self._stash is not None else []
                staging = None
                if averaged and any(e.device != device for e in ema):
                    staging = [torch.empty_like(e) for e in ema]
                self._buckets.append(_Bucket(averaged, [tensors[i] for i in indices], ema, stash, staging))
                self._order.extend(indices)
        self._ready = True

    def _ensure_stash(self) -> None:
        if self._stash is not None:
            return
        with torch.inference_mode(False):
            self._stash = [torch.empty_like(e) for e in self._ema]
        position = 0
        for bucket in self._buckets:
            n = len(bucket.model)
            bucket.stash = [self._stash[i] for i in self._order[position : position + n]]
            position += n

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(f"[EMA] {message}")

    # ------------------------------------------------------------------ the math, per bucket
    def _update(self, decay: float) -> None:
        for bucket in self._buckets:
            if not bucket.averaged:
                copy_(bucket.ema, bucket.model)
            elif bucket.staging is not None:
                copy_(bucket.staging, bucket.model)
                ema_update_(bucket.ema, bucket.staging, decay)
            else:
                ema_update_(bucket.ema, bucket.model, decay)

    def _update_for_step(self, global_step: int) -> None:
        """The update that follows optimizer step number ``global_step`` (1 after the first step)."""
        if self._holding != "raw":
            raise RuntimeError(
                f"EMA update after optimizer step {global_step}: the module holds the EMA weights (swapped in at "
                f"{self._holding_since}) instead of the raw ones, so training ran on the EMA weights. An evaluation "
                f"was probably interrupted without its end hook, or another callback swapped weights."
            )
        index = global_step - 1
        if index < self.start_step:
            self._update(0.0)  # before start_step the EMA is a copy of the raw weights
            return
        if (index - self.start_step) % self.update_every_n_steps:
            return
        self._num_updates += 1
        self._update(effective_decay(self.decay, self._num_updates, self.warmup, self.decay_tau))

    # ------------------------------------------------------------------ swapping
    def _swap_in(self, where: str) -> None:
        if self._holding != "raw":
            raise RuntimeError(
                f"EMA swap-in at {where}: the module already holds the EMA weights (swapped in at "
                f"{self._holding_since}); the matching swap-out never ran. Was an evaluation interrupted, or a "
                f"validation/test/predict end hook skipped?"
            )
        self._ensure_stash()
        with torch.no_grad():
            for bucket in self._buckets:
                copy_(bucket.stash, bucket.model)
            # from here on a checkpoint takes the raw weights from the stash, whatever the module holds
            self._holding, self._holding_since = "ema", where
            for bucket in self._buckets:
                copy_(bucket.model, bucket.ema)

    def _swap_out(self, where: str) -> None:
        if self._holding != "ema":
            raise RuntimeError(
                f"EMA swap-out at {where}: the module holds the raw weights already (since {self._holding_since}); "
                f"a swap-in was skipped or a swap-out ran twice."
            )
        with torch.no_grad():
            for bucket in self._buckets:
                copy_(bucket.model, bucket.stash)
        self._holding, self._holding_since = "raw", where

    # ------------------------------------------------------------------ initialisation paths
    def _apply_pending(self, pl_module: pl.LightningModule, where: str) -> None:
        """Restore a checkpoint of this callback: EMA from the checkpoint's state_dict, raw weights into the module."""
        state, saved = self._pending, self._pending_state_dict
        self._pending = self._pending_state_dict = None
        self._torch_ema = None  # a resumed run continues its own EMA, not an imported one
        assert state is not None
        raw = state["raw"]
        names, _, _ = _collect(pl_module)
        missing = [n for n in names if n not in raw or saved is None or n not in saved]
        if missing:
            raise ConfigError(
                f"the checkpoint's EMA state does not match {type(pl_module).__name__}: no saved raw/EMA tensors "
                f"for {missing[:5]}. To start a new EMA run from the checkpoint's weights, load them into the "
                f"module (Task.load_from_checkpoint) and call fit without ckpt_path."
            )
        self._attach(pl_module, init=True)
        assert saved is not None
        tensors = self._model_tensors()
        with torch.inference_mode(False), torch.no_grad():
            for i, name in enumerate(self._names):
                if tuple(raw[name].shape) != tuple(tensors[i].shape):
                    raise ConfigError(
                        f"checkpoint tensor {name!r} has shape {tuple(raw[name].shape)} but the module's has "
                        f"{tuple(tensors[i].shape)}"
                    )
                self._ema[i].copy_(saved[name])
                tensors[i].copy_(raw[name])
        self._holding, self._holding_since = "raw", where
        self._committed = self._deferred = False
        self._num_updates = int(state["num_updates"])
        self._last_step = int(state["last_step"]) if state.get("last_step") is not None else None
        self._info(f"restored from checkpoint at {where}: {len(self._names)} tensors, {self._num_updates} updates")

    def _apply_torch_ema(self, pl_module: pl.LightningModule) -> None:
        assert self._torch_ema is not None
        state, submodule = self._torch_ema
        self._torch_ema = None
        try:
            owner = pl_module.get_submodule(submodule) if submodule else pl_module
        except AttributeError as err:
            raise ConfigError(f"from_torch_ema_state(submodule={submodule!r}): {err}") from None
        prefix = f"{submodule}." if submodule else ""
        names = [prefix + n for n, _ in owner.named_parameters()]
        shadow = state["shadow_params"]
        if len(shadow) != len(names):
            raise ConfigError(
                f"torch-ema state has {len(shadow)} shadow parameters but "
                f"{submodule or type(pl_module).__name__} has {len(names)} parameters; pass "
                f"submodule=<the part of the task torch-ema tracked> (e.g. 'encoder')"
            )
        with torch.no_grad():
            for name, tensor in zip(names, shadow):
                ema = self._ema[self._keys[name]]
                if ema.shape != tensor.shape:
                    raise ConfigError(
                        f"torch-ema shadow parameter for {name!r} has shape {tuple(tensor.shape)}, the module's "
                        f"has {tuple(ema.shape)}: the parameter order differs, or submodule= is wrong"
                    )
                ema.copy_(tensor)
        self._num_updates = int(state["num_updates"])
        self._info(f"EMA of {len(names)} parameters imported from torch-ema ({self._num_updates} updates)")

    def _fresh_start(self, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module, init=True)
        self._holding, self._holding_since = "raw", "fit start"
        self._committed = False
        self._num_updates = 0
        self._last_step = None
        if self._torch_ema is not None:
            self._apply_torch_ema(pl_module)
        n_avg = sum(len(b.model) for b in self._buckets if b.averaged)
        numel = sum(e.numel() for e in self._ema)
        self._info(
            f"tracking {len(self._names)} tensors ({numel:,} values): {n_avg} averaged, "
            f"{len(self._names) - n_avg} copied; decay {self.decay}, warm-up {self.warmup!r}"
        )

    def _prepare_eval(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the EMA weights in for an evaluation stage (when there is something to swap)."""
        if self._pending is not None:
            # e.g. trainer.test(ckpt_path=...): the module holds the checkpoint's state_dict (the EMA)
            self._apply_pending(pl_module, f"{stage} start")
            if not self.keep_raw_weights_after_fit:
                self._swap_in(f"{stage} start (checkpoint)")
                self._committed = True
        self._pending_state_dict = None
        if not self._ready or self._deferred:
            return
        self._attach(pl_module, init=False)
        if self._holding == "ema" and self._committed:
            return  # the module keeps the EMA weights since the end of fit
        _broadcast_from_rank_zero([self._ema[i] for i in self._buffer_indices])
        self._swap_in(f"{stage} start")
        self._eval_swapped = stage

    def _finish_eval(self, stage: str) -> None:
        if self._eval_swapped is None:
            return
        if self._eval_swapped != stage:
            raise RuntimeError(
                f"EMA: {stage} ended while the EMA weights were swapped in for {self._eval_swapped}; "
                f"the hooks of two evaluation loops interleaved"
            )
        self._eval_swapped = None
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
        if self._holding == "ema":
            if self._committed:
                self._holding, self._holding_since = "raw", "fit start"  # the EMA weights become the start
            else:
                rank_zero_warn("EMA: the module still held the EMA weights at fit start; restoring the raw weights")
                self._swap_out("fit start")
        self._committed = False
        self._eval_swapped = None
        self._deferred = False
        if self._pending is not None:
            self._apply_pending(pl_module, "fit start")
            return
        self._pending_state_dict = None
        if _lazy_names(pl_module):
            self._ready, self._deferred = False, True
            self._info("lazy modules are not materialised yet: the EMA starts at the first optimizer step")
            return
        self._fresh_start(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # strategies that restore the checkpoint after on_fit_start
            self._apply_pending(pl_module, "train start")
        step = trainer.global_step
        if self._ready and self._last_step is not None and self._last_step < step:
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
        lazy = _lazy_names(pl_module)
        if lazy:
            raise ConfigError(
                f"{type(pl_module).__name__}: {lazy[:5]} of lazy modules {_owner_modules(pl_module, lazy)} are "
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
        if step == self._last_step or not self._ready:
            return  # accumulating gradients: no optimizer step since the last call
        self._last_step = step
        self._update_for_step(step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ready or self.keep_raw_weights_after_fit:
            return
        self._attach(pl_module, init=False)
        _broadcast_from_rank_zero([self._ema[i] for i in self._buffer_indices])
        self._swap_in("the end of fit")
        self._committed = True
        self._info("fit ended: the module holds the EMA weights")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ready and not self._deferred:
            self._attach(pl_module, init=False)  # follow the module if Lightning moved it (teardown)

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
        if not self.evaluate_raw or trainer.sanity_checking or self._holding != "ema":
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
            pl_module.log(f"val_raw_{key}", raw, on_step=False, on_epoch=True, sync_dist=True)
            pl_module.log(f"ema_gain_{key}", raw - ema_sum / self._weight, on_step=False, on_epoch=True, sync_dist=True)
        self._sums, self._weight = {}, 0.0

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._eval_swapped is not None and self._holding == "ema":
            self._eval_swapped = None
            self._swap_out("an exception")

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTINGS}

    @override
    def state_dict(self) -> dict[str, Any]:
        """Raw weights (name -> tensor), update count, last step seen and settings; ``{}`` before ``fit``."""
        if self._pending is not None:
            return dict(self._pending)
        if not self._ready:
            return {}
        raw = self.raw_state_dict()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "settings": self._settings(),
            "num_updates": self._num_updates,
            "last_step": self._last_step,
            "raw": {name: raw[name] for name in self._names},
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
        if not self._ready:
            return
        for key, index in self._keys.items():
            if key in state:
                state[key] = self._ema[index].detach()
