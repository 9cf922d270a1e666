"""Tests of UnusedParametersCallback.

Oracle: the parameters of a layer whose output is detached (known by construction) and,
for zero gradients, the parameters upstream of ``0.0 * h`` (exactly zero by autograd);
each name must be reported exactly once over a run with several checks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks.unused import UnusedParametersCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import PlainModule, TinyTask, column, fit, make_batches, read_csv  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

DETACHED = ["encoder.side.weight", "encoder.side.bias"]


def test_detached_layer_is_named_exactly_once(tmp_path):
    torch.manual_seed(0)
    callback = UnusedParametersCallback(every_n_steps=2)
    logger = CSVLogger(tmp_path, name="csv")
    caught = fit(TinyTask(detached=True), make_batches(7), tmp_path, [callback], max_steps=7, logger=logger)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert "step 0" in messages[0] and "no gradient" in messages[0]
    for name in DETACHED:
        assert sum(m.count(name + " ") for m in messages) == 1
    assert callback.reported_unused == set(DETACHED) and callback.reported_zero == set()
    # checked at steps 0, 2, 4, 6: the count is logged each time
    assert column(read_csv(tmp_path), "unused_parameters") == {0: 2.0, 2: 2.0, 4: 2.0, 6: 2.0}


def test_healthy_run_and_gradient_accumulation_report_nothing(tmp_path):
    torch.manual_seed(0)
    callback = UnusedParametersCallback(every_n_steps=1)
    assert fit(TinyTask(), make_batches(6), tmp_path, [callback], max_steps=3, accumulate_grad_batches=2) == []
    assert callback.reported_unused == set() and callback.reported_zero == set()


def test_zero_gradients_are_named_once(tmp_path):
    torch.manual_seed(0)
    callback = UnusedParametersCallback(every_n_steps=1)
    caught = fit(TinyTask(constant=True), make_batches(3), tmp_path, [callback], max_steps=3)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "exactly zero" in messages[0]
    expected = {"encoder.species.weight", "encoder.position.weight", "encoder.position.bias"}
    expected |= {f"encoder.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert callback.reported_zero == expected


def test_plain_module_and_state_round_trip(tmp_path):
    torch.manual_seed(0)
    callback = UnusedParametersCallback(every_n_steps=None, check_zero_gradients=False)
    caught = fit(PlainModule(), make_batches(3), tmp_path, [callback], max_steps=3)
    assert len(caught) == 1 and "unused.weight [2, 2]" in str(caught[0].message)
    restored = UnusedParametersCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.reported_unused == {"unused.weight", "unused.bias"}
    # a resumed run does not name them again
    assert fit(PlainModule(), make_batches(2), tmp_path, [restored], max_steps=2) == []


def test_config_errors():
    with pytest.raises(ConfigError):
        UnusedParametersCallback(every_n_steps=0)
    with pytest.raises(ConfigError):
        UnusedParametersCallback(max_names=0)
