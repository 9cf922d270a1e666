"""Name the parameters that receive no gradient."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.grads import tensor_norms
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars

__all__ = ["UnusedParametersCallback"]


def _shapes(module: pl.LightningModule, names: list[str], limit: int) -> str:
    params = dict(module.named_parameters())
    shown = [f"{n} {list(params[n].shape)}" for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


class UnusedParametersCallback(Callback):
    """Name every trainable parameter that received no gradient, once per name.

    On the first optimizer step of a ``fit`` and then every ``every_n_steps`` steps, after
    the backward pass(es) of the step, the callback lists the parameters with
    ``requires_grad=True`` whose gradient is ``None`` (they are not part of the loss's
    autograd graph: an unused branch, a detached tensor, a head whose key is not in the
    loss) and, with ``check_zero_gradients``, those whose gradient is exactly zero (dead
    activations, an output multiplied by zero). Each name is reported in one
    :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning`, the first
    time it is seen, never again (the record survives checkpoint resume). The number of
    parameters without a gradient at the last check is logged as ``unused_parameters``.

    Under DDP such parameters need ``DDPStrategy(find_unused_parameters=True)``; the better
    fix is to use them in the loss, freeze them (``requires_grad=False``) or delete them.

    It works on any ``LightningModule`` (``named_parameters``). Only the check steps cost
    anything: a pass over the parameter list and, with ``check_zero_gradients``, one fused
    norm and one host-device synchronisation.

    Hooks it acts in:

    * ``on_train_batch_start``: decides whether this optimizer step is checked;
    * ``on_after_backward``: records the parameters without gradient (under gradient
      accumulation the last micro-batch's record holds the whole step);
    * ``on_train_batch_end``: reports once the optimizer step is done;
    * ``state_dict`` / ``load_state_dict``: the names already reported.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.UnusedParametersCallback
              init_args:
                every_n_steps: 1000

    Parameters
    ----------
    every_n_steps
        Period of the checks after the first step, default ``1000``; ``None`` checks the
        first step only.
    check_zero_gradients
        Also report parameters whose gradient is exactly zero. Default ``True``.
    max_names
        Names listed in one message, default ``20`` (the rest are counted).

    Raises
    ------
    ConfigError
        ``every_n_steps`` or ``max_names`` is not positive.
    """

    def __init__(
        self, every_n_steps: int | None = 1000, check_zero_gradients: bool = True, max_names: int = 20
    ) -> None:
        super().__init__()
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ConfigError(f"UnusedParametersCallback: every_n_steps={every_n_steps!r} must be positive or None")
        if int(max_names) < 1:
            raise ConfigError(f"UnusedParametersCallback: max_names={max_names!r} must be positive")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.check_zero_gradients = bool(check_zero_gradients)
        self.max_names = int(max_names)
        #: names reported as having no gradient / a zero gradient
        self.reported_unused: set[str] = set()
        self.reported_zero: set[str] = set()
        self._first_step: int | None = None
        self._checking = False
        self._step = 0
        self._record: tuple[list[str], list[str]] | None = None
        self._warner = RateLimitedWarner(min_interval_steps=0, max_per_key=None)

    def _is_check_step(self, step: int) -> bool:
        if self._first_step is None:
            self._first_step = step
        if step == self._first_step:
            return True
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._checking:
            self._step = trainer.global_step
            self._checking = self._is_check_step(self._step)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._checking:
            return
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        unused = [n for n, p in trainable if p.grad is None]
        zero: list[str] = []
        if self.check_zero_gradients:
            with_grad = [(n, p.grad) for n, p in trainable if p.grad is not None]
            if with_grad:
                norms = tensor_norms([g for _, g in with_grad]).tolist()
                zero = [n for (n, _), v in zip(with_grad, norms) if v == 0.0]
        self._record = (unused, zero)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._checking or trainer.global_step == self._step:
            return  # not checked, or still accumulating micro-batches of this step
        self._checking = False
        record, self._record = self._record, None
        if record is None:
            return
        unused, zero = record
        step = self._step
        log_scalars(trainer, {"unused_parameters": len(unused)}, step=step)
        new_unused = [n for n in unused if n not in self.reported_unused]
        new_zero = [n for n in zero if n not in self.reported_zero]
        self.reported_unused.update(new_unused)
        self.reported_zero.update(new_zero)
        if new_unused:
            self._warner.warn(
                f"unused:{step}",
                f"UnusedParametersCallback: step {step}: {len(new_unused)} trainable parameter(s) received no gradient "
                f"(not part of the loss's autograd graph): {_shapes(pl_module, new_unused, self.max_names)}. If they "
                "should learn, make the loss depend on their output (look for a detached tensor or an unused branch); "
                "if not, set requires_grad=False or remove them (under DDP they otherwise need "
                "find_unused_parameters=True).",
                step,
                rank=trainer.global_rank,
            )
        if new_zero:
            self._warner.warn(
                f"zero:{step}",
                f"UnusedParametersCallback: step {step}: {len(new_zero)} parameter(s) received an exactly zero "
                f"gradient: {_shapes(pl_module, new_zero, self.max_names)}. Their output is multiplied by zero or "
                "passes through dead activations (e.g. ReLU units that never fire); check their initialisation "
                "and inputs.",
                step,
                rank=trainer.global_rank,
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reported_unused": sorted(self.reported_unused), "reported_zero": sorted(self.reported_zero)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported_unused = set(state_dict.get("reported_unused", []))
        self.reported_zero = set(state_dict.get("reported_zero", []))
