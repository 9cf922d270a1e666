"""Gradient monitors: skip exploding steps, per-module gradient norms, manual clipping.

Three callbacks act on the final gradient of an optimizer step, in
``on_before_optimizer_step`` (after the backward of every micro-batch, after
Lightning has unscaled 16-bit mixed-precision gradients, before Lightning's own
clipping and ``optimizer.step``):

* :class:`GradientCheckCallback` skips a step whose total gradient norm is not finite or
  too large, so the weights stay bitwise unchanged, and logs ``skipped_steps``;
* :class:`MonitorGradients` logs the gradient norm of each top-level module
  (``grad_norm/encoder``, ``grad_norm/output_heads``, ...) and ``grad_norm/total``;
* :class:`ManualGradientClip` clips the gradients of all parameters together.

The gradient helpers they share with the other monitors are in
:mod:`matsciml.lightning.callbacks._utils.grads`.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.grads import (
    OptimizerParameters,
    TrainingFaultError,
    grad_scaler,
    id_source,
    ids_of,
    ids_text,
    optimizer_parameters,
    skip_optimizer_step,
    tensor_norms,
    total_norm,
)
from matsciml.lightning.callbacks._utils.names import GRAD_NORM_BEFORE_CLIP, GRAD_NORM_PREFIX, GRAD_NORM_TOTAL
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars
from matsciml.lightning.callbacks._utils.steps import log_every_n_steps

__all__ = ["GradientCheckCallback", "MonitorGradients", "ManualGradientClip", "TrainingFaultError"]


# ----------------------------------------------------------------------------- GradientCheckCallback
class GradientCheckCallback(Callback):
    """Skip optimizer steps whose total gradient norm is not finite or too large.

    Before every optimizer step the callback computes the total gradient norm of the
    optimizer's parameters (one fused norm and one host-device synchronisation per step).
    When it is NaN/inf, larger than ``thres``, or (with ``relative_thres``) larger than
    ``relative_thres`` times the median of the recent accepted norms, the step is
    skipped: every gradient is set to ``None`` (:func:`skip_optimizer_step`), so the
    optimizer leaves the weights **bitwise unchanged**, weight decay and momentum
    included. The skip is counted, logged as the scalar ``skipped_steps`` to every logger,
    and reported in a :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning`
    naming the step, the norm and the structure ids of the batch (``batch["ids"]``, every
    micro-batch of the step under gradient accumulation). Each skip is also kept in
    :attr:`skipped`. ``trainer.global_step`` and learning-rate schedulers still advance.

    Under 16-bit mixed precision with a ``GradScaler``, a non-finite norm is the scaler's
    business (it skips that step and lowers the loss scale): such steps are left to it and
    not counted; too-large finite norms are still skipped.

    Order: put this callback after callbacks that change the gradient in
    ``on_before_optimizer_step`` (SAM), after those that read it (``MonitorGradients``),
    since a skipped step has no gradients left, and after ``ForwardNaNDetection``, which
    then reports a non-finite batch alone.

    Differences from upstream matsciml: upstream's ``thres`` was a *lower* bound used for
    debug messages about small parameter norms, NaN gradients were zeroed (so weight decay
    still moved the weights), and ``num_steps`` was compared the wrong way round. Here
    ``thres`` is the largest total gradient norm accepted; small gradients are reported
    by :class:`~matsciml.lightning.callbacks.helper.TrainingHelperCallback`.

    Hooks it acts in:

    * ``on_train_batch_start``: remembers the ids of each micro-batch;
    * ``on_before_optimizer_step``: the check and the skip;
    * ``state_dict`` / ``load_state_dict``: the skip count and records.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.GradientCheckCallback
              init_args:
                thres: 1000.0
                relative_thres: 50.0

    Parameters
    ----------
    thres
        Largest total gradient norm accepted, default ``1e4``.
    num_steps
        Check only the first ``num_steps`` optimizer steps of the run (``global_step <
        num_steps``); ``None`` (default) or ``-1`` checks every step.
    norm_type
        Order of the norm, default ``2.0`` (``inf`` for the largest absolute value).
    relative_thres
        Also skip when the norm exceeds ``relative_thres`` times the median of the last
        ``history`` accepted norms (once ``min_history`` are known). Default ``None``: off.
    history
        Number of recent accepted norms kept for ``relative_thres``, default ``100``.
    min_history
        Accepted norms needed before ``relative_thres`` applies, default ``20``.
    max_consecutive_skips
        Raise :class:`TrainingFaultError` after this many skipped steps in a row (training
        is not progressing), default ``50``; ``None`` never raises.
    verbose
        ``True``: warn on every skip; ``False`` (default): at most 20 warnings, the rest
        only counted and logged.

    Raises
    ------
    ConfigError
        ``thres`` is not positive, ``relative_thres`` is not above 1, or a count is negative.
    TrainingFaultError
        ``max_consecutive_skips`` steps in a row were skipped.
    """

    def __init__(
        self,
        thres: float = 1e4,
        num_steps: int | None = None,
        norm_type: float = 2.0,
        relative_thres: float | None = None,
        history: int = 100,
        min_history: int = 20,
        max_consecutive_skips: int | None = 50,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if not float(thres) > 0:
            raise ConfigError(f"GradientCheckCallback: thres={thres!r} must be a positive gradient norm")
        if relative_thres is not None and not float(relative_thres) > 1:
            raise ConfigError(
                f"GradientCheckCallback: relative_thres={relative_thres!r} must be above 1 (a multiple of the median)"
            )
        if num_steps is not None and int(num_steps) < -1:
            raise ConfigError(f"GradientCheckCallback: num_steps={num_steps!r} must be None, -1 or a count of steps")
        if int(history) < 1 or int(min_history) < 1:
            raise ConfigError("GradientCheckCallback: history and min_history must be positive")
        if max_consecutive_skips is not None and int(max_consecutive_skips) < 1:
            raise ConfigError(f"GradientCheckCallback: max_consecutive_skips={max_consecutive_skips!r} must be >= 1")
        self.thres = float(thres)
        self.num_steps = None if num_steps is None or int(num_steps) < 0 else int(num_steps)
        self.norm_type = float(norm_type)
        self.relative_thres = None if relative_thres is None else float(relative_thres)
        self.min_history = int(min_history)
        self.max_consecutive_skips = None if max_consecutive_skips is None else int(max_consecutive_skips)
        self.verbose = bool(verbose)
        self.skipped_steps = 0
        self.consecutive_skips = 0
        #: one record per skipped step: ``{"step", "norm", "reason", "ids"}``
        self.skipped: list[dict[str, Any]] = []
        self._norms: deque[float] = deque(maxlen=int(history))
        self._id_sources: list = []  # the ids of each micro-batch of the step, read only for a message
        self._parameters = OptimizerParameters()
        self._warner = RateLimitedWarner(min_interval_steps=0, max_per_key=None if self.verbose else 20)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.thres < 1.0:
            rank_zero_warn(
                f"GradientCheckCallback: thres={self.thres:g} is the largest total gradient norm accepted; steps "
                "with a larger norm are skipped. Upstream matsciml used thres as a lower bound for messages about "
                "small gradients: for those use TrainingHelperCallback(small_grad_thres=...)."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        source = id_source(batch)
        if source is not None:
            self._id_sources.append(source)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        sources, self._id_sources = self._id_sources, []
        step = trainer.global_step
        if self.num_steps is not None and step >= self.num_steps:
            return
        grads = [p.grad for p in self._parameters(optimizer) if p.grad is not None]
        if not grads:
            return
        # one fused norm and the one host-device synchronisation of the step
        norm = float(total_norm(grads, self.norm_type))
        reason = self._reason(norm)
        if reason is None:
            self.consecutive_skips = 0
            self._norms.append(norm)
            self._log(trainer, step, force=False)
            return
        if not math.isfinite(norm) and grad_scaler(trainer) is not None:
            return  # the GradScaler skips this step and lowers its scale
        skip_optimizer_step(optimizer)
        ids = ids_of(*sources)
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.skipped.append({"step": step, "norm": norm, "reason": reason, "ids": list(ids)})
        message = (
            f"GradientCheckCallback: step {step}: {reason}; the optimizer step was skipped (weights unchanged, "
            f"{self.skipped_steps} skipped so far, logged as skipped_steps); {ids_text(ids)}. Look at these "
            "structures (ForwardNaNDetection writes offending batches), lower the learning rate or clip gradients."
        )
        self._warner.warn("skip", message, step, rank=trainer.global_rank)
        self._log(trainer, step, force=True)
        if self.max_consecutive_skips is not None and self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingFaultError(
                f"GradientCheckCallback: {self.consecutive_skips} optimizer steps in a row were skipped (last at step "
                f"{step}: {reason}); training is not progressing. Lower the learning rate, clip gradients, check the "
                "data (ForwardNaNDetection), or raise thres / max_consecutive_skips."
            )

    def _reason(self, norm: float) -> str | None:
        if not math.isfinite(norm):
            return f"the total gradient norm is {norm}"
        if norm > self.thres:
            return f"the total gradient norm {norm:.4g} exceeds thres={self.thres:g}"
        if self.relative_thres is not None and len(self._norms) >= self.min_history:
            median = sorted(self._norms)[len(self._norms) // 2]
            if norm > self.relative_thres * median:
                return (
                    f"the total gradient norm {norm:.4g} exceeds {self.relative_thres:g} x the median {median:.4g} "
                    f"of the last {len(self._norms)} steps"
                )
        return None

    def _log(self, trainer: pl.Trainer, step: int, force: bool) -> None:
        if force or step % log_every_n_steps(trainer) == 0:
            log_scalars(trainer, {"skipped_steps": self.skipped_steps}, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "skipped": [dict(r) for r in self.skipped[-100:]],
            "norms": list(self._norms),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        self.skipped = [dict(r) for r in state_dict.get("skipped", [])]
        self._norms.clear()
        self._norms.extend(float(v) for v in state_dict.get("norms", []))


# ----------------------------------------------------------------------------- MonitorGradients
def _group_name(name: str, depth: int) -> str:
    parts = name.split(".")[:-1]  # drop the parameter's own name
    if not parts:
        return "<root>"
    return ".".join(parts[:depth])


class MonitorGradients(Callback):
    """Log the gradient norm of each top-level module, and warn when gradients stop changing.

    Every ``every_n_steps`` optimizer steps, on the final gradient of the step, the
    callback computes the norm of every parameter's gradient (fused, one host-device
    synchronisation per logged step), groups the parameters by the first ``depth``
    components of their names, and logs to every logger:

    * ``grad_norm/total``: the norm over all parameters with a gradient;
    * ``grad_norm/<module>``: the norm over the parameters of each module, e.g.
      ``grad_norm/encoder`` and ``grad_norm/output_heads`` for a task (``depth=2`` gives
      ``grad_norm/output_heads.energy``, ...); parameters owned by the root module are
      grouped as ``<root>``. Modules whose parameters have no gradient are not logged.

    It works on any ``LightningModule`` (names come from ``named_parameters``, listed at the
    start of each training epoch: a parameter created in the middle of an epoch is seen
    from the next one). When every
    per-parameter gradient norm equals that of the previous logged step (relative
    difference below ``eps``), it warns: the model received the same gradient twice,
    which happens when the batches do not change or the loss ignores the inputs.

    Hooks it acts in: ``on_train_epoch_start`` (lists the named parameters),
    ``on_before_optimizer_step``. Put it before :class:`GradientCheckCallback` (which
    removes the gradients of a skipped step).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.MonitorGradients
              init_args:
                every_n_steps: 50

    Parameters
    ----------
    step_frequency
        Upstream name of ``every_n_steps`` (kept for upstream YAML files).
    verbose
        Also print a one-line summary at each logged step (rank zero). Default ``False``.
    eps
        Relative tolerance of the "gradients did not change" check, default ``1e-10``.
    every_n_steps
        Period in optimizer steps; default: the trainer's ``log_every_n_steps`` (50).
    depth
        Number of name components that make a group, default ``1`` (top-level modules).
    norm_type
        Order of the norms, default ``2.0``.

    Raises
    ------
    ConfigError
        Both ``step_frequency`` and ``every_n_steps`` are given with different values, or
        a period or ``depth`` is not positive.
    """

    def __init__(
        self,
        step_frequency: int | None = None,
        verbose: bool = False,
        eps: float = 1e-10,
        every_n_steps: int | None = None,
        depth: int = 1,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__()
        if step_frequency is not None and every_n_steps is not None and int(step_frequency) != int(every_n_steps):
            raise ConfigError(
                f"MonitorGradients: step_frequency={step_frequency} and every_n_steps={every_n_steps} disagree; "
                "give one of them (every_n_steps is the current name)"
            )
        period = every_n_steps if every_n_steps is not None else step_frequency
        if period is not None and int(period) < 1:
            raise ConfigError(f"MonitorGradients: every_n_steps={period!r} must be a positive number of steps")
        if int(depth) < 1:
            raise ConfigError(f"MonitorGradients: depth={depth!r} must be >= 1")
        self.every_n_steps = None if period is None else int(period)
        self.verbose = bool(verbose)
        self.eps = float(eps)
        self.depth = int(depth)
        self.norm_type = float(norm_type)
        #: the values logged at the last logged step: ``{"grad_norm/total": ..., ...}``
        self.last: dict[str, float] = {}
        self._previous: tuple[int, list[str], list[float]] | None = None
        self._layout: tuple[tuple, list[str], Tensor] | None = None  # parameter names -> groups
        self._named: list[tuple[str, nn.Parameter]] | None = None  # named_parameters, listed once an epoch
        self._warner = RateLimitedWarner(min_interval_steps=100, max_per_key=5)

    def _period(self, trainer: pl.Trainer) -> int:
        return log_every_n_steps(trainer, self.every_n_steps)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._named = list(pl_module.named_parameters())  # a module walk: not at every logged step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self._period(trainer):
            return
        if self._named is None:
            self._named = list(pl_module.named_parameters())
        named = [(n, p.grad) for n, p in self._named if p.grad is not None]
        if not named:
            return
        names = [n for n, _ in named]
        norms = tensor_norms([g for _, g in named], self.norm_type)
        keys, index = self._groups(names, norms.device)
        host = torch.cat([self._group_norms(norms, index, len(keys) - 1), norms]).tolist()  # the one sync
        per_param = host[len(keys) :]
        self.last = {f"{GRAD_NORM_PREFIX}{k}": v for k, v in zip(keys, host[: len(keys)])}
        log_scalars(trainer, self.last, step=step)
        if self.verbose:
            rank_zero_info(f"MonitorGradients step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in self.last.items()))
        self._check_repeat(trainer, step, names, per_param)

    def _groups(self, names: list[str], device: torch.device) -> tuple[list[str], Tensor]:
        """``(["total", group, ...], group number of each parameter)``, kept while the parameter names stay."""
        key = (tuple(names), device)
        if self._layout is None or self._layout[0] != key:
            groups: dict[str, int] = {}
            numbers = [groups.setdefault(_group_name(name, self.depth), len(groups)) for name in names]
            self._layout = (key, ["total", *groups], torch.tensor(numbers, device=device))
        return self._layout[1], self._layout[2]

    def _group_norms(self, norms: Tensor, index: Tensor, count: int) -> Tensor:
        """``[total, group 0, group 1, ...]`` from the per-parameter norms (``combine_norms`` of each group)."""
        if math.isinf(self.norm_type):
            groups = norms.new_zeros(count).scatter_reduce(0, index, norms, "amax", include_self=True)
            return torch.cat([norms.max().reshape(1), groups])
        powered = norms.pow(self.norm_type)
        groups = powered.new_zeros(count).index_add_(0, index, powered)
        return torch.cat([powered.sum().reshape(1), groups]).pow(1.0 / self.norm_type)

    def _check_repeat(self, trainer: pl.Trainer, step: int, names: list[str], norms: list[float]) -> None:
        previous, self._previous = self._previous, (step, names, norms)
        if previous is None or previous[0] == step or previous[1] != names:
            return
        scale = max(max(norms, default=0.0), 0.0)
        if scale == 0.0 or not math.isfinite(scale):
            return
        if all(abs(a - b) <= self.eps * scale for a, b in zip(norms, previous[2])):
            self._warner.warn(
                "repeat",
                f"MonitorGradients: step {step}: every parameter's gradient norm equals that of step {previous[0]} "
                f"(total {self.last.get(GRAD_NORM_TOTAL, float('nan')):.6g}); the model sees the same gradient "
                "again. Check that the data loader yields new batches and that the loss depends on the inputs.",
                step,
                rank=trainer.global_rank,
            )


# ----------------------------------------------------------------------------- ManualGradientClip
_ALGORITHMS = ("norm", "value")


class ManualGradientClip(Callback):
    """Clip the gradients of all parameters together, by total norm or by value.

    ``algorithm="norm"`` rescales every gradient by ``min(1, value / (total_norm + 1e-6))``
    where ``total_norm`` is the norm of all the optimizer's gradients together: exactly
    :func:`torch.nn.utils.clip_grad_norm_` over the optimizer's parameters (which is what
    it calls). ``algorithm="value"`` clamps each gradient element to ``[-value, value]``
    (:func:`torch.nn.utils.clip_grad_value_`). The total norm before clipping is kept in
    :attr:`last_total_norm` (a tensor: reading it synchronises). Upstream matsciml clipped
    each parameter separately, which changes the gradient's direction; this clips jointly.

    Prefer Lightning's ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``,
    which does the same after this hook; the callback exists for upstream YAML files and
    for clipping before other callbacks (list order) see the gradient.

    Hooks it acts in: ``setup`` (warns when Lightning also clips),
    ``on_before_optimizer_step`` (clips; logs ``grad_norm/before_clip`` every
    ``log_every_n_steps`` steps when ``verbose``).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ManualGradientClip
              init_args:
                value: 10.0
                algorithm: norm

    Parameters
    ----------
    value
        Largest total norm (``"norm"``) or largest absolute element (``"value"``); > 0.
    algorithm
        ``"norm"`` (default) or ``"value"``.
    verbose
        Log the total norm before clipping as ``grad_norm/before_clip``. Default ``False``.
    norm_type
        Order of the norm for ``"norm"``, default ``2.0``.
    **kwargs
        Further arguments of :func:`torch.nn.utils.clip_grad_norm_` (``error_if_nonfinite``,
        ``foreach``) or of :func:`torch.nn.utils.clip_grad_value_` (``foreach``).

    Raises
    ------
    ConfigError
        Unknown ``algorithm``, ``value`` not positive, or an unknown keyword argument.
    """

    def __init__(
        self, value: float, algorithm: str = "norm", verbose: bool = False, norm_type: float = 2.0, **kwargs: Any
    ) -> None:
        super().__init__()
        if algorithm not in _ALGORITHMS:
            raise ConfigError(f"ManualGradientClip: algorithm={algorithm!r} must be one of {_ALGORITHMS}")
        if not float(value) > 0:
            raise ConfigError(f"ManualGradientClip: value={value!r} must be positive")
        function = nn.utils.clip_grad_norm_ if algorithm == "norm" else nn.utils.clip_grad_value_
        allowed = set(inspect.signature(function).parameters) - {"parameters", "max_norm", "clip_value", "norm_type"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ConfigError(
                f"ManualGradientClip: unknown argument {unknown[0]!r} for algorithm={algorithm!r}; "
                f"accepted: {sorted(allowed)}"
            )
        self.value = float(value)
        self.algorithm = algorithm
        self.verbose = bool(verbose)
        self.norm_type = float(norm_type)
        self.kwargs = dict(kwargs)
        self.last_total_norm: Tensor | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer, "gradient_clip_val", None):
            rank_zero_warn(
                f"ManualGradientClip and Trainer(gradient_clip_val={trainer.gradient_clip_val}) both clip the "
                "gradients; keep one of them."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [p for p in optimizer_parameters(optimizer) if p.grad is not None]
        if not params:
            return
        log_now = self.verbose and trainer.global_step % log_every_n_steps(trainer) == 0
        if self.algorithm == "norm":
            self.last_total_norm = nn.utils.clip_grad_norm_(params, self.value, norm_type=self.norm_type, **self.kwargs)
        else:
            if log_now:
                self.last_total_norm = nn.utils.get_total_norm([p.grad for p in params], self.norm_type)
            nn.utils.clip_grad_value_(params, self.value, **self.kwargs)
        if log_now and self.last_total_norm is not None:
            log_scalars(trainer, {GRAD_NORM_BEFORE_CLIP: self.last_total_norm})
