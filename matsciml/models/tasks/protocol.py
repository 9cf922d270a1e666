"""The task protocol: what callbacks (and any code outside a task) may rely on.

This module is the one reference for it. A task is a ``LightningModule`` that offers:

``compute_losses(batch) -> dict``
    Runs the whole forward pass for ``batch`` (the encoder, the heads and, for force
    tasks, the autograd derivative of the energy) and returns::

        {
            "loss": Tensor,                 # scalar: sum over keys of scaling[key] * per_key[key]
            "per_key": {key: Tensor},       # scalar loss of each task key (normalised units)
            "predictions": {key: Tensor},   # predictions in data units
            "batch_size": int,              # number of structures in the batch
            # optional extras: "counts" {key: int} (target elements used per key),
            # "embeddings" (the encoder output)
        }

    It is *pure*: it logs nothing, updates no metric, and changes no attribute or
    parameter of the task (layers of the encoder that keep running statistics, such as
    batch norm in training mode, update them as in any forward pass). So a callback may
    call it again, e.g. SAM at perturbed weights. In training mode (grad enabled) the
    loss carries the autograd graph, including ``create_graph=True`` through the force
    derivative, so ``loss.backward()`` reaches every parameter.

``forward(batch) -> {key: Tensor}``
    Predictions in data units (what ``predict_step`` returns, plus ``ids``).

``encoder``
    The ``nn.Module`` that maps a batch to
    :class:`~matsciml.models.embeddings.Embeddings`.

``output_heads``
    ``nn.ModuleDict`` of the heads, keyed by the target they predict.

``task_keys``
    ``list[str]``: the targets the task is trained on.

``task_loss_scaling``
    ``dict[str, float]``, mutable: read at every step, so a scheduler callback may change
    the weight of each key's loss during training.

``training_step`` calls ``compute_losses`` and then logs; it returns the loss.

**Multi-task modules** (:class:`~matsciml.models.tasks.multitask.MultiTaskLitModule`)
follow the same protocol with *pair keys* ``"<dataset>_<task key>"``: ``task_keys``,
``task_loss_scaling``, ``per_key``, ``counts`` and ``predictions`` use them, and
``output_heads`` is keyed ``"<dataset>_<head>"``. Their batch is a mapping from dataset
name to that dataset's batch plus ``batch_size`` (the total), and ``per_key`` holds only
the pairs whose dataset is present in the batch (a pair without structures adds nothing
to the loss). They also offer ``task_scaling`` (the mutable list of each pair's weight)
and ``metric_kinds`` (``{pair key: "regression" | "binary" | "multiclass"}``).

Any ``LightningModule`` that offers these members gets the callbacks' full behaviour;
for one that does not, callbacks use :func:`compute_loss`, which falls back to
``training_step`` (which may log: a second call logs twice), and say once what they
cannot do.

Example::

    from matsciml.models.tasks.protocol import compute_loss, is_task

    loss = compute_loss(pl_module, batch, batch_idx)   # any LightningModule
    if is_task(pl_module):
        pl_module.task_loss_scaling["forces"] = 10.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["TaskProtocol", "is_task", "compute_loss", "loss_of"]


@runtime_checkable
class TaskProtocol(Protocol):
    """Structural type of a task (see the module docstring for the contract)."""

    encoder: nn.Module
    output_heads: nn.ModuleDict
    task_keys: list[str]
    task_loss_scaling: dict[str, float]

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        """Forward pass and losses for ``batch``; pure (no logging, no state change)."""
        ...

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions in data units."""
        ...


def is_task(module: Any) -> bool:
    """True when ``module`` offers every member of :class:`TaskProtocol`."""
    return isinstance(module, TaskProtocol)


def compute_loss(module: Any, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """The scalar training loss of ``module`` on ``batch``.

    Uses ``module.compute_losses(batch)["loss"]`` when the module has
    ``compute_losses``; otherwise calls ``module.training_step(batch, batch_idx)`` and
    takes the returned tensor, or its ``"loss"`` entry when it returns a mapping.

    Parameters
    ----------
    module
        A task, or any ``LightningModule``.
    batch
        The batch, as given to ``training_step``.
    batch_idx
        Passed to ``training_step`` in the fallback.

    Raises
    ------
    TypeError
        ``training_step`` returned neither a tensor nor a mapping with ``"loss"``
        (e.g. ``None`` under manual optimisation).
    """
    compute = getattr(module, "compute_losses", None)
    if callable(compute):
        return compute(batch)["loss"]
    out = module.training_step(batch, batch_idx)
    loss = loss_of(out)
    if loss is None:
        raise TypeError(
            f"{type(module).__name__}.training_step returned {type(out).__name__}; a loss Tensor or a dict with "
            "'loss' is needed (implement compute_losses(batch) to follow the task protocol)"
        )
    return loss


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss tensor in a ``training_step`` or ``compute_losses`` output, or ``None``.

    ``output`` is a tensor (returned as is), a mapping whose ``"loss"`` is a tensor, or
    anything else (``None`` returned: no loss to read, e.g. manual optimisation).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    return None
