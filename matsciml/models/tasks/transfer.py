"""What a task needs for fine-tuning and inference: encoder parameter groups, and checkpoint metadata.

:class:`TransferMixin` is a base of :class:`~matsciml.models.tasks.base.BaseTaskModule`:

* :attr:`~TransferMixin.encoder_lr`: when set (the runner's ``load_weights.encoder_lr``),
  the optimizer gets two AdamW parameter groups, the encoder at ``encoder_lr`` and the
  heads at the task's ``lr``; frozen parameters (``requires_grad=False``) are left out;
* :attr:`~TransferMixin.data_transforms`: the dataset transforms the task was trained
  with, as plain ``class_path``/``init_args`` specs (the runner sets them from the model
  config). Every checkpoint records them under ``checkpoint["matsciml"]`` with the task's
  class path, so :func:`matsciml.inference.load_task` rebuilds task and transforms from
  the checkpoint file alone (plain data: loads with ``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matsciml.models.tasks.plain import to_plain

__all__ = ["TransferMixin", "CHECKPOINT_KEY"]

#: Key of the inference metadata in a checkpoint.
CHECKPOINT_KEY = "matsciml"


class TransferMixin:
    """Parameter groups and inference metadata of a task (see the module docs)."""

    #: Learning rate of the encoder's parameter group (``None``: the encoder uses ``lr``).
    encoder_lr: float | None = None
    #: The dataset transforms (plain specs) the task was trained with, or ``None``.
    data_transforms: list | None = None

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters: one group, or the heads (``lr``) and the encoder (``encoder_lr``)."""
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.encoder_lr is None:
            return [{"params": [p for _, p in trainable]}]
        encoder = [p for n, p in trainable if n.startswith("encoder.")]
        rest = [p for n, p in trainable if not n.startswith("encoder.")]
        groups = [{"params": rest, "name": "heads"}] if rest else []
        if encoder:
            groups.append({"params": encoder, "lr": float(self.encoder_lr), "name": "encoder"})
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class and the data transforms for inference."""
        cls = type(self)
        checkpoint[CHECKPOINT_KEY] = {
            "task_class": f"{cls.__module__}.{cls.__qualname__}",
            "transforms": to_plain(self.data_transforms, where="data_transforms"),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore :attr:`data_transforms` from a checkpoint that has them."""
        info = checkpoint.get(CHECKPOINT_KEY)
        if isinstance(info, Mapping) and info.get("transforms") is not None:
            self.data_transforms = info["transforms"]
