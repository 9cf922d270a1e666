"""``TaskHooksCallback``: callbacks that watch a task's modules through forward hooks.

A callback that reads what the encoder or the output heads of a task return (embeddings,
predictions) puts forward hooks on them when fitting starts. This base class keeps the
hook handles and removes them when fitting ends or fails, and checks once that the
module follows the task protocol (:mod:`matsciml.models.tasks.protocol`), warning a
single time with what the callback does without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from matsciml.models.tasks.protocol import is_task

__all__ = ["TaskHooksCallback"]


class TaskHooksCallback(Callback):
    """Base of callbacks that put forward hooks on the modules of a task.

    A subclass calls :meth:`check_task` in ``on_fit_start`` and, for a task,
    :meth:`add_forward_hook` for each module it watches. Every hook is removed in
    ``on_fit_end`` and ``on_exception`` (a subclass that overrides them calls ``super()``),
    or earlier by :meth:`remove_hooks`.

    Hooks it acts in: ``on_fit_end``, ``on_exception`` (hook removal).

    Example::

        class LogEmbeddingNorm(TaskHooksCallback):
            def on_fit_start(self, trainer, pl_module):
                if self.check_task(pl_module, "encoder", "nothing is logged"):
                    self.add_forward_hook(pl_module.encoder, self.record)
    """

    def __init__(self) -> None:
        super().__init__()
        #: whether the module of the current fit follows the task protocol (set by :meth:`check_task`)
        self._protocol = False
        self._said_fallback = False
        self._handles: list[Any] = []

    def warn_once(self, message: str) -> None:
        """Warn (on rank zero) with ``message``, unless this callback already gave such a warning."""
        if not self._said_fallback:
            rank_zero_warn(message)
            self._said_fallback = True

    def check_task(self, pl_module: pl.LightningModule, needs: str, otherwise: str) -> bool:
        """Whether ``pl_module`` follows the task protocol; if not, warn once.

        Parameters
        ----------
        pl_module
            The module being fitted.
        needs
            The protocol attributes the callback uses (``"encoder, output_heads"``).
        otherwise
            What the callback does without them (the end of the warning).
        """
        self._protocol = is_task(pl_module)
        if not self._protocol:
            self.warn_once(
                f"{type(self).__name__}: {type(pl_module).__name__} does not follow the task protocol ({needs}): "
                f"{otherwise}"
            )
        return self._protocol

    def add_forward_hook(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """Register ``hook`` as a forward hook of ``module`` until :meth:`remove_hooks`."""
        self._handles.append(module.register_forward_hook(hook))

    @property
    def has_hooks(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)

    def remove_hooks(self) -> None:
        """Remove every hook registered by :meth:`add_forward_hook`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.remove_hooks()
