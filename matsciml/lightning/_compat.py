"""Every use of a private Lightning or PyTorch internal, in one place.

Each function names the internal it touches and the versions it was written against
(Lightning 2.6, PyTorch 2.x); ``tests/lightning/test_compat.py`` has one test per function
that fails when the internal moves or changes meaning, so an upgrade breaks here, with a
name, and not somewhere inside a training run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "forward_redirection",
    "mark_scaler_step_skipped",
    "dump_checkpoint",
    "silenced_logging",
    "preserved_trainer_state",
    "detach_from_trainer",
    "logs_at_this_step",
    "refresh_logged_metric",
]


def forward_redirection(strategy: Any) -> Any:
    """The strategy's forward redirection, or ``None`` where the strategy has none.

    ``redirect(wrapper, module, "method", *args)`` runs ``module.method(*args)`` through
    the wrapper's ``forward`` (DDP: the backward then all-reduces the gradients).

    Internal: ``Strategy._forward_redirection`` (a ``_ForwardRedirection``), Lightning 2.2 to 2.6.
    """
    return getattr(strategy, "_forward_redirection", None)


def mark_scaler_step_skipped(scaler: Any, optimizer: torch.optim.Optimizer, devices: Iterable[torch.device]) -> bool:
    """Tell a ``GradScaler`` that ``optimizer``'s gradients held inf, so ``scaler.step`` skips the
    step and ``scaler.update`` backs the scale off. Returns ``False`` when the scaler has no such state.

    Call it after the gradients were unscaled (Lightning unscales before
    ``on_before_optimizer_step``), otherwise ``scaler.step`` unscales again and overwrites it.

    Internal: ``GradScaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]``,
    PyTorch 2.0 to 2.13 (``torch.amp.GradScaler`` and ``torch.cuda.amp.GradScaler``).
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if scaler is None or states is None:
        return False
    found = states[id(optimizer)].setdefault("found_inf_per_device", {})
    for device in devices or {torch.device("cpu")}:
        found[device] = torch.ones((), dtype=torch.float32, device=device)
    return True


def dump_checkpoint(trainer: Any, weights_only: bool = False) -> dict[str, Any]:
    """The checkpoint dictionary ``Trainer.save_checkpoint`` would write, without its barrier.

    Internal: ``Trainer._checkpoint_connector.dump_checkpoint``, Lightning 2.0 to 2.6.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=weights_only)


def _noop_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """Turn ``module.log`` / ``module.log_dict`` into no-ops inside the block.

    Internal: relies on ``LightningModule.log`` and ``log_dict`` being plain methods, so an
    instance attribute shadows them (Lightning 2.0 to 2.6).
    """
    previous = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    for name in previous:
        object.__setattr__(module, name, _noop_log)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, value)


@contextlib.contextmanager
def preserved_trainer_state(trainer: Any) -> Iterator[None]:
    """Run a nested ``trainer.test`` (or ``validate``) from ``on_fit_end`` and leave the trainer as it was.

    The nested call sets ``trainer.state`` to testing and reloads every ``ModelCheckpoint``'s
    state from the tested checkpoint; both are restored afterwards, so the end of ``fit``
    (and what it reports) is unchanged.

    Internal: writes ``trainer.state.fn`` / ``status`` / ``stage`` and ``ModelCheckpoint``'s
    instance attributes (Lightning 2.0 to 2.6).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: PLC0415 - keep this module light

    saved_state = (trainer.state.fn, trainer.state.status, trainer.state.stage)
    saved_ckpt = [(cb, dict(vars(cb))) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    try:
        yield
    finally:
        trainer.state.fn, trainer.state.status, trainer.state.stage = saved_state
        for cb, attributes in saved_ckpt:
            vars(cb).update(attributes)


def detach_from_trainer(module: nn.Module) -> None:
    """Let a ``LightningModule`` copy without a trainer answer ``.trainer`` & co. instead of raising.

    Internal: ``LightningModule._jit_is_scripting`` (the flag its ``trainer`` property checks),
    Lightning 2.0 to 2.6. A no-op for modules without it.
    """
    if hasattr(type(module), "_jit_is_scripting"):
        module._jit_is_scripting = True


def logs_at_this_step(trainer: Any) -> bool:
    """Whether the values logged in the current training step reach the loggers.

    ``True`` on the steps of the trainer's ``log_every_n_steps`` cadence (and when the
    trainer is about to stop), ``False`` on the others; ``True`` without a trainer.

    Internal: ``Trainer._logger_connector.should_update_logs``, Lightning 2.0 to 2.6.
    """
    if trainer is None:
        return True
    return bool(trainer._logger_connector.should_update_logs)


def refresh_logged_metric(module: Any, name: str, metric: Any) -> bool:
    """Hand the new per-step value of a ``torchmetrics`` metric to Lightning, as a repeated ``module.log`` would.

    When ``metric`` was already logged under ``name`` from the current hook in this epoch
    (``module.log(name, metric, on_step=True, ...)``), a second ``log`` with the same
    arguments only copies ``metric._forward_cache`` (the value of the last batch) into
    Lightning's record of it -- but it costs about a millisecond on a CPU (argument
    checks, signature inspection, moving the record to the metric's device). This does
    the copy alone. Returns ``False``, changing nothing, when there is no such record
    (the first ``log`` of the epoch, another hook, a plain tensor value): then call ``log``.

    Internal: ``Trainer._results`` (the active loop's ``_ResultCollection``, keyed
    ``"<hook>.<name>"``), ``_ResultMetric.value`` / ``is_tensor`` / ``has_reset`` / ``meta``
    / ``_forward_cache``, and ``_ResultMetric.update`` for a ``Metric`` value, Lightning 2.0 to 2.6.
    """
    trainer = getattr(module, "_trainer", None)
    hook = getattr(module, "_current_fx_name", None)
    results = trainer._results if trainer is not None else None
    if results is None or hook is None or results.dataloader_idx is not None:
        return False
    record = results.get(f"{hook}.{name}")
    if record is None or record.is_tensor or record.value is not metric or record.has_reset or not record.meta.on_step:
        return False
    record._forward_cache = metric._forward_cache
    return True
