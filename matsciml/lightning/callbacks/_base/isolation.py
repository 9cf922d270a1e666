"""Failure isolation: an exception in a callback hook is reported with the callback's name and an error checkpoint.

Two ways to get it:

* derive from :class:`IsolatedCallback` (every ``on_*`` hook the subclass defines, its
  ``setup`` and ``teardown``, and any custom event method ``on_<event>`` are guarded);
* wrap any existing callback instance, a Lightning one included, with :func:`isolate`.

When a guarded hook raises, the guard

1. writes an error checkpoint ``<run>/checkpoints/error-<CallbackClass>-step<k>.ckpt``
   (``-rank<r>`` appended under several processes) atomically, from the failing rank only
   (no collective call, so a failure on one rank cannot hang the others in the save);
2. records a :class:`CallbackFailure` in ``callback.failures``;
3. with ``on_error="stop"`` raises :class:`CallbackError` (message: callback class, hook,
   step, epoch, rank, the original error, the checkpoint path) chained to the original
   exception: training stops at that step, Lightning's ``on_exception`` hooks run; with
   ``on_error="continue"`` it warns (:class:`CallbackFailureWarning`, at most five times
   per hook) with the traceback in the ``matsciml`` log, and the run goes on as if the hook
   had returned.

Exceptions that are not failures of the callback pass through untouched:
:class:`~matsciml.common.errors.ConfigError` (a configuration error must stop the run
whatever ``on_error`` says), :class:`CallbackError` from a nested guard, and
non-``Exception`` signals (``KeyboardInterrupt``, ``SystemExit``).

``on_exception``, ``on_save_checkpoint``, ``on_load_checkpoint``, ``state_dict`` and
``load_state_dict`` are never guarded: an error there would corrupt a checkpoint or a
resume, and must surface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from matsciml.common.errors import ConfigError, MatSciMLError
from matsciml.lightning.callbacks._utils.checkpoint_io import checkpoint_dir, save_local_checkpoint_atomic
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner

__all__ = [
    "IsolatedCallback",
    "isolate",
    "is_isolated",
    "CallbackError",
    "CallbackFailure",
    "CallbackFailureWarning",
    "GUARDED_HOOKS",
    "error_checkpoint_path",
]

_log = logging.getLogger("matsciml.callbacks")

#: Hooks never guarded (see the module docstring).
_UNGUARDED = frozenset({"on_exception", "on_save_checkpoint", "on_load_checkpoint"})
#: Lightning callback hooks that are guarded when a callback overrides them.
GUARDED_HOOKS = frozenset(
    n for n in dir(Callback) if (n.startswith("on_") or n in ("setup", "teardown")) and n not in _UNGUARDED
)
#: Hooks in which no error checkpoint is written (no model state worth saving, or no trainer state yet).
_NO_CHECKPOINT = frozenset({"setup", "teardown"})


class CallbackError(MatSciMLError, RuntimeError):
    """A guarded callback hook failed and its callback was set to ``on_error="stop"``.

    Attributes
    ----------
    failure
        The :class:`CallbackFailure` record.
    """

    def __init__(self, message: str, failure: CallbackFailure) -> None:
        super().__init__(message)
        self.failure = failure


class CallbackFailureWarning(UserWarning):
    """A guarded callback hook failed and the run goes on (``on_error="continue"``)."""


@dataclass(frozen=True)
class CallbackFailure:
    """One failure of a guarded hook.

    Attributes
    ----------
    callback
        Class name of the callback.
    hook
        Name of the hook or event method that raised.
    step
        ``trainer.global_step`` at the failure (optimizer steps done).
    epoch
        ``trainer.current_epoch`` at the failure.
    error
        ``"<ExceptionType>: <message>"`` of the original exception.
    checkpoint
        Path of the error checkpoint, or ``None`` when none was written.
    """

    callback: str
    hook: str
    step: int
    epoch: int
    error: str
    checkpoint: str | None


@dataclass
class _Settings:
    on_error: str
    error_checkpoint: bool
    max_error_checkpoints: int
    checkpoints_written: int = 0


def _check_on_error(on_error: str) -> str:
    if on_error not in ("stop", "continue"):
        raise ConfigError(f"on_error={on_error!r}: use 'stop' (raise, ending the run) or 'continue' (warn, go on)")
    return on_error


def error_checkpoint_path(trainer: pl.Trainer, callback_name: str, step: int) -> Any:
    """``<run>/checkpoints/error-<callback_name>-step<step>.ckpt`` (``-rank<r>`` added when ``world_size > 1``)."""
    rank = f"-rank{trainer.global_rank}" if trainer.world_size > 1 else ""
    return checkpoint_dir(trainer) / f"error-{callback_name}-step{step}{rank}.ckpt"


def _write_error_checkpoint(owner: Any, hook: str, trainer: pl.Trainer, settings: _Settings) -> tuple[str | None, str]:
    """Write the error checkpoint when allowed; return ``(path or None, why none)``."""
    if not settings.error_checkpoint:
        return None, "error_checkpoint=False"
    if hook in _NO_CHECKPOINT:
        return None, f"none in {hook}"
    if getattr(trainer.state, "fn", None) != TrainerFn.FITTING or trainer.lightning_module is None:
        return None, "not fitting"
    if settings.checkpoints_written >= settings.max_error_checkpoints:
        return None, f"max_error_checkpoints={settings.max_error_checkpoints} already written"
    path = error_checkpoint_path(trainer, type(owner).__name__, trainer.global_step)
    try:
        save_local_checkpoint_atomic(trainer, path)
    except Exception as err:  # noqa: BLE001 - report the hook's error, not the checkpoint's
        _log.error("error checkpoint %s could not be written", path, exc_info=err)
        return None, f"writing it failed: {type(err).__name__}: {err}"
    settings.checkpoints_written += 1
    return str(path), ""


def _guarded_call(owner: Any, hook: str, trainer: Any, call: Any) -> Any:
    try:
        return call()
    except (ConfigError, CallbackError):
        raise
    except Exception as err:
        settings: _Settings = owner._isolation
        name = type(owner).__name__
        is_trainer = isinstance(trainer, pl.Trainer)
        step = int(trainer.global_step) if is_trainer else -1
        epoch = int(trainer.current_epoch) if is_trainer else -1
        rank = int(trainer.global_rank) if is_trainer else 0
        path, why = _write_error_checkpoint(owner, hook, trainer, settings) if is_trainer else (None, "no trainer")
        failure = CallbackFailure(name, hook, step, epoch, f"{type(err).__name__}: {err}", path)
        owner.failures.append(failure)
        where = f"error checkpoint {path}" if path else f"no error checkpoint ({why})"
        message = (
            f"callback {name}.{hook} raised {type(err).__name__}: {err} "
            f"(step {step}, epoch {epoch}, rank {rank}); {where}"
        )
        if settings.on_error == "stop":
            raise CallbackError(message + "; stopping (on_error='stop')", failure) from err
        warner: RateLimitedWarner = owner._isolation_warner
        if warner.warn(hook, message + "; continuing (on_error='continue')", step=step, rank=0):
            _log.error("%s failed in %s", name, hook, exc_info=err)
        return None


class _GuardedHook:
    """Instance attribute standing in for a hook method: calls the class's method under the guard (picklable)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name

    def __call__(self, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(type(self.owner), self.name)
        return _guarded_call(self.owner, self.name, trainer, lambda: method(self.owner, trainer, *args, **kwargs))

    @property
    def __wrapped__(self) -> Any:
        """The class's method (what ``functools.wraps``-aware tools such as ``is_overridden`` inspect)."""
        return getattr(type(self.owner), self.name)

    def __repr__(self) -> str:
        return f"<guarded {type(self.owner).__name__}.{self.name}>"


def _hooks_to_guard(callback: Any) -> list[str]:
    cls = type(callback)
    names = []
    for name in dir(cls):
        if name in _UNGUARDED or not (name.startswith("on_") or name in ("setup", "teardown")):
            continue
        attr = getattr(cls, name, None)
        if not callable(attr) or isinstance(attr, type):
            continue
        if name in GUARDED_HOOKS and attr is getattr(Callback, name, None):
            continue  # not overridden: Lightning's no-op
        names.append(name)
    return names


def isolate(
    callback: Callback,
    on_error: Literal["stop", "continue"] = "stop",
    error_checkpoint: bool = True,
    max_error_checkpoints: int = 1,
) -> Callback:
    """Guard the hooks of ``callback`` in place (see the module docstring) and return it.

    Every ``on_*`` method of the callback's class (Lightning hooks it overrides and custom
    event methods), ``setup`` and ``teardown`` become guarded; the instance keeps its class,
    ``state_key`` and state, so ``isinstance`` checks and checkpoints are unaffected.
    Calling it again only updates the settings.

    Example::

        from lightning.pytorch.callbacks import LearningRateMonitor
        trainer = pl.Trainer(callbacks=[isolate(LearningRateMonitor(), on_error="continue")])

    Parameters
    ----------
    callback
        Any Lightning callback.
    on_error
        ``"stop"`` (default): raise :class:`CallbackError` after the error checkpoint;
        ``"continue"``: warn and go on.
    error_checkpoint
        Write ``<run>/checkpoints/error-<CallbackClass>-step<k>.ckpt`` on a failure during
        ``fit`` (default ``True``).
    max_error_checkpoints
        Error checkpoints written at most per callback (default 1: a hook failing at every
        step under ``"continue"`` writes one, not thousands).

    Returns
    -------
    Callback
        ``callback`` itself, with a ``failures`` list of :class:`CallbackFailure`.

    Raises
    ------
    ConfigError
        ``on_error`` is neither ``"stop"`` nor ``"continue"``, or ``max_error_checkpoints < 0``.
    """
    _check_on_error(on_error)
    if int(max_error_checkpoints) < 0:
        raise ConfigError(f"max_error_checkpoints={max_error_checkpoints!r} must be >= 0")
    callback._isolation = _Settings(on_error, bool(error_checkpoint), int(max_error_checkpoints))
    if not hasattr(callback, "failures"):
        callback.failures = []
        callback._isolation_warner = RateLimitedWarner(
            min_interval_steps=0, max_per_key=5, category=CallbackFailureWarning
        )
    for name in _hooks_to_guard(callback):
        callback.__dict__[name] = _GuardedHook(callback, name)
    return callback


def is_isolated(callback: Any) -> bool:
    """Whether :func:`isolate` (or :class:`IsolatedCallback`) guards ``callback``."""
    return isinstance(getattr(callback, "_isolation", None), _Settings)


class IsolatedCallback(Callback):
    """Base class of callbacks whose failures are reported with their name and an error checkpoint.

    A subclass writes its hooks as usual; construction guards every ``on_*`` method the
    subclass defines (custom event methods included), ``setup`` and ``teardown`` (see
    :func:`isolate` and the module docstring for what happens on an exception). Subclasses
    must call ``super().__init__(on_error=..., ...)``.

    Hooks it acts in: none of its own; it guards the subclass's.

    Example::

        class PlotEvery100(IsolatedCallback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                ...  # a bug here is reported as "PlotEvery100.on_train_batch_end raised ..."

        callback = PlotEvery100(on_error="continue")

    and in YAML (any subclass)::

        callbacks:
          - kind: mypackage.callbacks.PlotEvery100
            on_error: continue

    Parameters
    ----------
    on_error
        ``"stop"`` (default) or ``"continue"``.
    error_checkpoint
        Write an error checkpoint on a failure during ``fit`` (default ``True``).
    max_error_checkpoints
        At most this many error checkpoints per callback (default 1).

    Raises
    ------
    ConfigError
        Bad ``on_error`` or ``max_error_checkpoints``.
    CallbackError
        At run time, a guarded hook failed with ``on_error="stop"``.
    """

    def __init__(
        self,
        on_error: Literal["stop", "continue"] = "stop",
        error_checkpoint: bool = True,
        max_error_checkpoints: int = 1,
    ) -> None:
        super().__init__()
        self.on_error = _check_on_error(on_error)
        isolate(self, on_error=on_error, error_checkpoint=error_checkpoint, max_error_checkpoints=max_error_checkpoints)
