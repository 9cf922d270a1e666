"""Small model and data shared by the EMA tests, and the 2-process DDP run.

Run as a script (``python ema_ddp_script.py OUT_DIR``) it trains :class:`TinyRegressor`
with the EMA callback under ``strategy="ddp"`` on 2 CPU processes (gloo); Lightning
starts the second process by re-running this script. Each rank writes its EMA and raw
weights to ``OUT_DIR/rank<r>.pt``; ``ModelCheckpoint`` writes ``OUT_DIR/ckpt/``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback  # noqa: E402


class TinyRegressor(pl.LightningModule):
    """Linear + LayerNorm + BatchNorm (running statistics, integer ``num_batches_tracked``) + Linear.

    Offers ``compute_losses`` (the task protocol) so that ``evaluate_raw`` can be tested.
    """

    def __init__(self, in_dim: int = 4, hidden: int = 8, lr: float = 1e-2, lazy: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        first = nn.LazyLinear(hidden) if lazy else nn.Linear(in_dim, hidden)
        self.encoder = nn.Sequential(first, nn.LayerNorm(hidden), nn.BatchNorm1d(hidden), nn.SiLU())
        self.head = nn.Linear(hidden, 1)
        self.probe: Any = None  # tests hang functions here: probe(module, hook_name, batch_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        pred = self(x)
        per_key = {"y": nn.functional.mse_loss(pred, y), "y_abs": (pred - y).abs().mean()}
        return {"loss": per_key["y"] + per_key["y_abs"], "per_key": per_key, "batch_size": x.shape[0]}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.probe is not None:
            self.probe(self, "training_step", batch_idx)
        return self.compute_losses(batch)["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.probe is not None:
            self.probe(self, "validation_step", batch_idx)
        out = self.compute_losses(batch)
        self.log("val_loss", out["loss"], batch_size=out["batch_size"])
        self.log("val_y", out["per_key"]["y"], batch_size=out["batch_size"])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        out = self.compute_losses(batch)
        self.log("test_loss", out["loss"], batch_size=out["batch_size"])

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class FeatureEncoder(nn.Module):
    """A minimal encoder for the task classes: ``batch["features"] [B, in_dim]`` -> system embedding ``[B, D]``."""

    def __init__(self, in_dim: int = 4, embedding_dim: int = 8) -> None:
        super().__init__()
        from matsciml.models.embeddings import Embeddings

        self._embeddings = Embeddings
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(in_dim, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.SiLU())

    def forward(self, batch: dict) -> Any:
        h = self.net(batch["features"])
        return self._embeddings(system_embedding=h, point_embedding=h)


def task_batches(num_batches: int = 4, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Batches for :class:`FeatureEncoder`: ``{"features", "targets": {"energy"}, "batch_size"}``."""
    return [
        {"features": x, "targets": {"energy": y[:, 0]}, "batch_size": len(x)}
        for x, y in make_batches(num_batches, batch_size, seed=seed)
    ]


def make_batches(num_batches: int = 8, batch_size: int = 8, in_dim: int = 4, seed: int = 0) -> list:
    """Deterministic regression batches ``[(x [batch_size, in_dim], y [batch_size, 1]), ...]``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_batches * batch_size, in_dim, generator=generator)
    y = torch.sin(x).sum(1, keepdim=True) + 0.1 * torch.randn(len(x), 1, generator=generator)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class FixedBatches:
    """A fixed list of batches, iterated in order (a loader Lightning treats as one loader)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class StatefulBatches(FixedBatches):
    """A fixed list of batches that resumes mid-epoch (``state_dict`` / ``load_state_dict``).

    The state is the number of batches the fit loop has processed in the current epoch
    (read from the attached trainer), so a checkpoint written at any point of a step
    resumes at the first batch whose step had not finished.
    """

    def __init__(self, batches: list) -> None:
        super().__init__(batches)
        self.start = 0
        self.trainer: pl.Trainer | None = None

    def __iter__(self):
        def generate():
            start, self.start = self.start, 0  # read at the first ``next``: after load_state_dict
            yield from self.batches[start:]

        return generate()

    def state_dict(self) -> dict[str, int]:
        assert self.trainer is not None
        return {"processed": int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = int(state["processed"]) % len(self.batches)


def main(out_dir: str) -> None:
    warnings.filterwarnings("ignore")
    out = Path(out_dir)
    pl.seed_everything(0, verbose=False)
    model = TinyRegressor()
    ema = ExponentialMovingAverageCallback(decay=0.9, warmup="torch_ema")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        callbacks=[ema, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    batches = make_batches(num_batches=8)
    data = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer.fit(model, loader, loader)
    rank = trainer.global_rank
    torch.save(
        {
            "ema": {k: v.clone() for k, v in ema.ema_state_dict().items()},
            "raw": {k: v.clone() for k, v in ema.raw_state_dict().items()},
            "module": {k: v.clone() for k, v in model.state_dict().items()},
            "num_updates": ema.num_updates,
            "val_loss": float(trainer.callback_metrics["val_loss"]),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
