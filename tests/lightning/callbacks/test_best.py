"""BestCheckpoint (top-k by a scripted metric) and BestMetricTracker (test loss at the best validation loss).

Oracles: the top-k epochs read off the scripted sequence by sorting; the test loss
recomputed by hand (mean squared error over the test set) from the weights recorded at
the best validation.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks.best import BestCheckpoint, BestMetricTracker
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402

VALUES = [3.0, 1.0, 2.0, 0.5, 0.7, 0.6, 0.9]


def fit(tmp_path, callbacks, values=VALUES, name="val_loss", **kwargs):
    dm = make_datamodule(n=20, val=0.2, test=0.3, batch_size=4)  # 10 training samples: 3 steps per epoch
    task = ToyTask(val_sequence=values, val_metric_name=name)
    trainer = make_trainer(tmp_path, callbacks, **{"max_epochs": len(values), **kwargs})
    trainer.fit(task, datamodule=dm)
    return trainer, task, dm


@pytest.mark.parametrize(("name", "values"), [("val_loss", VALUES), ("val_acc", [-v for v in VALUES])])
def test_top_k(tmp_path, name, values):
    best = BestCheckpoint(monitor=name, save_top_k=2)
    trainer, _, _ = fit(tmp_path, [best], values, name=name)
    order = sorted(range(len(values)), key=lambda e: values[e], reverse=name == "val_acc")[:2]
    kept = {torch.load(p, weights_only=False)["epoch"] for p in best.best_k_models}
    assert kept == set(order)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # no temporary file left
    assert len(files) == 2 and all(f.startswith("best-epoch=") for f in files)
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == order[0]
    assert float(best.best_model_score) == pytest.approx(values[order[0]])
    assert trainer.checkpoint_callback is best


def test_best_checkpoint_metric_never_logged(tmp_path):
    with pytest.raises(ConfigError, match=r"'val_los'.*Logged metrics: .*'val_loss'.*did you mean 'val_loss'"):
        fit(tmp_path, [BestCheckpoint(monitor="val_los", mode="min")])


class WeightsAtValidation(Callback):
    def __init__(self) -> None:
        self.weights: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def hand_mse(weights: dict, dataset) -> float:
    w, b = weights["net.weight"].double(), weights["net.bias"].double()
    errors = [
        float((dataset[i]["x"].double() @ w[0] + b[0] - dataset[i]["y"].double()) ** 2) for i in range(len(dataset))
    ]
    return sum(errors) / len(errors)


def test_tracker_records_test_loss_at_best_validation(tmp_path):
    recorder = WeightsAtValidation()
    tracker = BestMetricTracker(monitor="val_loss", track=["test_loss", "test_y_mae"], batch_size=4)
    logger = CSVLogger(tmp_path, name="run")
    trainer, _, dm = fit(tmp_path, [recorder, tracker], logger=logger)

    best_epoch = min(range(len(VALUES)), key=VALUES.__getitem__)
    assert (tracker.best_epoch, tracker.best_step) == (best_epoch, 3 * (best_epoch + 1))
    expected = hand_mse(recorder.weights[best_epoch], dm.datasets["test"])
    assert tracker.values["test_loss_at_best_val"] == pytest.approx(expected, rel=1e-5)
    assert set(tracker.values) == {"test_loss_at_best_val", "test_y_mae_at_best_val"}
    # the loggers got a value at each improvement (epochs 0, 1, 3), the last being the best
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        logged = [float(r["test_loss_at_best_val"]) for r in csv.DictReader(fh) if r.get("test_loss_at_best_val")]
    assert len(logged) == 3 and logged[-1] == pytest.approx(expected, rel=1e-5)
    # state for resume
    assert trainer.callback_metrics  # the fit ran validation
    assert tracker.state_dict()["values"] == tracker.values


def test_tracker_uses_ema_weights(tmp_path):
    ema = ExponentialMovingAverageCallback(decay=0.5, keep_raw_weights_after_fit=True)
    tracker = BestMetricTracker(monitor="val_loss", track="test_loss")
    fit(tmp_path, [ema, tracker], values=[1.0])
    # one epoch: the only validation is the best; the EMA at that point is the final EMA
    weights = {k: v.detach() for k, v in ema.ema_state_dict().items()}
    dm = make_datamodule(n=20, val=0.2, test=0.3, batch_size=4)
    dm.setup()
    assert tracker.values["test_loss_at_best_val"] == pytest.approx(hand_mse(weights, dm.datasets["test"]), rel=1e-5)


def test_tracker_unknown_tracked_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'test_los'.*did you mean 'test_loss'"):
        fit(tmp_path, [BestMetricTracker(track=["test_los"])], values=[1.0])


def test_tracker_name_format():
    tracker = BestMetricTracker(monitor="val_energy_mae", track=["test_energy_mae"])
    assert tracker.logged_name("test_energy_mae") == "test_energy_mae_at_best_val"
    with pytest.raises(ConfigError, match="name_format"):
        BestMetricTracker(name_format="{nope}")
