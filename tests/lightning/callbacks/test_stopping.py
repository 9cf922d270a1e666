"""Stopping callbacks: the step at which they stop, against a hand-written rule; checkpoints; resume; NaN.

The validation metric is scripted (``ToyTask(val_sequence=...)``: one value per epoch), so
the epoch at which early stopping must happen follows from a few lines of arithmetic in
:func:`expected_stop_epoch`, written independently of the callback.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.metrics import infer_mode
from matsciml.lightning.callbacks.stopping import (
    FixedBudgetStopping,
    MetricEarlyStopping,
    NonFiniteError,
    TerminateOnNaN,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402


def expected_stop_epoch(values, patience, min_delta, rel=False, higher=False):
    """0-based epoch at whose validation the run stops, or None."""
    best, wait = None, 0
    for epoch, v in enumerate(values):
        sign = -1 if higher else 1
        if best is None:
            better = True
        else:
            threshold = min_delta * abs(best) if rel else min_delta
            better = sign * v < sign * best - threshold
        if better:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return None


def fit(tmp_path, callbacks, values=None, name="val_loss", ckpt_path=None, **kwargs):
    # 4 training samples, batch 4: one optimizer step per epoch, so global_step == epochs done
    dm = make_datamodule(n=6, val=0.34, batch_size=4)
    task = ToyTask(val_sequence=values, val_metric_name=name)
    trainer = make_trainer(tmp_path, callbacks, **{"max_epochs": 20, **kwargs})
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------------- mode from the name
@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("val_loss", "min"),
        ("val_energy_mae", "min"),
        ("test_mse", "min"),
        ("val_forces_rmse", "min"),
        ("val_error", "min"),
        ("val_acc", "max"),
        ("val_accuracy", "max"),
        ("val_auc", "max"),
        ("val_r2", "max"),
    ],
)
def test_mode_from_name(name, mode):
    assert infer_mode(name) == mode
    assert infer_mode(name, "max" if mode == "min" else "min") != mode


def test_mode_unknown_name_raises():
    with pytest.raises(ConfigError, match="mode: min or mode: max"):
        MetricEarlyStopping(monitor="val_energy")


# ---------------------------------------------------------------------------- metric early stopping
VALUES = [5.0, 4.0, 3.95, 3.7, 3.69, 3.72, 3.2, 3.19, 3.18, 3.3, 3.1, 3.0]


@pytest.mark.parametrize(
    ("patience", "min_delta", "rel"),
    [(2, 0.1, False), (3, 0.05, False), (2, 0.005, True), (1, 0.0, False)],
)
def test_early_stopping_step(tmp_path, patience, min_delta, rel):
    stop = MetricEarlyStopping(patience=patience, min_delta=min_delta, min_delta_mode="rel" if rel else "abs")
    trainer = fit(tmp_path, [stop], VALUES, max_epochs=len(VALUES))
    epoch = expected_stop_epoch(VALUES, patience, min_delta, rel)
    assert epoch is not None
    assert stop.stopped_step == trainer.global_step == epoch + 1
    path = tmp_path / "checkpoints" / f"stop-step{epoch + 1}.ckpt"
    assert path.exists() and not list(path.parent.glob(".partial-*"))
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == epoch + 1
    assert ckpt["callbacks"][stop.state_key]["wait"] == patience
    assert "val_loss did not improve" in stop.reason and f"step {epoch + 1}" in stop.reason


def test_absolute_threshold_differs_from_relative(tmp_path):
    # min_delta=0.005 absolute lets 3.70 -> 3.69 count; 0.5 % relative (0.0185) does not
    assert expected_stop_epoch(VALUES, 2, 0.005) is None
    stop = MetricEarlyStopping(patience=2, min_delta=0.005)
    trainer = fit(tmp_path, [stop], VALUES, max_epochs=len(VALUES))
    assert stop.stopped_step is None and trainer.global_step == len(VALUES)


def test_early_stopping_max_mode(tmp_path):
    values = [0.5, 0.6, 0.61, 0.7, 0.69, 0.68, 0.7, 0.9]
    stop = MetricEarlyStopping(monitor="val_acc", patience=2, min_delta=0.005)
    trainer = fit(tmp_path, [stop], values, name="val_acc")
    assert stop.mode == "max"
    assert trainer.global_step == expected_stop_epoch(values, 2, 0.005, higher=True) + 1 == 6


def test_early_stopping_resume(tmp_path):
    def make():
        return MetricEarlyStopping(patience=2, min_delta=0.1)

    reference = fit(tmp_path / "full", [make()], VALUES)
    first = fit(tmp_path / "a", [make()], VALUES, max_epochs=5)  # the wait count is 1 here
    first.save_checkpoint(tmp_path / "a.ckpt")
    stop = make()
    resumed = fit(tmp_path / "b", [stop], VALUES, ckpt_path=str(tmp_path / "a.ckpt"))
    assert resumed.global_step == reference.global_step == expected_stop_epoch(VALUES, 2, 0.1) + 1 == 6
    assert stop.best == pytest.approx(3.7) and stop.best_step == 4


def test_early_stopping_metric_never_logged(tmp_path):
    with pytest.raises(ConfigError, match=r"'val_los'.*never logged.*did you mean 'val_loss'"):
        fit(tmp_path, [MetricEarlyStopping(monitor="val_los", mode="min", patience=2)], VALUES)


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"min_delta": -1.0}, {"min_delta_mode": "percent"}])
def test_early_stopping_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        MetricEarlyStopping(**kwargs)


# ---------------------------------------------------------------------------- fixed budget
def fit_steps(tmp_path, callbacks, ckpt_path=None, **kwargs):
    # 8 training samples, batch 2: 4 optimizer steps per epoch, 2 samples per step
    trainer = make_trainer(tmp_path, callbacks, **{"max_epochs": 10, **kwargs})
    trainer.fit(ToyTask(), datamodule=make_datamodule(n=8, batch_size=2), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "step"),
    [({"max_updates": 7}, 7), ({"max_samples": 10}, 5), ({"max_samples": 11}, 6), ({"max_epochs": 2}, 8)],
)
def test_fixed_budget_stops_at(tmp_path, kwargs, step):
    stop = FixedBudgetStopping(**kwargs)
    trainer = fit_steps(tmp_path, [stop])
    assert trainer.global_step == stop.stopped_step == step
    ckpt = torch.load(tmp_path / "checkpoints" / f"stop-step{step}.ckpt", weights_only=False)
    assert ckpt["global_step"] == step


def test_fixed_budget_resume_after_budget_stops_at_once(tmp_path):
    trainer = fit_steps(tmp_path / "a", [FixedBudgetStopping(max_samples=10)])
    path = tmp_path / "a" / "checkpoints" / "stop-step5.ckpt"
    assert trainer.global_step == 5 and path.exists()
    # resume mid-budget: a checkpoint at step 3 continues to the same stop
    first = fit_steps(tmp_path / "b", [FixedBudgetStopping(max_samples=10)], max_steps=3)
    first.save_checkpoint(tmp_path / "b.ckpt")
    again = FixedBudgetStopping(max_samples=10)
    assert fit_steps(tmp_path / "c", [again], ckpt_path=str(tmp_path / "b.ckpt")).global_step == 5
    assert again.samples_seen == 10
    # resume from the stop checkpoint: the budget is spent, no further step
    spent = FixedBudgetStopping(max_samples=10)
    assert fit_steps(tmp_path / "d", [spent], ckpt_path=str(path)).global_step == 5
    assert "already spent" in spent.reason


def test_fixed_budget_needs_exactly_one():
    with pytest.raises(ConfigError, match="max_epochs, max_updates, max_samples"):
        FixedBudgetStopping(max_epochs=1, max_samples=3)


# ---------------------------------------------------------------------------- NaN
class NanAtStep(ToyTask):
    """The loss of optimizer step ``at`` (1-based) is NaN."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.at - 1 else loss


