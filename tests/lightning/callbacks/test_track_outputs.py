"""TrackOutputsCallback: validation output statistics against numpy over the same predictions; collapse warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _callback_toys import ToyTask, make_datamodule, make_trainer

from matsciml.lightning.callbacks import TrackOutputsCallback
from matsciml.lightning.callbacks._utils.reporting import TrainingDynamicsWarning


class ConstantTask(ToyTask):
    def forward(self, batch):
        return {"y": self.net(batch["x"]).squeeze(-1) * 0.0 + self.net.bias}


def _val_predictions(task, dm):
    task.eval()
    with torch.no_grad():
        return torch.cat([task(b)["y"] for b in dm.val_dataloader()]).double().numpy()


def test_mean_and_std_match_numpy_over_the_validation_predictions(tmp_path):
    dm = make_datamodule(n=20, val=0.4, batch_size=3)
    task = ToyTask()
    cb = TrackOutputsCallback()
    make_trainer(tmp_path, [cb], max_epochs=2).fit(task, datamodule=dm)
    assert len(cb.history) == 2
    preds = _val_predictions(task, dm)  # the weights after the last epoch = those of the last validation
    last = cb.history[-1]["y"]
    assert last["count"] == len(preds) == 8
    assert last["mean"] == pytest.approx(preds.mean(), rel=1e-6)
    assert last["std"] == pytest.approx(preds.std(ddof=1), rel=1e-6)
    assert "collapsed" not in last


def test_collapsed_head_is_reported(tmp_path):
    dm = make_datamodule(n=20, val=0.4, batch_size=3)
    cb = TrackOutputsCallback()
    with pytest.warns(TrainingDynamicsWarning, match="head 'y' have collapsed"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(ConstantTask(), datamodule=dm)
    assert cb.history[-1]["y"]["collapsed"] is True
    assert cb.history[-1]["y"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(cb.history[-1]["y"]["mean"])
