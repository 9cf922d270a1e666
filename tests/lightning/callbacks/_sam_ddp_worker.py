"""Two-process DDP run of the SAM callback (gloo, CPU), started by ``test_sam.py``.

Usage: ``python _sam_ddp_worker.py OUT_DIR {protocol|training_step}``. Lightning's ``ddp`` strategy
starts the second process by running this script again; each rank writes ``rank<r>.pt`` with its
final weights. :func:`single_process_oracle` gives the weights that the documented rule (one global
perturbation from the all-reduced gradient, second gradient all-reduced too) gives in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/
from helpers import ItemsDataset, ddp_trainer  # noqa: E402

STEPS = 4
BATCH = 4
RHO = 0.05
LR = 0.05


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 1)).double()


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches that ``rank`` sees, one per step (different on each rank)."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 3, generator=g, dtype=torch.float64)
        out.append((x, (x[:, :1] * x[:, 1:2] + torch.sin(x[:, 2:3])) * (1 + rank)))
    return out


def mse(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (net(x) - y).pow(2).mean()


class PlainModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        loss = mse(self.net, batch)
        self.log("train_loss", loss, batch_size=BATCH)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def train_dataloader(self):
        # one pre-built batch per item, so the shard of each rank is explicit
        return torch.utils.data.DataLoader(ItemsDataset(rank_batches(self.global_rank)), batch_size=None)


class ProtocolModule(PlainModule):
    def compute_losses(self, batch):
        self.calls += 1
        loss = mse(self.net, batch)
        return {"loss": loss, "per_key": {}, "predictions": {}, "batch_size": BATCH}

    def training_step(self, batch, batch_idx):
        out = self.compute_losses(batch)
        self.log("train_loss", out["loss"], batch_size=BATCH)
        return out["loss"]


def single_process_oracle() -> dict[str, torch.Tensor]:
    """Global rule in one process: the mean of the two ranks' losses, SAM as published."""
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    shards = [rank_batches(0), rank_batches(1)]
    for step in range(STEPS):

        def loss_fn(step=step):
            return 0.5 * (mse(net, shards[0][step]) + mse(net, shards[1][step]))

        opt.zero_grad()
        loss_fn().backward()
        params = list(net.parameters())
        n = torch.sqrt(sum((p.grad**2).sum() for p in params))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(RHO * p.grad / (n + 1e-12))
        opt.zero_grad()
        loss_fn().backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        opt.step()
    return {f"net.{k}": v for k, v in net.state_dict().items()}


def main(out_dir: str, second_pass: str) -> None:
    from matsciml.lightning.callbacks.sam import SAM

    module = ProtocolModule() if second_pass == "protocol" else PlainModule()
    trainer = ddp_trainer(out_dir, [SAM(rho=RHO)], STEPS)
    trainer.fit(module)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save({"weights": weights, "calls": module.calls}, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
