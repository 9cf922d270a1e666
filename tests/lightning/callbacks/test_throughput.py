"""Tests of ThroughputCallback: counts from batches, rates and time split against a scripted clock."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch_geometric.data import Batch, Data

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks import throughput
from matsciml.lightning.callbacks.throughput import ThroughputCallback, batch_counts

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

# structures per batch, atoms per structure and edges per structure of the synthetic batches
SIZES = [(2, 3, 4), (3, 2, 2), (1, 5, 6), (4, 1, 0)]


def make_batch(graphs: int, atoms: int, edges: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(graphs):
        edge_index = torch.randint(0, atoms, (2, edges), generator=g)
        data.append(Data(pos=torch.randn(atoms, 3, generator=g), edge_index=edge_index, num_nodes=atoms))
    return {
        "graph": Batch.from_data_list(data),
        "natoms": torch.full((graphs,), atoms, dtype=torch.long),
        "targets": {"y": torch.randn(graphs, generator=g)},
        "batch_size": graphs,
    }


def expected_counts(index: int) -> tuple[int, int, int]:
    graphs, atoms, edges = SIZES[index % len(SIZES)]
    return graphs, graphs * atoms, graphs * edges


class PosRegressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch["graph"].pos).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(num_batches: int = len(SIZES)):
    batches = [make_batch(*SIZES[i % len(SIZES)], seed=i) for i in range(num_batches)]
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def trainer_for(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


class ScriptedClock:
    """A clock that advances by a fixed amount per calling hook, so every interval is known exactly.

    Amounts are binary fractions: sums and quotients of them are exact in float64 up to the
    last division.
    """

    ADVANCE = {
        "on_train_epoch_start": 100.0,  # epoch-end work, validation...: must not be counted
        "on_train_batch_start": 0.5,  # data wait
        "on_before_optimizer_step": 2.0,  # forward + backward
        "on_train_batch_end": 0.25,  # optimizer
    }

    def __init__(self) -> None:
        self.t = 1000.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        caller = sys._getframe(1).f_code.co_name
        self.calls.append(caller)
        self.t += self.ADVANCE.get(caller, 0.0)
        return self.t


# ----------------------------------------------------------------------------- counting
def test_batch_counts_from_shapes():
    batch = make_batch(3, 4, 5, seed=0)
    assert batch_counts(batch) == (3, 12, 15)
    assert batch_counts(batch["graph"]) == (3, 12, 15)  # a bare PyG batch
    assert batch_counts({"natoms": torch.tensor([2, 7, 1])}) == (3, 10, None)  # no graph: atoms from natoms
    assert batch_counts(torch.zeros(6, 2), batch_size=6) == (6, None, None)
    assert batch_counts(torch.zeros(6, 2)) == (None, None, None)


def test_arguments_are_checked():
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match="every_n_steps"):
            ThroughputCallback(every_n_steps=bad)
    with pytest.raises(ConfigError, match="batch_size"):
        ThroughputCallback(batch_size=0)


# ----------------------------------------------------------------------------- arithmetic
def test_rates_and_split_equal_counts_over_scripted_time(tmp_path, monkeypatch):
    clock = ScriptedClock()
    monkeypatch.setattr(throughput, "perf_counter", clock)
    cb = ThroughputCallback(every_n_steps=2, log_dir=tmp_path / "tp")
    trainer = trainer_for(tmp_path, [cb], max_steps=6)  # 4 batches per epoch: crosses an epoch boundary
    trainer.fit(PosRegressor(), loader())

    # hand computation: every batch waits 0.5 s for data, 2 s forward+backward, 0.25 s optimizer
    per_batch = 0.5 + 2.0 + 0.25
    assert [r["step"] for r in cb.history] == [2, 4, 6]
    for record, batches in zip(cb.history, [(0, 1), (2, 3), (4, 5)]):
        graphs, atoms, edges = (sum(expected_counts(i)[k] for i in batches) for k in range(3))
        elapsed = per_batch * len(batches)
        assert record["elapsed_s"] == elapsed
        assert record["graphs_per_s"] == graphs / elapsed
        assert record["atoms_per_s"] == atoms / elapsed
        assert record["edges_per_s"] == edges / elapsed
        assert (record["data_s"], record["forward_backward_s"], record["optimizer_s"]) == (0.5, 2.0, 0.25)
    assert clock.calls.count("on_train_epoch_start") == 2  # the 100 s gaps were there and left out

    # the CSV logger got the same numbers under the documented names
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    names = [
        "throughput/graphs_per_s",
        "throughput/atoms_per_s",
        "throughput/edges_per_s",
        "time/data_s",
        "time/forward_backward_s",
        "time/optimizer_s",
    ]
    assert set(names) <= set(rows[0])
    logged = [r for r in rows if r["throughput/graphs_per_s"]]
    assert [int(r["step"]) for r in logged] == [2, 4, 6]
    for row, record in zip(logged, cb.history):
        assert float(row["throughput/graphs_per_s"]) == pytest.approx(record["graphs_per_s"], rel=1e-12)
        assert float(row["time/forward_backward_s"]) == 2.0

    # log_dir: the records as JSON
    assert json.loads((tmp_path / "tp" / "throughput.json").read_text()) == cb.history


def test_gradient_accumulation_split(tmp_path, monkeypatch):
    """Without an optimizer step, a batch's whole time is forward+backward."""
    monkeypatch.setattr(throughput, "perf_counter", ScriptedClock())
    cb = ThroughputCallback(every_n_steps=1)
    trainer_for(tmp_path, [cb], max_steps=2, accumulate_grad_batches=2, logger=False).fit(PosRegressor(), loader())
    assert [r["step"] for r in cb.history] == [1, 2]
    for record, batches in zip(cb.history, [(0, 1), (2, 3)]):
        # batch 1 of the window: start (+0.5 data) -> end (+0.25, no optimizer hook): 0.25 s forward+backward
        # batch 2: +0.5 data, +2 forward+backward, +0.25 optimizer
        elapsed = 0.5 + 0.25 + 0.5 + 2.0 + 0.25
        assert record["elapsed_s"] == elapsed
        assert record["graphs_per_s"] == sum(expected_counts(i)[0] for i in batches) / elapsed
        assert record["data_s"] == 0.5
        assert record["forward_backward_s"] == (0.25 + 2.0) / 2
        assert record["optimizer_s"] == 0.25 / 2


