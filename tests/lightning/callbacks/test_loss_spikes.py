"""Tests of LossSpikeDetection.

Oracles: hand-computed medians and MADs; the losses of a run recorded independently
(``on_train_batch_end``) and scanned by a plain-Python reimplementation of the rule,
which must find exactly the spikes the callback reports; a batch with targets scaled by
1000 at a known step.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks.loss_spikes import LossSpikeDetection, find_spikes, is_spike

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import TinyTask, column, fit, make_batches, read_csv  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

SPIKE = 25


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def reference_spikes(losses: list[float], window: int, k: float, min_history: int) -> list[int]:
    """The rule written out again: indices whose loss is > k MADs from the median of the previous window."""
    found = []
    for i, value in enumerate(losses):
        history = losses[max(0, i - window) : i]
        if len(history) < min_history:
            continue
        median = statistics.median(history)
        mad = statistics.median(abs(x - median) for x in history)
        if abs(value - median) > k * max(mad, 1e-3 * abs(median), 1e-12):
            found.append(i)
    return found


def test_is_spike_against_hand_numbers():
    history = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD median(2, 1, 0, 1, 97) = 1
    assert is_spike(14.0, history, k=10.0) == (True, 3.0, 1.0)
    assert is_spike(12.0, history, k=10.0)[0] is False
    assert is_spike(-8.5, history, k=10.0)[0] is True
    assert is_spike(-8.5, history, k=10.0, direction="up")[0] is False
    assert is_spike(5.0 + 1e-3, [5.0] * 30, k=10.0)[0] is False  # MAD 0: floored at 1e-3 * |median|
    assert is_spike(5.1, [5.0] * 30, k=10.0)[0] is True


@pytest.mark.parametrize("direction", ["both", "up"])
def test_find_spikes_judges_each_value_as_is_spike_does(direction):
    """The windows judged together (full ones) and one by one (early ones) give is_spike's answer for each."""
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(60, generator=g) + 5.0).tolist()
    for i in (7, 15, 31, 44, 58):
        values[i] += 8.0 if i % 2 else -8.0
    expected = []
    for i in range(10, 60):
        history = values[max(0, i - 12) : i]
        if len(history) >= 4:
            spike, median, scale = is_spike(values[i], history, 3.0, direction)
            if spike:
                expected.append((i, median, scale))
    found = find_spikes(values, 10, window=12, min_history=4, k=3.0, direction=direction)
    assert [i for i, _, _ in found] == [i for i, _, _ in expected] and len(expected) >= 3
    assert found == expected  # the same medians and scales, to the last bit


def test_spike_at_a_known_step_names_the_step_and_the_ids(tmp_path):
    torch.manual_seed(0)
    batches = make_batches(30, spike_at=SPIKE)
    recorder = LossRecorder()
    callback = LossSpikeDetection(window=100, k=10.0, min_history=20)
    logger = CSVLogger(tmp_path, name="csv")
    caught = fit(TinyTask(lr=0.0), batches, tmp_path, [recorder, callback], max_steps=30, logger=logger)
    assert reference_spikes(recorder.losses, 100, 10.0, 20) == [SPIKE]
    assert callback.loss_spikes == 1 and [s["step"] for s in callback.spikes] == [SPIKE]
    assert callback.spikes[0]["ids"] == batches[SPIKE]["ids"]
    assert callback.spikes[0]["loss"] == pytest.approx(recorder.losses[SPIKE], rel=1e-6)
    (message,) = [str(w.message) for w in caught]
    assert f"step {SPIKE}" in message and all(i in message for i in batches[SPIKE]["ids"])
    logged = column(read_csv(tmp_path), "loss_spikes")
    assert logged[max(logged)] == 1.0 and all(v == 0.0 for s, v in logged.items() if s < SPIKE)


def test_training_run_finds_what_the_reference_rule_finds(tmp_path):
    torch.manual_seed(0)
    recorder = LossRecorder()
    callback = LossSpikeDetection(window=8, k=3.0, min_history=4, check_every_n_steps=3)
    fit(TinyTask(lr=0.05), make_batches(30), tmp_path, [recorder, callback], max_steps=30)
    expected = reference_spikes(recorder.losses, 8, 3.0, 4)
    assert expected  # a loose rule finds some spikes in an ordinary run: the comparison is not empty
    assert [s["step"] for s in callback.spikes] == expected


def test_healthy_run_is_silent_and_state_round_trips(tmp_path):
    torch.manual_seed(0)
    callback = LossSpikeDetection(min_history=5)
    assert fit(TinyTask(), make_batches(30), tmp_path, [callback], max_steps=30) == []
    assert callback.loss_spikes == 0
    other = LossSpikeDetection(min_history=5)
    other.load_state_dict(callback.state_dict())
    assert list(other._history) == list(callback._history) and len(other._history) == 30


def test_config_errors():
    with pytest.raises(ConfigError):
        LossSpikeDetection(window=10, min_history=20)
    with pytest.raises(ConfigError):
        LossSpikeDetection(k=0)
    with pytest.raises(ConfigError):
        LossSpikeDetection(direction="down")
    with pytest.raises(ConfigError):
        LossSpikeDetection(check_every_n_steps=0)
