"""Tiny structure batches and tiny task-like models with planted faults, for the monitor tests.

``TinyTask`` follows the task protocol (``encoder``, ``output_heads``, ``task_keys``,
``task_loss_scaling``, ``compute_losses``, ``forward``) on batches laid out as in
:mod:`matsciml.datasets.schema`, and can plant one fault at a time:

================== =====================================================================
argument           fault
================== =====================================================================
``detached``       an encoder layer whose output is detached: its parameters get no grad
``frozen_encoder`` encoder weights frozen ...
``head_scale``     ... and the head's weights multiplied by this factor at start
``constant``       the encoder returns the same embedding for every atom and structure
``nan_at_step``    at that optimizer step, the point embeddings of structure 1 become NaN
``explode_at_step`` at that step the loss is multiplied by ``explode_factor`` (finite)
================== =====================================================================
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from helpers import ItemsDataset, make_trainer
from torch import nn
from torch.utils.data import DataLoader
from torch_geometric.data import Batch, Data

from matsciml.common.graph import get_graph
from matsciml.lightning.callbacks._utils.reporting import TrainingDynamicsWarning
from matsciml.models.embeddings import Embeddings

DATA = Path(__file__).resolve().parents[2] / "data"
SPECIES = torch.tensor([0.0, -0.5, 0.3, 0.8, -0.2, 0.6, -0.9, 0.1, 0.4, -0.3])


def structure(pos: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor) -> Data:
    return Data(
        pos=pos.float(),
        atomic_numbers=numbers.long(),
        cell=cell.float().reshape(1, 3, 3),
        natoms=int(numbers.numel()),
        edge_index=torch.zeros(2, 0, dtype=torch.long),
    )


def collate(graphs: list[Data], ids: list[str], energy: torch.Tensor) -> dict[str, Any]:
    return {
        "graph": Batch.from_data_list(graphs),
        "targets": {"energy": energy.float()},
        "natoms": torch.tensor([g.natoms for g in graphs]),
        "ids": ids,
        "batch_size": len(graphs),
    }


def make_batch(index: int, size: int = 4, seed: int = 0, target_scale: float = 1.0) -> dict[str, Any]:
    """Batch ``index``: ``size`` random crystals in cubic cells of 4-6 Å, ids ``b<index>-s<j>``."""
    gen = torch.Generator().manual_seed(1000 * seed + index)
    graphs, energy = [], []
    for j in range(size):
        n = 2 + (index + j) % 4
        cell = (4.0 + 2.0 * torch.rand((), generator=gen)) * torch.eye(3)
        pos = torch.rand(n, 3, generator=gen) @ cell
        numbers = torch.randint(1, 10, (n,), generator=gen)
        graphs.append(structure(pos, numbers, cell))
        energy.append(SPECIES[numbers].mean() * target_scale)
    return collate(graphs, [f"b{index}-s{j}" for j in range(size)], torch.stack(energy))


def make_batches(count: int, size: int = 4, spike_at: int | None = None, spike_scale: float = 1e3) -> list[dict]:
    return [make_batch(i, size, target_scale=spike_scale if i == spike_at else 1.0) for i in range(count)]


def oqmd_batches(size: int = 8, count: int = 4, fractional: bool = False) -> list[dict[str, Any]]:
    """Batches of the OQMD devset, positions Cartesian or (wrongly) fractional; ``None`` when absent."""
    from ase.io import read

    frames = read(DATA / "oqmd_devset.extxyz", f":{size * count}")
    batches = []
    for b in range(count):
        chunk = frames[b * size : (b + 1) * size]
        graphs = []
        for atoms in chunk:
            pos = atoms.get_scaled_positions(wrap=False) if fractional else atoms.positions
            graphs.append(
                structure(torch.tensor(pos), torch.tensor(atoms.numbers), torch.tensor(np.asarray(atoms.cell)))
            )
        ids = [f"oqmd-{a.info['oqmd_entry_id']}" for a in chunk]
        energy = torch.tensor([a.info["formation_energy_per_atom"] for a in chunk])
        batches.append(collate(graphs, ids, energy))
    return batches


def loader(batches: list[dict[str, Any]]) -> DataLoader:
    return DataLoader(ItemsDataset(batches), batch_size=None, shuffle=False)


class TinyEncoder(nn.Module):
    """Species embedding + a position feature, an MLP, mean pooling: ``Embeddings``."""

    def __init__(self, dim: int = 8, detached: bool = False, constant: bool = False) -> None:
        super().__init__()
        self.embedding_dim = dim
        self.species = nn.Embedding(100, dim)
        self.position = nn.Linear(3, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.side = nn.Linear(dim, dim) if detached else None
        self.constant = nn.Parameter(torch.full((dim,), 0.5)) if constant else None
        self.poison = False

    def forward(self, batch: Any) -> Embeddings:
        graph = get_graph(batch)
        cell_scale = graph.cell.reshape(-1, 3, 3).norm(dim=-1).mean(dim=-1).clamp_min(1.0)[graph.batch]
        h = self.species(graph.atomic_numbers) + self.position(graph.pos / cell_scale[:, None])
        h = self.mlp(h)
        if self.side is not None:
            h = h + 0.0 * self.side(h).detach()  # a layer whose output is cut from the graph
        if self.constant is not None:
            h = self.constant.expand(h.shape[0], -1) + 0.0 * h
        if self.poison:
            h = torch.where((graph.batch == 1)[:, None], torch.full_like(h, float("nan")), h)
        count = torch.zeros(graph.num_graphs, device=h.device).index_add_(
            0, graph.batch, torch.ones_like(graph.batch, dtype=h.dtype)
        )
        system = torch.zeros(graph.num_graphs, h.shape[1], device=h.device).index_add_(0, graph.batch, h)
        return Embeddings(system / count[:, None], h)


class TinyTask(pl.LightningModule):
    """A task (protocol members only) with one planted fault at a time; see the module docstring."""

    def __init__(
        self,
        dim: int = 8,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        detached: bool = False,
        frozen_encoder: bool = False,
        head_scale: float = 1.0,
        constant: bool = False,
        nan_at_step: int | None = None,
        explode_at_step: int | None = None,
        explode_factor: float = 1e12,
        optimizer: str = "adamw",
    ) -> None:
        super().__init__()
        self.encoder = TinyEncoder(dim, detached=detached, constant=constant)
        self.output_heads = nn.ModuleDict({"energy": nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))})
        self.task_keys = ["energy"]
        self.task_loss_scaling = {"energy": 1.0}
        if frozen_encoder:
            self.encoder.requires_grad_(False)
        if head_scale != 1.0:
            with torch.no_grad():
                for p in self.output_heads.parameters():
                    p.mul_(head_scale)
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.nan_at_step, self.explode_at_step, self.explode_factor = nan_at_step, explode_at_step, explode_factor

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        step = self.trainer.global_step if self._trainer is not None else -1
        self.encoder.poison = self.training and step == self.nan_at_step
        embeddings = self.encoder(batch)
        prediction = self.output_heads["energy"](embeddings.system_embedding).squeeze(-1)
        loss = nn.functional.mse_loss(prediction, batch["targets"]["energy"])
        if self.training and step == self.explode_at_step:
            loss = loss * self.explode_factor
        return {
            "loss": loss,
            "per_key": {"energy": loss},
            "predictions": {"energy": prediction},
            "batch_size": batch["batch_size"],
            "embeddings": embeddings,
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.compute_losses(batch)["predictions"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.compute_losses(batch)["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class PlainModule(pl.LightningModule):
    """A LightningModule without the task protocol (a linear model on the structure batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.species = nn.Embedding(100, 1)
        self.unused = nn.Linear(2, 2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        graph = get_graph(batch)
        atom = self.species(graph.atomic_numbers).squeeze(-1)
        energy = torch.zeros(graph.num_graphs).index_add_(0, graph.batch, atom)
        return nn.functional.mse_loss(energy, batch["targets"]["energy"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def trainer(root: Path, callbacks: list, max_steps: int = 6, logger: Any = False, **kwargs: Any) -> pl.Trainer:
    """:func:`helpers.make_trainer` for ``max_steps`` steps, logging every step."""
    options = dict(logger=logger, max_steps=max_steps, max_epochs=None, log_every_n_steps=1)
    return make_trainer(root, callbacks, **{**options, **kwargs})


def fit(
    module: pl.LightningModule,
    batches: list[dict],
    root: Path,
    callbacks: list,
    everything: bool = False,
    **kwargs: Any,
) -> list:
    """Fit and return the :class:`TrainingDynamicsWarning` s issued (every warning with ``everything``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(root, callbacks, **kwargs).fit(module, loader(batches))
    return [w for w in caught if everything or issubclass(w.category, TrainingDynamicsWarning)]


def dynamics_messages(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TrainingDynamicsWarning)]


class WeightRecorder(pl.Callback):
    """Weights at the start of every batch and after every optimizer step, keyed by ``global_step``."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._snapshot(pl_module)


def read_csv(root: Path) -> list[dict[str, str]]:
    """Rows of the one ``metrics.csv`` a CSVLogger wrote under ``root``."""
    (path,) = Path(root).glob("**/metrics.csv")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], name: str) -> dict[int, float]:
    """``{step: value}`` of one metric column (rows without it left out)."""
    return {int(r["step"]): float(r[name]) for r in rows if r.get(name) not in (None, "")}
