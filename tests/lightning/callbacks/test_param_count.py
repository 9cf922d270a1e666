"""ParamCountCallback: counts per module group against a hand count of a known module; real CSV logger."""

from __future__ import annotations

import csv

import pytest
from _callback_toys import ToyTask, make_datamodule, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from matsciml.lightning.callbacks import ParamCountCallback
from matsciml.lightning.callbacks.param_count import count_parameters


def test_counts_match_a_hand_count_with_frozen_and_shared_parameters():
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))  # 16 + 25
    model.head = nn.Linear(5, 1)  # 6
    model.tied = model.head  # shared: counted once
    for p in model.encoder[0].parameters():
        p.requires_grad_(False)
    counts = count_parameters(model)
    assert counts["encoder"] == {"trainable": 25, "frozen": 16}
    assert counts["head"] == {"trainable": 6, "frozen": 0}
    assert "tied" not in counts
    assert counts["total"] == {"trainable": 31, "frozen": 16}
    assert count_parameters(model, depth=2)["encoder.1"] == {"trainable": 25, "frozen": 0}


def test_logged_at_fit_start(tmp_path):
    task = ToyTask()
    expected = sum(p.numel() for p in task.parameters())
    logger = CSVLogger(tmp_path, name="", version="")
    cb = ParamCountCallback()
    make_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(task, datamodule=make_datamodule(n=8))
    assert cb.counts["total"]["trainable"] == expected
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r.get("params/total/trainable") and float(r["params/total/trainable"]) == expected for r in rows)


def test_bad_depth():
    with pytest.raises(Exception, match="depth"):
        ParamCountCallback(depth=0)