def test_nan_loss_stops_with_checkpoint(tmp_path):
    nan = TerminateOnNaN()
    trainer = make_trainer(tmp_path, [nan], max_epochs=5)
    with pytest.warns(UserWarning, match=r"training loss is nan at step 3"):
        trainer.fit(NanAtStep(3), datamodule=make_datamodule(n=8, batch_size=2))
    assert trainer.global_step == nan.stopped_step == 3
    path = tmp_path / "checkpoints" / "error-TerminateOnNaN-step3.ckpt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 3
    assert str(path) in nan.reason


def test_nan_metric_named(tmp_path):
    values = [1.0, 0.5, math.nan, 0.4]
    nan = TerminateOnNaN(monitor="val_loss", check_loss=False)
    with pytest.warns(UserWarning, match=r"metric 'val_loss' is nan at step 3"):
        trainer = fit(tmp_path, [nan], values)
    assert trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "error-TerminateOnNaN-step3.ckpt").exists()


def test_nan_raise_error(tmp_path):
    trainer = make_trainer(tmp_path, [TerminateOnNaN(raise_error=True)], max_epochs=5)
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.fit(NanAtStep(2), datamodule=make_datamodule(n=8, batch_size=2))
    assert trainer.global_step == 2


def test_nan_monitor_never_logged(tmp_path):
    with pytest.raises(ConfigError, match="val_mae"):
        fit(tmp_path, [TerminateOnNaN(monitor="val_mae")], VALUES)
