"""Small datasets, modules and trainers shared by the tests of the core callbacks (and the DDP worker)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from matsciml.lightning.datamodule import MatSciMLDataModule

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for the DDP worker scripts too
from helpers import make_trainer  # noqa: E402, F401 - re-exported for the callback tests

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


class ToyDataset(Dataset):
    """``n`` samples ``{"x": [3], "y": scalar, "id": "s<i>"}`` with ``y = x @ w + 0.1 * noise``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "id": f"s{i}"}


def toy_collate(samples: Sequence[dict]) -> dict:
    batch = default_collate(list(samples))
    return {"x": batch["x"], "targets": {"y": batch["y"]}, "ids": list(batch["id"]), "batch_size": len(samples)}


def make_datamodule(n: int = 20, val: float = 0.0, test: float = 0.0, batch_size: int = 4) -> MatSciMLDataModule:
    return MatSciMLDataModule(
        dataset=ToyDataset(n),
        val_split=val,
        test_split=test,
        batch_size=batch_size,
        collate_fn=toy_collate,
        seed=0,
    )


class ToyTask(pl.LightningModule):
    """A linear model with the task protocol's ``compute_losses`` / ``forward``.

    ``val_sequence``: when given, ``val_loss`` logged at epoch ``e`` is ``val_sequence[e]``
    (scripted metric values for the stopping and best-checkpoint tests), under the name
    ``val_metric_name``.
    """

    def __init__(
        self, val_sequence: Sequence[float] | None = None, val_metric_name: str = "val_loss", lr: float = 0.05
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.val_sequence = list(val_sequence) if val_sequence is not None else None
        self.val_metric_name = val_metric_name
        self.lr = lr
        self.task_keys = ["y"]
        self.task_loss_scaling = {"y": 1.0}

    def forward(self, batch: dict) -> dict:
        return {"y": self.net(batch["x"]).squeeze(-1)}

    def compute_losses(self, batch: dict) -> dict:
        pred = self(batch)["y"]
        loss = (pred - batch["targets"]["y"]).pow(2).mean()
        n = int(batch["batch_size"])
        return {"loss": loss, "per_key": {"y": loss}, "counts": {"y": n}, "predictions": {"y": pred}, "batch_size": n}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_losses(batch)["loss"]
        self.log("train_loss", loss, batch_size=batch["batch_size"])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.val_sequence is not None:
            value = torch.tensor(float(self.val_sequence[min(self.current_epoch, len(self.val_sequence) - 1)]))
        else:
            value = self.compute_losses(batch)["loss"]
        self.log(self.val_metric_name, value, batch_size=batch["batch_size"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
