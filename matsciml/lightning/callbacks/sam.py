"""Sharpness-aware minimisation (SAM, and its adaptive variant ASAM) as a Lightning callback."""

from __future__ import annotations

import contextlib
import logging as pylogging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.lightning._compat import forward_redirection, mark_scaler_step_skipped, silenced_logging
from matsciml.lightning.callbacks._utils.grads import grad_scaler, optimizer_parameters, skip_optimizer_step
from matsciml.lightning.callbacks._utils.sam_math import (
    DEFAULT_EPS,
    WeightBackup,
    all_finite,
    global_norm,
    perturb_,
)
from matsciml.models.tasks.protocol import loss_of

__all__ = ["SAM"]

_LOG = pylogging.getLogger(__name__)

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _loss_of(output: Any, where: str) -> Tensor | None:
    """The loss tensor of a ``training_step`` / ``compute_losses`` output (Tensor, mapping with "loss", None)."""
    loss = loss_of(output)
    if loss is None and output is not None:
        raise ConfigError(
            f"SAM: {where} returned {type(output).__name__}; it must return a loss tensor or a mapping with a 'loss' key"
        )
    return loss


class SAM(Callback):
    r"""Sharpness-aware minimisation: step with the gradient taken at the worst nearby weights.

    At each (selected) optimizer step the callback takes the gradient ``g`` that Lightning has just
    computed at the weights ``w``, moves the weights to ``w + e`` with

    .. math::

        n = \lVert (|w| \text{ if adaptive else } 1) \odot g \rVert_2, \qquad
        e = \rho \, (w^2 \text{ if adaptive else } 1) \odot g / (n + 10^{-12}),

    recomputes the loss of the same batch (every micro-batch of the accumulation window) at
    ``w + e``, back-propagates it, copies ``w`` back exactly, and lets the optimizer step with that
    second gradient (Foret et al. 2021, arXiv:2010.01412; ASAM: Kwon et al. 2021, arXiv:2102.11600).
    Gradient clipping configured on the Trainer applies to the second gradient; learning-rate
    schedulers see one step. A step costs about two forward-backward passes.

    Hooks it acts in:

    - ``on_fit_start``: checks the configuration (see Raises) and resolves a fractional
      ``skip_epoch_count``.
    - ``on_train_epoch_start`` / ``on_train_batch_start``: keeps the micro-batches of the current
      accumulation window.
    - ``on_before_optimizer_step``: the perturbation, the second pass, the restore and the
      non-finite check. Put this callback first in the list, before callbacks that inspect or
      modify the final gradients in the same hook.
    - ``state_dict`` / ``load_state_dict``: the counters ``sam_steps`` and ``skipped_steps``.

    The second pass uses the task protocol: ``compute_losses(batch)["loss"]`` when the module has
    ``compute_losses``; otherwise its ``training_step(batch, batch_idx)`` (loss tensor or
    ``{"loss": ...}``), with ``self.log`` silenced during that call. Under DDP it runs through the
    DDP wrapper, so its gradients are averaged over the processes like the first pass's; the
    perturbation is computed from the averaged gradient (one global ``e``, see ``docs/sam.rst``).
    Buffers (batch-norm running statistics) are restored after the second pass, so they are
    updated once per batch as without SAM. Under ``16-mixed`` the second loss is scaled by the
    GradScaler and its gradients are unscaled by hand; a non-finite value in either pass skips the
    optimizer step (weights unchanged), is counted and logged.

    Logged each SAM step (``on_step``): ``sam_grad_norm`` (``n`` above, the first gradient's norm,
    weighted by ``|w|`` when adaptive), ``sam_perturbation_norm`` (``||e||_2``) and
    ``sam_skipped_steps`` (running count of steps skipped for non-finite values).

    Parameters
    ----------
    rho
        Radius of the neighbourhood (> 0), default 0.05. For ``adaptive=True`` use about ten times
        more (e.g. 0.5), since the perturbation is then relative to the weights.
    adaptive
        ASAM, default False: scale-invariant neighbourhood (``|w|`` weighting).
    skip_step_count
        Plain optimizer steps before SAM starts (``trainer.global_step < skip_step_count`` are
        plain), default None (no skip).
    skip_epoch_count
        Plain epochs before SAM starts: an int, or a float in (0, 1) meaning that fraction of
        ``max_epochs`` (rounded down), default None. Not together with ``skip_step_count``.
    logging
        Also write one line per SAM step (and per skipped step) to the Python logger
        ``matsciml.lightning.callbacks.sam``, at level ``log_level``, on rank 0. Default False.
    log_level
        Level of those lines: ``"DEBUG"``, ``"INFO"``, ``"WARNING"`` (default), ``"ERROR"`` or
        ``"CRITICAL"``.
    every_n_steps
        Run SAM on optimizer steps whose index (``trainer.global_step``, from 0) is a multiple of
        this, plain steps in between; default 1 (every step). ``2`` costs about 1.5 plain steps.

    Raises
    ------
    ConfigError
        (a ``ValueError``) at construction for a bad argument or both ``skip_step_count`` and
        ``skip_epoch_count``; at fit start for manual optimisation, several optimizers, LBFGS, a
        strategy other than single-device or DDP (FSDP, DeepSpeed, ...), ``16-mixed`` with an
        optimizer that unscales internally (``fused=True``), or a fractional ``skip_epoch_count``
        without ``max_epochs``.

    Example::

        # trainer config (upstream layout)
        callbacks:
          - class_path: matsciml.lightning.callbacks.SAM
            init_args:
              rho: 0.05
              adaptive: false
              skip_epoch_count: 0.1   # first 10 % of max_epochs without SAM
              every_n_steps: 1

        # in Python
        trainer = pl.Trainer(callbacks=[SAM(rho=0.05)], max_epochs=10)
    """

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        skip_step_count: int | None = None,
        skip_epoch_count: int | float | None = None,
        logging: bool = False,
        log_level: str = "WARNING",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho <= 0:
            raise ConfigError(f"SAM: rho={rho!r} must be a positive number (default 0.05; about 0.5 with adaptive)")
        if skip_step_count is not None and skip_epoch_count is not None:
            raise ConfigError(
                f"SAM: give skip_step_count ({skip_step_count!r}) or skip_epoch_count ({skip_epoch_count!r}), not both"
            )
        check_int(skip_step_count, "skip_step_count", "SAM", minimum=0, optional=True)
        if skip_epoch_count is not None:
            ok_int = isinstance(skip_epoch_count, int) and not isinstance(skip_epoch_count, bool)
            ok_int = ok_int and skip_epoch_count >= 0
            ok_frac = isinstance(skip_epoch_count, float) and 0.0 < skip_epoch_count < 1.0
            if not (ok_int or ok_frac):
                raise ConfigError(
                    f"SAM: skip_epoch_count={skip_epoch_count!r} must be a non-negative int (epochs) or a float in "
                    "(0, 1) (fraction of max_epochs)"
                )
        check_int(every_n_steps, "every_n_steps", "SAM")
        level = log_level.upper() if isinstance(log_level, str) else log_level
        if level not in _LEVELS:
            raise ConfigError(f"SAM: log_level={log_level!r} must be one of {', '.join(_LEVELS)}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.skip_step_count = skip_step_count
        self.skip_epoch_count = skip_epoch_count
        self.logging = bool(logging)
        self.log_level = level
        self.every_n_steps = every_n_steps
        self.eps = DEFAULT_EPS
        self.sam_steps = 0
        self.skipped_steps = 0
        self._skip_epochs: int | None = skip_epoch_count if isinstance(skip_epoch_count, int) else None
        self._window: list[tuple[Any, int]] = []
        self._backup = WeightBackup()
        self._use_protocol = False
        self._warned_skip = False

    # ------------------------------------------------------------------ configuration checks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigError(
                f"SAM needs automatic optimisation; {type(pl_module).__name__} sets automatic_optimization=False. "
                "Remove the SAM callback or implement the two passes in your training_step"
            )
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"SAM supports exactly one optimizer; configure_optimizers returned {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigError("SAM does not work with LBFGS (it evaluates the closure several times per step)")
        strategy = trainer.strategy
        if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy):
            raise ConfigError(
                f"SAM supports single-device and DDP strategies; got {type(strategy).__name__} "
                "(sharded strategies would need a sharded gradient norm)"
            )
        if getattr(strategy, "handles_gradient_accumulation", False):
            raise ConfigError(f"SAM: strategy {type(strategy).__name__} accumulates gradients itself; not supported")
        scaler = grad_scaler(trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ConfigError(
                f"SAM with precision='16-mixed' needs an optimizer that Lightning unscales before the step; "
                f"{type(optimizer).__name__} unscales internally (fused=True). Use fused=False or 'bf16-mixed'"
            )
        if isinstance(self.skip_epoch_count, float):
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 0:
                raise ConfigError(
                    f"SAM: skip_epoch_count={self.skip_epoch_count} is a fraction of max_epochs, but the Trainer has "
                    "no max_epochs; give an int number of epochs or set max_epochs"
                )
            self._skip_epochs = int(self.skip_epoch_count * max_epochs)
        self._use_protocol = callable(getattr(pl_module, "compute_losses", None))
        if not self._use_protocol:
            rank_zero_info(
                f"SAM: {type(pl_module).__name__} has no compute_losses(batch); the second pass calls its "
                "training_step with self.log silenced"
            )
        self._window = []

    # ------------------------------------------------------------------ batches of the window
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = []

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._window.append((batch, batch_idx))

    def _is_sam_step(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        if self.skip_step_count is not None and step < self.skip_step_count:
            return False
        if self._skip_epochs is not None and trainer.current_epoch < self._skip_epochs:
            return False
        return step % self.every_n_steps == 0

    # ------------------------------------------------------------------ the SAM step
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        window, self._window = self._window, []
        if not window or not self._is_sam_step(trainer):
            return
        params = [p for p in optimizer_parameters(optimizer) if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise ConfigError("SAM does not support sparse gradients (e.g. nn.Embedding(sparse=True))")

        buffers = [b for b in pl_module.buffers() if b is not None]
        saved_buffers = [b.detach().clone() for b in buffers]
        self._backup.save(params)
        grad_norm, perturbation_norm = perturb_(params, grads, self.rho, self.adaptive, self.eps)
        with torch.no_grad():
            torch._foreach_zero_(grads)
        try:
            second_norm = self._second_pass(trainer, pl_module, window, optimizer)
        finally:
            self._backup.restore(params)
            if buffers:
                with torch.no_grad():
                    torch._foreach_copy_(buffers, saved_buffers)

        finite = second_norm is not None and all_finite(grad_norm, second_norm)
        self.sam_steps += 1
        if not finite:
            self._skip_step(trainer, optimizer, "a non-finite value" if second_norm is not None else "no loss")
        pl_module.log("sam_grad_norm", grad_norm.detach().float(), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(
            "sam_perturbation_norm", perturbation_norm.detach().float(), on_step=True, on_epoch=False, batch_size=1
        )
        pl_module.log("sam_skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False, batch_size=1)
        if self.logging and trainer.is_global_zero:
            _LOG.log(
                pylogging.getLevelName(self.log_level),
                "SAM step %d: grad norm %.6g, perturbation norm %.6g, skipped steps %d",
                trainer.global_step,
                float(grad_norm),
                float(perturbation_norm),
                self.skipped_steps,
            )

    def _second_pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, window: list[tuple[Any, int]], optimizer: Optimizer
    ) -> Tensor | None:
        """Loss and gradient at the perturbed weights over the window; returns the gradient norm (None: no loss)."""
        scaler = grad_scaler(trainer)
        accumulate = trainer.accumulate_grad_batches
        wrapper = trainer.strategy.model
        for i, (batch, batch_idx) in enumerate(window):
            last = i == len(window) - 1
            no_sync = wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) and not last else None
            with no_sync or contextlib.nullcontext(), torch.enable_grad():
                loss = self._loss(trainer, pl_module, batch, batch_idx)
                if loss is None:
                    return None
                if accumulate > 1:
                    loss = loss / accumulate
                if scaler is not None:
                    loss = scaler.scale(loss)
                pl_module.backward(loss)
        # every gradient of the optimizer's parameters is now from this pass (the others were None before it)
        grads = [p.grad for p in optimizer_parameters(optimizer) if p.grad is not None]
        if scaler is not None and grads:
            # Lightning unscaled the first gradients before this hook (the scaler's stage is UNSCALED, so
            # scaler.step will not unscale again): unscale the second ones here with the same scale.
            with torch.no_grad():
                torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
        return global_norm(grads)

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor | None:
        strategy = trainer.strategy
        wrapped = strategy.model is not None and strategy.model is not pl_module
        redirect = forward_redirection(strategy)
        if self._use_protocol and (not wrapped or redirect is not None):
            with strategy.precision_plugin.train_step_context():
                if wrapped:
                    # through the DDP wrapper's forward, so the backward all-reduces the gradients
                    out = redirect(strategy.model, pl_module, "compute_losses", batch)
                else:
                    out = pl_module.compute_losses(batch)
            return _loss_of(out, f"{type(pl_module).__name__}.compute_losses")
        with silenced_logging(pl_module):
            out = strategy.training_step(batch, batch_idx)
        return _loss_of(out, f"{type(pl_module).__name__}.training_step")

    def _skip_step(self, trainer: pl.Trainer, optimizer: Optimizer, why: str) -> None:
        """Make the coming optimizer step a no-op: no gradients, and the GradScaler told to skip and back off."""
        self.skipped_steps += 1
        devices = {p.grad.device for p in optimizer_parameters(optimizer) if p.grad is not None}
        skip_optimizer_step(optimizer)
        mark_scaler_step_skipped(grad_scaler(trainer), optimizer, devices)
        message = (
            f"SAM: {why} in the sharpness-aware step at global step {trainer.global_step}; the optimizer step is "
            f"skipped (weights unchanged, {self.skipped_steps} skipped so far, logged as sam_skipped_steps)"
        )
        if self.logging and trainer.is_global_zero:
            _LOG.log(pylogging.getLevelName(self.log_level), message)
        elif not self._warned_skip:
            rank_zero_warn(message + ". Further skips are only counted.")
        self._warned_skip = True

    # ------------------------------------------------------------------ state
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._backup.clear()
        self._window = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sam_steps": self.sam_steps, "skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sam_steps = int(state_dict.get("sam_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