class WithValidation(PosRegressor):
    def validation_step(self, batch, batch_idx):
        return None


def test_validation_is_left_out(tmp_path, monkeypatch):
    """The time from the last batch before a validation to the next batch is not training time."""
    monkeypatch.setattr(throughput, "perf_counter", ScriptedClock())
    cb = ThroughputCallback(every_n_steps=2)
    trainer = trainer_for(tmp_path, [cb], max_epochs=2, logger=False, val_check_interval=2)
    trainer.fit(WithValidation(), loader(), loader(1))
    # validation runs after the 2nd and 4th batch of each epoch; the batch after a mid-epoch
    # validation has no data time, the first batch of an epoch has (from on_train_epoch_start)
    assert [r["step"] for r in cb.history] == [2, 4, 6, 8]
    assert [r["elapsed_s"] for r in cb.history] == [5.5, 5.0, 5.5, 5.0]
    assert [r["data_s"] for r in cb.history] == [0.5, 0.25, 0.5, 0.25]
    assert [r["graphs_per_s"] for r in cb.history] == [5 / 5.5, 5 / 5.0, 5 / 5.5, 5 / 5.0]


def test_real_clock(tmp_path):
    """With the real clock: positive rates, and the parts of the window add up to its length."""
    cb = ThroughputCallback(every_n_steps=4)
    trainer_for(tmp_path, [cb], max_epochs=2, logger=False).fit(PosRegressor(), loader())
    assert [r["step"] for r in cb.history] == [4, 8]
    for record in cb.history:
        assert record["graphs_per_s"] > 0 and record["atoms_per_s"] > 0 and record["edges_per_s"] > 0
        parts = (record["data_s"] + record["forward_backward_s"] + record["optimizer_s"]) * record["batches"]
        assert parts == pytest.approx(record["elapsed_s"], rel=1e-9)
