"""Other frameworks' callback spellings (Noether, luxonis-train) through the builder and the runner."""
# ruff: noqa: F811 - the fixture `configs` is imported from test_runner

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from matsciml.lightning.callbacks import (
    BestCheckpoint,
    BestMetricTracker,
    ExponentialMovingAverageCallback,
    FixedBudgetStopping,
    MetadataLogger,
)
from matsciml.lightning.callbacks._base.every import EveryN
from matsciml.lightning.callbacks.builder import build_callback
from matsciml.runner.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import write_dedented  # noqa: E402
from test_runner import argv, configs, experiment  # noqa: E402, F401 - the shared config tree fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning" / "callbacks"))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("EMACallback", ExponentialMovingAverageCallback),
        ("BestCheckpointCallback", BestCheckpoint),
        ("BestMetricCallback", BestMetricTracker),
        ("CheckpointCallback", ModelCheckpoint),
    ],
)
def test_class_names_of_other_frameworks(kind, cls):
    assert type(build_callback({"kind": kind})) is cls
    assert type(build_callback({"class_path": kind})) is cls


def test_fixed_update_early_stopping_and_argument_names():
    assert isinstance(build_callback({"kind": "FixedUpdateEarlyStopping", "max_updates": 5}), FixedBudgetStopping)
    ema = build_callback({"kind": "EMACallback", "decay": 0.9, "use_dynamic_decay": True, "decay_tau": 2000})
    assert (ema.warmup, ema.decay_tau, ema.decay) == ("exponential", 2000.0, 0.9)
    off = build_callback({"class_path": "EMACallback", "init_args": {"use_dynamic_decay": False}})
    assert off.warmup == "none"
    meta = build_callback({"kind": "MetadataLogger", "hyperparams": ["lr", "batch_size"]})
    assert isinstance(meta, MetadataLogger) and meta.keys == ["lr", "batch_size"]


class Counter(Callback):
    def __init__(self):
        self.epochs, self.steps = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(
    ("period", "expected_epochs", "expected_steps"),
    [
        # 12 samples, batch 4: 3 steps per epoch, 5 epochs (steps 1..15 after each batch)
        ({"every_n_epochs": 2}, [2, 4], [4, 5, 6, 10, 11, 12]),
        ({"every_n_updates": 4}, [], [4, 8, 12]),
        ({"every_n_samples": 20}, [], [5, 10, 15]),  # 20, 40, 60 samples crossed in batches 5, 10, 15
    ],
)
def test_any_callback_gets_a_period(tmp_path, period, expected_epochs, expected_steps):
    counter = Counter()
    wrapped = build_callback({"kind": Counter, **period, "name": "counted"})
    assert isinstance(wrapped, EveryN) and wrapped.name == "counted"
    wrapped.callback = counter  # count through a fresh instance we keep a handle to
    wrapped.__init__(counter, **period, name="counted")
    make_trainer(tmp_path, [wrapped], max_epochs=5).fit(ToyTask(), datamodule=make_datamodule(n=12, batch_size=4))
    # every_n_updates / every_n_samples gate on_train_epoch_end by the last batch of the epoch
    if "every_n_epochs" not in period:
        last = {3 * e for e in range(1, 6)}
        expected_epochs = [s // 3 for s in expected_steps if s in last]
    assert counter.steps == expected_steps
    assert counter.epochs == expected_epochs


def test_name_on_a_callback_without_a_period():
    cb = build_callback({"kind": "LearningRateMonitor", "name": "lr"})
    assert isinstance(cb, LearningRateMonitor) and cb.name == "lr"


NOETHER = """\
generic: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
debug: {accelerator: cpu, limit_train_batches: 3, limit_val_batches: 2}
callbacks:
  - kind: EMACallback
    decay: 0.9
  - kind: BestCheckpointCallback
    monitor: val_loss
  - kind: LearningRateMonitor
    every_n_epochs: 2
loggers:
  - class_path: lightning.pytorch.loggers.CSVLogger
"""

LUXONIS = """\
generic: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
debug: {accelerator: cpu, limit_train_batches: 3, limit_val_batches: 2}
callbacks:
  - class_path: EMACallback
    init_args: {decay: 0.5, use_dynamic_decay: true, decay_tau: 2000}
  - class_path: MetadataLogger
    init_args: {hyperparams: [lr]}
loggers:
  - class_path: lightning.pytorch.loggers.CSVLogger
"""


def _run(configs, tmp_path, text):
    trainer = write_dedented(tmp_path / "trainer.yaml", text)
    args = argv(configs, configs / "experiments" / "energy.yaml", tmp_path / "run")
    args[args.index("-t") + 1] = str(trainer)
    return main(args)


def test_noether_style_yaml_runs_through_the_runner(configs, tmp_path):
    result = _run(configs, tmp_path, NOETHER)
    kinds = [type(cb).__name__ for cb in result.trainer.callbacks]
    assert "ExponentialMovingAverageCallback" in kinds and "BestCheckpoint" in kinds and "EveryN" in kinds
    with open(result.run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    lr_steps = {int(r["step"]) for r in rows if any(k.startswith("lr-") and r[k] for k in r)}
    assert lr_steps == {3, 4, 5}  # 3 batches per epoch: the learning rate is logged in the second epoch only
    best = torch.load(result.best_checkpoint, weights_only=True, map_location="cpu")
    assert best["global_step"] > 0


def test_luxonis_style_yaml_runs_through_the_runner(configs, tmp_path):
    result = _run(configs, tmp_path, LUXONIS)
    ema = next(cb for cb in result.trainer.callbacks if isinstance(cb, ExponentialMovingAverageCallback))
    assert (ema.warmup, ema.decay_tau) == ("exponential", 2000.0)
    meta = next(cb for cb in result.trainer.callbacks if isinstance(cb, MetadataLogger))
    assert meta.keys == ["lr"]


class StopAtStep(Callback):
    """Raises StopTrainingError at the start of optimizer step ``step``."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from matsciml.lightning.callbacks import StopTrainingError

        if trainer.global_step == self.step:
            raise StopTrainingError("enough for this test")


def test_stop_training_error_through_the_runner_is_a_finished_run(configs, tmp_path):
    text = NOETHER.replace("callbacks:\n", "callbacks:\n  - {kind: test_callback_spellings.StopAtStep, step: 4}\n")
    result = _run(configs, tmp_path, text)
    assert result.preempted is None and result.trainer.global_step == 4
    stopped = result.run_dir / "checkpoints" / "stopped.ckpt"
    assert torch.load(stopped, weights_only=True, map_location="cpu")["global_step"] == 4
    assert "Validation MAE" in result.summary_text
