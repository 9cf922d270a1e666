"""Helpers shared by test modules: tiny model arguments, a quiet CPU trainer, a recording logger.

Importable as ``helpers`` from any test module (``tests/conftest.py`` puts this folder on
``sys.path``) and from scripts under ``tests/`` that insert it themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import Logger

__all__ = ["tiny_egnn_kwargs", "tiny_egnn_yaml", "make_trainer", "RecordingLogger"]


def tiny_egnn_kwargs(depth: int = 1, readout: str = "sum", cutoff: float | None = None, **overrides: Any) -> dict:
    """Arguments of a tiny :class:`~matsciml.models.PLEGNNBackbone` (8 features; fast on CPU).

    ``depth=1``: one message-passing layer of width 8 without position updates;
    ``depth=2``: two layers with 16-wide feature and message MLPs and position updates.
    """
    if depth == 1:
        layers = {"embed_feat_dims": [8], "embed_message_dims": [8], "embed_position_dims": []}
    elif depth == 2:
        layers = {"embed_feat_dims": [16], "embed_message_dims": [16, 16], "embed_position_dims": [8]}
    else:
        raise ValueError(f"depth={depth}: 1 or 2")
    kwargs = {
        "embed_in_dim": 8,
        "embed_hidden_dim": 8,
        "embed_out_dim": 8,
        "embed_depth": depth,
        **layers,
        "embed_edge_attributes_dim": 0,
        "embed_activation": "silu",
        "embed_residual": True,
        "embed_normalize": True,
        "embed_tanh": True,
        "embed_activate_last": False,
        "embed_k_linears": 1,
        "embed_use_attention": False,
        "embed_attention_norm": "sigmoid",
        "readout": readout,
        "node_projection_depth": 1,
        "node_projection_hidden_dim": 8,
        "node_projection_activation": "silu",
        "prediction_out_dim": 1,
        "prediction_depth": 1,
        "prediction_hidden_dim": 8,
        "prediction_activation": "silu",
        "encoder_only": True,
    }
    if cutoff is not None:
        kwargs["cutoff"] = cutoff
    kwargs.update(overrides)
    return kwargs


def tiny_egnn_yaml(**kwargs: Any) -> str:
    """The ``encoder_kwargs`` mapping of :func:`tiny_egnn_kwargs` as one flow-style YAML line."""
    return yaml.safe_dump(tiny_egnn_kwargs(**kwargs), default_flow_style=True, width=10_000).strip()


def make_trainer(root: Any, callbacks: Sequence[Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A CPU trainer without logger, progress bar or sanity check, 2 epochs; ``kwargs`` override.

    Checkpointing is on only when ``callbacks`` holds a checkpoint callback.
    """
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        max_epochs=2,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


class RecordingLogger(Logger):
    """A logger that keeps every ``log_metrics`` call as ``(step, {name: float})`` in :attr:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.records.append((step, {k: float(v) for k, v in metrics.items()}))

    def values(self, name: str) -> dict[int, float]:
        """``{step: value}`` of every record of ``name``."""
        return {step: m[name] for step, m in self.records if name in m}
