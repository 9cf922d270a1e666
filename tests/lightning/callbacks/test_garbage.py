"""Tests of GarbageCallback: exactly one collection per ``frequency`` optimizer steps."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks import garbage
from matsciml.lightning.callbacks.garbage import GarbageCallback

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(callback, monkeypatch, **kwargs) -> list[tuple[int, int]]:
    """Train with ``gc.collect`` replaced (in the callback's module only); returns (generation, step) per call."""
    calls: list[tuple[int, int]] = []
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    monkeypatch.setattr(garbage, "gc", SimpleNamespace(collect=lambda gen=2: calls.append((gen, trainer.global_step))))
    data = [torch.full((4, 2), float(i)) for i in range(6)]
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=None))
    return calls


@pytest.mark.parametrize("frequency, steps", [(1, 5), (3, 10), (4, 12), (7, 5)])
def test_collects_every_frequency_steps(monkeypatch, frequency, steps):
    cb = GarbageCallback(frequency)
    calls = fit(cb, monkeypatch, max_steps=steps)
    expected = [s for s in range(1, steps + 1) if s % frequency == 0]
    assert calls == [(2, s) for s in expected]
    assert cb.collections == len(expected) == steps // frequency


def test_counts_optimizer_steps_not_batches(monkeypatch):
    """With gradient accumulation over 3 batches, 12 optimizer steps take 36 batches: still 12 // 4 calls."""
    calls = fit(GarbageCallback(4, generation=1), monkeypatch, max_steps=12, accumulate_grad_batches=3)
    assert calls == [(1, 4), (1, 8), (1, 12)]


def test_arguments_are_checked():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="frequency"):
            GarbageCallback(bad)
    with pytest.raises(ConfigError, match="generation"):
        GarbageCallback(5, generation=3)
