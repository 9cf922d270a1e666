"""Tests of ModelAutocorrelation.

Oracles: the autocorrelation written out with explicit Python loops in float64 and with
``numpy.correlate``; full copies of every parameter and gradient recorded at every
optimizer step, from which the sampled elements are taken again by hand; gradient descent
on a quadratic with a learning rate that overshoots, whose gradient flips sign each step.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks.autocorrelation import ModelAutocorrelation, autocorrelation

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import TinyTask, column, fit, make_batches, read_csv  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def hand_acf(series: list[float], lag: int) -> float:
    n = len(series)
    mean = sum(series) / n
    num = sum((series[t] - mean) * (series[t + lag] - mean) for t in range(n - lag))
    den = sum((x - mean) ** 2 for x in series)
    return num / den


def test_autocorrelation_matches_hand_computation_and_numpy():
    rng = np.random.default_rng(0)
    history = np.cumsum(rng.normal(size=(40, 5)), axis=0)
    history[:, 3] = 0.1  # constant (its float mean is not exactly 0.1): undefined
    history[7, 4] = np.nan  # non-finite: left out
    acf = autocorrelation(history, 6)
    assert acf.shape == (6, 5)
    for m in range(3):
        for lag in range(1, 7):
            assert acf[lag - 1, m] == pytest.approx(hand_acf(history[:, m].tolist(), lag), rel=1e-12)
        x = history[:, m] - history[:, m].mean()
        full = np.correlate(x, x, mode="full")[len(x) - 1 :]
        np.testing.assert_allclose(acf[:, m], full[1:7] / full[0], rtol=1e-12)
    assert np.isnan(acf[:, 3]).all() and np.isnan(acf[:, 4]).all()
    alternating = np.array([[(-1.0) ** t] for t in range(20)])
    assert autocorrelation(alternating, 1)[0, 0] == pytest.approx(-19 / 20)
    with pytest.raises(ValueError):
        autocorrelation(history, 40)


class FullRecorder(Callback):
    def __init__(self) -> None:
        self.params: dict[int, list[torch.Tensor]] = {}
        self.grads: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = [p for p in pl_module.parameters() if p.requires_grad]
        self.params[trainer.global_step] = [p.detach().clone().flatten() for p in params]
        self.grads[trainer.global_step] = [p.grad.detach().clone().flatten() for p in params]


def sampled(recorded: list[torch.Tensor], indices: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t[i] for t, i in zip(recorded, indices)]).numpy()


def test_logged_autocorrelation_equals_hand_computation_on_recorded_history(tmp_path):
    torch.manual_seed(0)
    recorder = FullRecorder()
    callback = ModelAutocorrelation(buffer_size=12, sample_frac=0.3, analyze_every_n_steps=12, max_lag=3)
    logger = CSVLogger(tmp_path, name="csv")
    caught = fit(TinyTask(), make_batches(12), tmp_path, [recorder, callback], max_steps=12, logger=logger)
    assert caught == []
    assert callback.last_step == 11
    rows = read_csv(tmp_path)
    for key, store in (("params", recorder.params), ("grads", recorder.grads)):
        history = np.stack([sampled(store[s], callback._indices) for s in range(12)])
        np.testing.assert_array_equal(callback.history(key), history)
        for lag in range(1, 4):
            values = [
                hand_acf(history[:, m].tolist(), lag)
                for m in range(history.shape[1])
                if len(set(history[:, m].tolist())) > 1
            ]
            logged = column(rows, f"autocorrelation/{key}_lag{lag}")
            assert logged == {11: pytest.approx(float(np.mean(values)), rel=1e-5, abs=1e-7)}
    (image,) = (Path(logger.log_dir) / "figures").glob("autocorrelation_step11.png")
    assert image.stat().st_size > 0
    sizes = [max(1, int(p.numel() * 0.3)) for p in TinyTask().parameters()]
    assert [len(i) for i in callback._indices] == sizes


def test_only_the_window_before_each_analysis_is_sampled(tmp_path):
    torch.manual_seed(0)
    recorder = FullRecorder()
    callback = ModelAutocorrelation(
        buffer_size=4, analyze_every_n_steps=10, max_lag=2, max_samples=50, log_images=False
    )
    fit(TinyTask(), make_batches(10), tmp_path, [recorder, callback], max_steps=10)
    assert callback._filled == 4 and callback.last_step == 9
    assert sum(len(i) for i in callback._indices) <= 50 + len(callback._indices)
    expected = np.stack([sampled(recorder.params[s], callback._indices) for s in range(6, 10)])
    np.testing.assert_array_equal(callback.history("params"), expected)


class Quadratic(LightningModule):
    """Loss 0.5 * |w - c|^2 under SGD with lr 1.8: w - c shrinks by -0.8 per step, the gradient flips sign."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(1.0, 2.0, 6))

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.w - 0.3).pow(2).sum() + 0.0 * batch["targets"]["energy"].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.8)


def test_oscillating_gradients_are_reported(tmp_path):
    callback = ModelAutocorrelation(buffer_size=10, analyze_every_n_steps=10, max_lag=2, sampled=False)
    caught = fit(Quadratic(), make_batches(10), tmp_path, [callback], max_steps=10)
    lag1 = float(np.nanmean(callback.last_acf["grads"][0]))
    series = [(-0.8) ** t for t in range(10)]  # the gradient of every element, up to a factor
    assert lag1 == pytest.approx(hand_acf(series, 1), rel=1e-4)
    (message,) = [str(w.message) for w in caught]
    assert "step 9" in message and f"{lag1:.3f}" in message and "oscillates" in message


class LazyModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)
        self.out = torch.nn.LazyLinear(1)

    def training_step(self, batch, batch_idx):
        graph = batch["graph"]
        atoms = self.out(self.embed(graph.atomic_numbers)).squeeze(-1)
        energy = torch.zeros(graph.num_graphs).index_add_(0, graph.batch, atoms)
        return torch.nn.functional.mse_loss(energy, batch["targets"]["energy"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lazy_parameters_are_tracked_once_materialised(tmp_path):
    torch.manual_seed(0)
    callback = ModelAutocorrelation(buffer_size=4, analyze_every_n_steps=4, max_lag=1, log_images=False)
    fit(LazyModel(), make_batches(4), tmp_path, [callback], max_steps=4)
    assert [len(i) for i in callback._indices] == [20, 1, 1]  # embedding 5 % of 400, LazyLinear weight [1, 4], bias
    assert callback.last_step == 3 and callback.history("grads").shape == (4, 22)


def test_config_errors():
    with pytest.raises(ConfigError):
        ModelAutocorrelation(buffer_size=3, max_lag=2)
    with pytest.raises(ConfigError):
        ModelAutocorrelation(sample_frac=0.0)
    with pytest.raises(ConfigError):
        ModelAutocorrelation(analyze_every_n_steps=0)
