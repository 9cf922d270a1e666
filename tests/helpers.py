"""Helpers shared by test modules: tiny model arguments, a tiny encoder, quiet CPU trainers (one process or two), a list dataset, a recording logger.

Importable as ``helpers`` from any test module (``tests/conftest.py`` puts this folder on
``sys.path``) and from scripts under ``tests/`` that insert it themselves.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import Dataset

from matsciml.common.graph import edge_index, edge_vectors, get_graph, graph_index, num_graphs
from matsciml.models.embeddings import Embeddings

__all__ = [
    "tiny_egnn_kwargs",
    "tiny_egnn_yaml",
    "small_mace_kwargs",
    "make_trainer",
    "ddp_trainer",
    "ItemsDataset",
    "TinyEncoder",
    "write_dedented",
    "cli_error",
    "RecordingLogger",
]


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


def small_mace_kwargs(**overrides: Any) -> dict:
    """Arguments of a small :class:`~matsciml.models.pyg.mace.MACEWrapper` as plain YAML data.

    Two interaction layers of ``8x0e + 8x1o``, ``r_max`` 4 Å; the classes are
    ``class_instance`` / ``class_path`` specs (:func:`matsciml.common.config.instantiate`
    builds them). ``mace_module`` is ``mace.modules.MACE`` unless overridden.
    """
    block = {"class_instance": "mace.modules.blocks.RealAgnosticResidualInteractionBlock"}
    kwargs = {
        "mace_module": {"class_instance": "mace.modules.MACE"},
        "interaction_cls": block,
        "interaction_cls_first": dict(block),
        "gate": {"class_path": "torch.nn.SiLU"},
        "MLP_irreps": "4x0e",
        "atom_embedding_dim": 8,
        "hidden_irreps": "8x0e + 8x1o",
        "avg_num_neighbors": 12.0,
        "correlation": 2,
        "max_ell": 2,
        "num_atom_embedding": 80,
        "num_bessel": 4,
        "num_interactions": 2,
        "num_polynomial_cutoff": 5,
        "r_max": 4.0,
    }
    kwargs.update(overrides)
    return kwargs


def write_dedented(path: Path, text: str) -> Path:
    """Write ``text`` (its common indentation removed) to ``path``, creating the folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def cli_error(capsys: Any, main: Callable[[list[str]], Any], args: list[str]) -> str:
    """The error line of a command that must fail: ``main(args)`` exits with status 2 after one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


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


def ddp_trainer(root: Any, callbacks: Sequence[Callback], max_steps: int, **kwargs: Any) -> pl.Trainer:
    """:func:`make_trainer` on two CPU processes (Lightning's ``ddp`` strategy, gloo) for ``max_steps`` steps.

    Each rank reads the batches its module's ``train_dataloader`` gives (no distributed
    sampler), so what every rank sees is explicit. Lightning starts the second process by
    running the calling script again.
    """
    options = dict(devices=2, strategy="ddp", max_steps=max_steps, max_epochs=None, use_distributed_sampler=False)
    return make_trainer(root, callbacks, **{**options, **kwargs})


class ItemsDataset(Dataset):
    """The items of a list, in order: pre-built batches, read with ``DataLoader(..., batch_size=None)``."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class TinyEncoder(nn.Module):
    """Invariant test encoder: species embedding + smooth radial messages over edges (cosine cutoff).

    Edge vectors come from positions (:func:`matsciml.common.graph.edge_vectors`), so forces
    and stresses by autograd are exact.
    """

    def __init__(self, embedding_dim: int = 16, cutoff: float = 4.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.cutoff = cutoff
        self.species = nn.Embedding(100, embedding_dim)
        self.radial = nn.Sequential(nn.Linear(1, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))

    def forward(self, batch) -> Embeddings:
        graph = get_graph(batch)
        z = graph.atomic_numbers.long()
        ei = edge_index(graph)
        dist = edge_vectors(graph).norm(dim=-1, keepdim=True)
        envelope = 0.5 * (torch.cos(math.pi * dist / self.cutoff) + 1.0) * (dist < self.cutoff)
        messages = self.radial(dist) * envelope * self.species(z[ei[1]])
        points = self.species(z) + torch.zeros_like(self.species(z)).index_add(0, ei[0], messages)
        index = graph_index(graph)
        count = torch.bincount(index, minlength=num_graphs(graph)).clamp(min=1).to(points.dtype)
        system = points.new_zeros(num_graphs(graph), points.shape[-1]).index_add(0, index, points) / count[:, None]
        return Embeddings(system_embedding=system, point_embedding=points)


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
