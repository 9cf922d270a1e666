"""Tests of the weight-EMA callback against independent oracles.

Oracles: hand-written float64 EMA recurrences fed with the raw weights recorded after
every optimizer step; ``torch_ema.ExponentialMovingAverage``; a run without the callback
(the raw weights must be bitwise those of training without EMA); an uninterrupted run
(resumed runs must end bitwise equal); losses recomputed by hand from saved weights.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_ema
from helpers import make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from torch import nn

from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils import ema_math as _ema_math
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))

from ema_ddp_script import FixedBatches, StatefulBatches, TinyRegressor, make_batches, task_batches  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

KEY = "ExponentialMovingAverageCallback"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids thread contention dominating the run time.

    Module scope, so that the module-scoped reference runs use the same thread count as the
    runs compared with them (float reductions depend on it).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- helpers


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class TorchEmaOracle(Callback):
    """torch-ema's average (decay 0.99) of the module's parameters, updated after every batch: the oracle."""

    def on_fit_start(self, trainer, pl_module):
        self.ema = torch_ema.ExponentialMovingAverage(pl_module.parameters(), decay=0.99)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ema.update()


class Recorder(Callback):
    """Records the weights at the start (after the first forward pass with lazy modules) and after every step."""

    def __init__(self) -> None:
        self.init: dict | None = None
        self.after: list[dict] = []
        self.last = None

    def on_train_start(self, trainer, pl_module):
        self.last = trainer.global_step
        if not any(nn.parameter.is_lazy(p) for p in pl_module.parameters()):
            self.init = snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.init is None:  # lazy modules: materialised by the first forward pass
            self.init = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            self.after.append(snapshot(pl_module))


def hand_ema(init, after, decay, warmup="none", tau=2000.0, every=1, start=0):
    """The EMA recurrence written out in float64, independent of ``_ema_math``."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in init.items()}
    n = 0
    for index, raw in enumerate(after):  # raw weights after optimizer step ``index`` (0-based)
        if index < start:
            ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in raw.items()}
            continue
        if (index - start) % every:
            continue
        n += 1
        d = decay
        if warmup == "torch_ema":
            d = min(decay, (1 + n) / (10 + n))
        elif warmup == "exponential":
            d = decay * (1 - math.exp(-n / tau))
        for k, v in raw.items():
            ema[k] = d * ema[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    return ema, n


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def losses_at(state: dict, batches: list) -> dict[str, float]:
    """Batch-size-weighted mean losses of a fresh TinyRegressor holding ``state``, in eval mode."""
    module = TinyRegressor()
    module.load_state_dict(state)
    module.eval()
    sums: dict[str, float] = {}
    weight = 0
    with torch.no_grad():
        for batch in batches:
            out = module.compute_losses(batch)
            for key, value in {"total": out["loss"], **out["per_key"]}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * out["batch_size"]
            weight += out["batch_size"]
    return {k: v / weight for k, v in sums.items()}


TRAIN = make_batches(num_batches=8, seed=0)
VAL = make_batches(num_batches=2, seed=1)


# ---------------------------------------------------------------------------- pure math
def test_effective_decay_schedules_against_hand_values():
    f = _ema_math.effective_decay
    assert f(0.99, 1, "none") == 0.99
    assert f(0.99, 1, "torch_ema") == pytest.approx(2 / 11, abs=1e-15)  # 0.181818...
    assert f(0.99, 100, "torch_ema") == pytest.approx(0.9181818181818182, abs=1e-15)
    assert f(0.99, 1000, "torch_ema") == 0.99  # (1001/1010 = 0.99109) capped at decay
    assert f(0.99, 2000, "exponential", 2000.0) == pytest.approx(0.6257993532402721, abs=1e-15)
    assert f(0.99, 1, "exponential", 2000.0) == pytest.approx(0.0004948762706224019, abs=1e-15)
    assert f(0.999, 20, "exponential", 10.0) == pytest.approx(0.8638000520466239, abs=1e-15)
    assert isinstance(f(0.99, 5, "torch_ema"), float)
    with pytest.raises(ConfigError, match="did you mean 'torch_ema'"):
        _ema_math.check_warmup("torch-ema")


def test_fused_update_and_copy_match_float64_formula():
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (7,), (), (2, 2, 2)]
    ema = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(5, generator=g, dtype=torch.float64)]
    cur = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in ema]
    expect = [0.93 * e.double() + 0.07 * c.double() for e, c in zip(ema, cur)]
    _ema_math.ema_update_(ema, cur, 0.93)
    for got, want in zip(ema, expect):
        assert (got.double() - want).abs().max().item() < 1e-6
    before = [e.clone() for e in ema]
    _ema_math.ema_update_(ema, cur, 1.0)  # decay 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(ema, before))
    _ema_math.ema_update_(ema, cur, 0.0)  # decay 0: exact copy
    assert all(torch.equal(a, b) for a, b in zip(ema, cur))
    ints = [torch.zeros(3, dtype=torch.int64)]
    _ema_math.copy_(ints, [torch.tensor([1, 2, 3])])
    assert ints[0].tolist() == [1, 2, 3]
    assert _ema_math.is_averaged(torch.zeros(1)) and not _ema_math.is_averaged(torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------------------- updates
@pytest.mark.parametrize(
    "settings, accumulate, lazy",
    [
        (dict(decay=0.9, warmup="none"), 1, False),
        (dict(decay=0.95, warmup="torch_ema"), 2, False),  # one update per optimizer step, not per batch
        (dict(decay=0.97, warmup="exponential", decay_tau=3.0, update_every_n_steps=3, start_step=2), 1, False),
        (dict(decay=0.9, warmup="torch_ema"), 1, True),  # LazyLinear materialised by the first forward pass
    ],
)
def test_updates_match_hand_written_recurrence(tmp_path, settings, accumulate, lazy):
    torch.manual_seed(0)
    module = TinyRegressor(lazy=lazy)
    recorder = Recorder()
    ema = ExponentialMovingAverageCallback(**settings)
    trainer = make_trainer(tmp_path, [recorder, ema], accumulate_grad_batches=accumulate, limit_val_batches=0)
    trainer.fit(module, FixedBatches(TRAIN))
    steps = 2 * len(TRAIN) // accumulate
    assert trainer.global_step == steps and len(recorder.after) == steps
    want, n = hand_ema(
        recorder.init,
        recorder.after,
        settings["decay"],
        settings["warmup"],
        settings.get("decay_tau", 2000.0),
        settings.get("update_every_n_steps", 1),
        settings.get("start_step", 0),
    )
    assert ema.num_updates == n
    got = module.state_dict()  # after fit the module holds the EMA weights
    assert max_diff(got, want) < 2e-6
    # the integer buffer is copied, not averaged
    assert got["encoder.2.num_batches_tracked"].dtype == torch.int64
    assert int(got["encoder.2.num_batches_tracked"]) == int(want["encoder.2.num_batches_tracked"])
    # raw weights are exactly those recorded after the last step
    assert max_diff(ema.raw_state_dict(), recorder.after[-1]) == 0.0
    if settings.get("start_step"):
        assert n == len(range(settings["start_step"], steps, settings["update_every_n_steps"]))


def test_matches_torch_ema_within_1e7_after_100_steps(tmp_path):
    torch.manual_seed(1)
    module = TinyRegressor()
    oracle = TorchEmaOracle()
    ema = ExponentialMovingAverageCallback(decay=0.99, warmup="torch_ema", keep_raw_weights_after_fit=True)
    trainer = make_trainer(tmp_path, [ema, oracle], max_epochs=-1, max_steps=100, limit_val_batches=0)
    trainer.fit(module, FixedBatches(TRAIN))
    assert ema.num_updates == oracle.ema.num_updates == 100
    mine = ema.ema_state_dict()
    names = [n for n, _ in module.named_parameters()]
    # within 1e-7, or one float32 rounding step (eps * |w|) for the LayerNorm weights near 1: the fused lerp
    # rounds once where torch-ema's subtract/multiply/subtract rounds three times
    eps = torch.finfo(torch.float32).eps
    for name, shadow in zip(names, oracle.ema.shadow_params):
        assert ((mine[name] - shadow).abs() <= 1e-7 + eps * shadow.abs()).all(), name
    # and the EMA is not trivially the raw weights
    assert max((mine[n] - p).abs().max().item() for n, p in module.named_parameters()) > 1e-3


def test_matches_torch_ema_within_1e7_after_100_steps_float64(tmp_path):
    """In float64 rounding is far below the tolerance: the absolute 1e-7 bound holds as stated."""
    torch.manual_seed(1)
    module = TinyRegressor().double()
    oracle = TorchEmaOracle()
    ema = ExponentialMovingAverageCallback(decay=0.99, warmup="torch_ema", keep_raw_weights_after_fit=True)
    trainer = make_trainer(tmp_path, [ema, oracle], max_epochs=-1, max_steps=100, limit_val_batches=0)
    trainer.fit(module, FixedBatches([(x.double(), y.double()) for x, y in TRAIN]))
    assert ema.num_updates == oracle.ema.num_updates == 100
    mine = ema.ema_state_dict()
    names = [n for n, _ in module.named_parameters()]
    worst = max((mine[n] - shadow).abs().max().item() for n, shadow in zip(names, oracle.ema.shadow_params))
    assert worst < 1e-7
    assert max((mine[n] - p).abs().max().item() for n, p in module.named_parameters()) > 1e-3


def test_import_torch_ema_state_then_continue(tmp_path):
    torch.manual_seed(2)
    module = TinyRegressor()
    tracked = module.encoder  # like a MACE model that became a task's encoder
    shadow = torch_ema.ExponentialMovingAverage(tracked.parameters(), decay=0.98)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for x, y in TRAIN * 2:
        optimizer.zero_grad()
        module.compute_losses((x, y))["loss"].backward()
        optimizer.step()
        shadow.update()
    state = shadow.state_dict()  # keys decay, num_updates, shadow_params, collected_params
    assert state["num_updates"] == 16

    class Continue(Callback):  # the oracle: the same torch-ema state, continued
        def on_fit_start(self, trainer, pl_module):
            self.ema = torch_ema.ExponentialMovingAverage(pl_module.encoder.parameters(), decay=0.5)
            self.ema.load_state_dict(state)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ema.update()

    head_before = module.head.weight.detach().clone()
    ema = ExponentialMovingAverageCallback.from_torch_ema_state(state, submodule="encoder")
    assert ema.decay == 0.98 and ema.warmup == "torch_ema"
    oracle = Continue()
    trainer = make_trainer(tmp_path, [ema, oracle], max_epochs=1, limit_val_batches=0, limit_train_batches=5)
    trainer.fit(module, FixedBatches(TRAIN))
    assert ema.num_updates == oracle.ema.num_updates == 21
    mine = ema.ema_state_dict()
    names = [f"encoder.{n}" for n, _ in module.encoder.named_parameters()]
    eps = torch.finfo(torch.float32).eps  # see test_matches_torch_ema_within_1e7_after_100_steps
    for name, shadow in zip(names, oracle.ema.shadow_params):
        assert ((mine[name] - shadow).abs() <= 1e-7 + eps * shadow.abs()).all(), name
    # the head was not tracked by torch-ema: its EMA started from the module's weights at fit start
    assert not torch.equal(mine["head.weight"], head_before)

    bad = ExponentialMovingAverageCallback.from_torch_ema_state(state)  # whole module: counts differ
    with pytest.raises(ConfigError, match="submodule="):
        make_trainer(tmp_path, [bad], max_steps=1, limit_val_batches=0).fit(TinyRegressor(), FixedBatches(TRAIN))
    with pytest.raises(ConfigError, match="shadow_params"):
        ExponentialMovingAverageCallback.from_torch_ema_state({"decay": 0.9})


# ---------------------------------------------------------------------------- which weights are used
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training with and without the callback (val every epoch, sanity check on)."""
    root = tmp_path_factory.mktemp("ema_runs")
    out = {}
    for name, callbacks in [
        ("plain", [Recorder()]),
        ("ema", [Recorder(), ExponentialMovingAverageCallback(decay=0.8, keep_raw_weights_after_fit=True)]),
    ]:
        torch.manual_seed(4)
        module = TinyRegressor()
        trainer = make_trainer(root / name, callbacks, num_sanity_val_steps=2)
        trainer.fit(module, FixedBatches(TRAIN), FixedBatches(VAL))
        out[name] = dict(module=module, trainer=trainer, recorder=callbacks[0], ema=callbacks[-1], root=root / name)
    return out


def test_training_uses_raw_weights_evaluation_uses_ema(runs):
    plain, run = runs["plain"], runs["ema"]
    ema, module, trainer = run["ema"], run["module"], run["trainer"]
    # training never saw the EMA weights: bitwise the same trajectory as without the callback
    for a, b in zip(plain["recorder"].after, run["recorder"].after):
        assert max_diff(a, b) == 0.0
    assert max_diff(module.state_dict(), plain["module"].state_dict()) == 0.0  # keep_raw_weights_after_fit
    want, _ = hand_ema(run["recorder"].init, run["recorder"].after, 0.8)
    assert max_diff(ema.ema_state_dict(), want) < 2e-6
    ema_losses = losses_at(ema.ema_state_dict(), VAL)
    raw_losses = losses_at(module.state_dict(), VAL)
    assert abs(ema_losses["total"] - raw_losses["total"]) > 1e-3
    # validation inside fit (last epoch) ran with the EMA weights, metric names unchanged
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(ema_losses["total"], rel=1e-5)
    # trainer.validate / test / predict swap the EMA in and back out
    metrics = trainer.validate(module, FixedBatches(VAL), verbose=False)[0]
    assert metrics["val_loss"] == pytest.approx(ema_losses["total"], rel=1e-5)
    assert trainer.test(module, FixedBatches(VAL), verbose=False)[0]["test_loss"] == pytest.approx(
        ema_losses["total"], rel=1e-5
    )
    predictions = torch.cat(trainer.predict(module, FixedBatches(VAL)))
    reference = TinyRegressor()
    reference.load_state_dict(ema.ema_state_dict())
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(predictions, torch.cat([reference(x) for x, _ in VAL]), atol=1e-6)
    assert ema.holding == "raw"
    assert max_diff(module.state_dict(), plain["module"].state_dict()) == 0.0


def test_checkpoint_layout_and_load_without_callback(runs, tmp_path):
    run = runs["ema"]
    ema, trainer = run["ema"], run["trainer"]
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert max_diff(checkpoint["state_dict"], ema.ema_state_dict()) == 0.0
    state = checkpoint["callbacks"][KEY]
    assert max_diff(state["raw"], runs["plain"]["module"].state_dict()) == 0.0
    assert state["num_updates"] == 16 and state["last_step"] == 16
    assert state["settings"] == dict(decay=0.8, warmup="none", decay_tau=2000.0, update_every_n_steps=1, start_step=0)
    # the task class alone (no callback) loads the EMA model; its metrics equal those with the callback
    loaded = TinyRegressor.load_from_checkpoint(path)
    assert max_diff(loaded.state_dict(), ema.ema_state_dict()) == 0.0
    bare = make_trainer(tmp_path / "bare", [])
    with_callback = make_trainer(tmp_path / "cb", [ExponentialMovingAverageCallback(decay=0.8)])
    m1 = bare.validate(loaded, FixedBatches(VAL), verbose=False)[0]
    m2 = with_callback.validate(TinyRegressor(), FixedBatches(VAL), ckpt_path=path, verbose=False)[0]
    assert m1["val_loss"] == pytest.approx(m2["val_loss"], rel=1e-6)
    assert m1["val_loss"] == pytest.approx(losses_at(ema.ema_state_dict(), VAL)["total"], rel=1e-5)


def test_fine_tune_from_ema_checkpoint(runs, tmp_path):
    path = tmp_path / "pretrained.ckpt"
    runs["ema"]["trainer"].save_checkpoint(path)
    ema_weights = runs["ema"]["ema"].ema_state_dict()
    # the whole task, as the runner's load_weights method 'checkpoint' does
    whole = TinyRegressor.load_from_checkpoint(path)
    assert max_diff(whole.state_dict(), ema_weights) == 0.0
    # the encoder only ('pretrained'), into a new task with a fresh head
    torch.manual_seed(11)
    fresh = TinyRegressor()
    saved = torch.load(path, weights_only=True)["state_dict"]
    fresh.encoder.load_state_dict({k[len("encoder.") :]: v for k, v in saved.items() if k.startswith("encoder.")})
    assert (
        max_diff(
            {"encoder." + k: v for k, v in fresh.encoder.state_dict().items()},
            {k: v for k, v in ema_weights.items() if k.startswith("encoder.")},
        )
        == 0.0
    )

    class AtStart(Callback):
        def __init__(self, ema):
            self.watched = ema

        def on_train_start(self, trainer, pl_module):
            self.ema = {k: v.clone() for k, v in self.watched.ema_state_dict().items()}

    for model in (whole, fresh):
        start = snapshot(model)
        callback = ExponentialMovingAverageCallback(decay=0.9)
        probe = AtStart(callback)
        trainer = make_trainer(tmp_path / "ft", [callback, probe], max_steps=2, limit_val_batches=0)
        trainer.fit(model, FixedBatches(TRAIN))
        assert max_diff(probe.ema, start) == 0.0  # the new EMA starts from the loaded weights
        assert callback.num_updates == 2


def test_exception_during_validation_leaves_raw_weights_and_a_consistent_checkpoint(runs, tmp_path):
    torch.manual_seed(4)
    module = TinyRegressor()

    def fail(mod, hook, batch_idx):
        if hook == "validation_step" and mod.trainer.global_step == 16 and not mod.trainer.sanity_checking:
            raise KeyError("boom")

    module.probe = fail
    ema = ExponentialMovingAverageCallback(decay=0.8)
    checkpoint = OnExceptionCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = make_trainer(tmp_path, [ema, checkpoint], num_sanity_val_steps=2)
    with pytest.raises(KeyError, match="boom"):
        trainer.fit(module, FixedBatches(TRAIN), FixedBatches(VAL))
    plain = runs["plain"]["recorder"]
    assert ema.holding == "raw"
    assert max_diff(module.state_dict(), plain.after[-1]) == 0.0
    files = glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))
    assert len(files) == 1
    saved = torch.load(files[0], weights_only=True)
    assert max_diff(saved["callbacks"][KEY]["raw"], plain.after[-1]) == 0.0
    want, _ = hand_ema(plain.init, plain.after, 0.8)
    assert max_diff(saved["state_dict"], want) < 2e-6


def test_scalar_regression_task_metrics_equal_checkpoint_loaded_without_callback(tmp_path):
    base = pytest.importorskip("matsciml.models.base")
    torch.manual_seed(6)
    task = base.ScalarRegressionTask(
        encoder_class="ema_ddp_script.FeatureEncoder",
        encoder_kwargs={"in_dim": 4, "embedding_dim": 8},
        task_keys=["energy"],
        output_kwargs={"hidden_dim": 8},
        lr=1e-2,
    )
    train, val = FixedBatches(task_batches(4, seed=0)), FixedBatches(task_batches(2, seed=1))
    ema = ExponentialMovingAverageCallback(decay=0.7, keep_raw_weights_after_fit=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(tmp_path, [ema, checkpoint], max_epochs=3)
    trainer.fit(task, train, val)
    during_fit = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    with_callback = trainer.validate(task, val, verbose=False)[0]  # swaps the EMA in for this call
    bare = make_trainer(tmp_path / "bare", [])
    loaded = base.ScalarRegressionTask.load_from_checkpoint(tmp_path / "ckpt" / "epoch=2.ckpt")
    without_callback = bare.validate(loaded, val, verbose=False)[0]
    assert set(with_callback) == set(without_callback) and "val_energy" in without_callback
    for key, value in without_callback.items():
        assert with_callback[key] == pytest.approx(value, rel=1e-6), key
        assert during_fit[key] == pytest.approx(value, rel=1e-6), key
    raw = base.ScalarRegressionTask.load_from_checkpoint(tmp_path / "ckpt" / "epoch=2.ckpt")
    raw.load_state_dict(torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)["callbacks"][KEY]["raw"])
    assert bare.validate(raw, val, verbose=False)[0]["val_loss"] != pytest.approx(without_callback["val_loss"])


def test_runner_load_weights_takes_the_ema_weights(tmp_path):
    """The runner's ``load_weights`` (both methods) gives the EMA weights of an EMA run's checkpoint."""
    base = pytest.importorskip("matsciml.models.base")
    from matsciml.runner.weights import load_weights

    def new_task():
        return base.ScalarRegressionTask(
            encoder_class="ema_ddp_script.FeatureEncoder",
            encoder_kwargs={"in_dim": 4, "embedding_dim": 8},
            task_keys=["energy"],
            output_kwargs={"hidden_dim": 8},
            lr=1e-2,
        )

    torch.manual_seed(7)
    task = new_task()
    ema = ExponentialMovingAverageCallback(decay=0.7, keep_raw_weights_after_fit=True)
    trainer = make_trainer(tmp_path, [ema], max_epochs=2, limit_val_batches=0)
    trainer.fit(task, FixedBatches(task_batches(4, seed=0)))
    path = tmp_path / "ema_run.ckpt"
    trainer.save_checkpoint(path)
    ema_weights, raw_weights = ema.ema_state_dict(), ema.raw_state_dict()
    assert max((ema_weights[k] - raw_weights[k]).abs().max().item() for k in ema_weights) > 1e-4

    whole = new_task()
    load_weights(whole, {"method": "checkpoint", "type": "local", "path": str(path)})
    for name, value in whole.state_dict().items():
        assert torch.equal(value, ema_weights[name]), name

    torch.manual_seed(99)
    encoder_only = new_task()
    heads_before = {k: v.clone() for k, v in encoder_only.output_heads.state_dict().items()}
    load_weights(encoder_only, {"method": "pretrained", "type": "local", "path": str(path)})
    for name, value in encoder_only.encoder.state_dict().items():
        assert torch.equal(value, ema_weights[f"encoder.{name}"]), name
    for name, value in encoder_only.output_heads.state_dict().items():
        assert torch.equal(value, heads_before[name]), name


# ---------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run that writes checkpoints at every kind of moment."""
    root = tmp_path_factory.mktemp("ema_resume")
    module, ema, trainer = _resumable_run(root, probes=True)
    return dict(
        root=root,
        ema={k: v.clone() for k, v in ema.ema_state_dict().items()},
        raw={k: v.clone() for k, v in ema.raw_state_dict().items()},
        num_updates=ema.num_updates,
    )


def _resumable_run(root, ckpt_path=None, probes=False, seed=0):
    torch.manual_seed(seed)
    module = TinyRegressor()
    ema = ExponentialMovingAverageCallback(decay=0.8, warmup="torch_ema")
    train = StatefulBatches(TRAIN)
    callbacks: list = [ema]
    callbacks.append(ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=3, save_top_k=-1, filename="{step}"))
    callbacks.append(ModelCheckpoint(dirpath=root / "val", monitor="val_loss", save_top_k=-1, filename="{step}"))
    callbacks.append(
        ModelCheckpoint(dirpath=root / "epoch", save_on_train_epoch_end=True, save_top_k=-1, filename="{step}")
    )
    if probes:

        class SaveBeforeEmaUpdate(Callback):  # runs before the EMA callback: its update is still pending
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == 10 and not (root / "before_update.ckpt").exists():
                    trainer.save_checkpoint(root / "before_update.ckpt")

        callbacks.insert(0, SaveBeforeEmaUpdate())
    trainer = make_trainer(root, callbacks, val_check_interval=4)
    train.trainer = trainer
    previous = None
    if probes:
        # a save from inside a signal handler, as Lightning's SLURM requeue handler does
        def handler(signum, frame):
            trainer.save_checkpoint(root / f"signal_step{trainer.global_step}.ckpt")

        previous = signal.signal(signal.SIGUSR1, handler)

        def probe(mod, hook, batch_idx):
            if hook == "validation_step" and mod.trainer.global_step == 12 and batch_idx == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # while the EMA weights are swapped in

        module.probe = probe
    try:
        trainer.fit(module, train, FixedBatches(VAL), ckpt_path=ckpt_path)
    finally:
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)
    return module, ema, trainer


def test_checkpoint_written_while_ema_is_swapped_in(reference_run):
    root = reference_run["root"]
    during_validation = torch.load(root / "signal_step12.ckpt", weights_only=True)
    at_batch_end = torch.load(root / "steps" / "step=12.ckpt", weights_only=True)  # same step, module held raw
    assert max_diff(during_validation["state_dict"], at_batch_end["state_dict"]) == 0.0
    assert max_diff(during_validation["callbacks"][KEY]["raw"], at_batch_end["callbacks"][KEY]["raw"]) == 0.0
    assert max_diff(during_validation["state_dict"], during_validation["callbacks"][KEY]["raw"]) > 1e-3


@pytest.mark.parametrize(
    "checkpoint",
    [
        "steps/step=9.ckpt",  # mid-epoch (epoch 1, batch 1 done)
        "epoch/step=8.ckpt",  # end of epoch 0
        "val/step=12.ckpt",  # ModelCheckpoint(monitor=...) at the end of a mid-epoch validation
        "signal_step12.ckpt",  # saved from a signal handler in the middle of validation
        "before_update.ckpt",  # saved after the optimizer step, before the EMA update of that step
    ],
)
def test_resume_is_bitwise_equal_to_uninterrupted_run(reference_run, tmp_path, checkpoint):
    path = reference_run["root"] / checkpoint
    assert path.exists(), sorted(str(p) for p in reference_run["root"].rglob("*.ckpt"))
    module, ema, trainer = _resumable_run(tmp_path, ckpt_path=path, seed=123)
    assert trainer.global_step == 16
    assert ema.num_updates == reference_run["num_updates"] == 16
    assert max_diff(ema.raw_state_dict(), reference_run["raw"]) == 0.0
    assert max_diff(ema.ema_state_dict(), reference_run["ema"]) == 0.0
    assert max_diff(module.state_dict(), reference_run["ema"]) == 0.0


# ---------------------------------------------------------------------------- evaluate_raw, lazy, guards
def test_evaluate_raw_logs_raw_metrics_and_gain(tmp_path):
    torch.manual_seed(5)
    module = TinyRegressor()
    ema = ExponentialMovingAverageCallback(decay=0.8, evaluate_raw=True, keep_raw_weights_after_fit=True)
    trainer = make_trainer(tmp_path, [ema], num_sanity_val_steps=1)
    trainer.fit(module, FixedBatches(TRAIN), FixedBatches(VAL))
    raw = losses_at(module.state_dict(), VAL)
    averaged = losses_at(ema.ema_state_dict(), VAL)
    metrics = trainer.callback_metrics
    for key in ("total", "y", "y_abs"):
        assert float(metrics[f"val_raw_{key}"]) == pytest.approx(raw[key], rel=1e-5)
        assert float(metrics[f"ema_gain_{key}"]) == pytest.approx(raw[key] - averaged[key], rel=1e-4, abs=1e-6)
    assert float(metrics["val_loss"]) == pytest.approx(averaged["total"], rel=1e-5)

    class NoProtocol(TinyRegressor):
        compute_losses = None

    with pytest.raises(ConfigError, match="compute_losses"):
        make_trainer(tmp_path, [ExponentialMovingAverageCallback(evaluate_raw=True)]).fit(
            NoProtocol(), FixedBatches(TRAIN)
        )


def test_lazy_module_never_materialised_is_named(tmp_path):
    class WithUnusedLazy(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.unused = nn.LazyLinear(3)

    with pytest.raises(ConfigError, match=r"unused \(LazyLinear\)"):
        make_trainer(tmp_path, [ExponentialMovingAverageCallback()], limit_val_batches=0).fit(
            WithUnusedLazy(), FixedBatches(TRAIN)
        )


def test_swap_guards_raise_with_a_diagnosis():
    module = TinyRegressor()
    ema = ExponentialMovingAverageCallback()
    ema.on_fit_start(None, module)
    ema._swap_in("validation start")
    with pytest.raises(RuntimeError, match="already holds the EMA weights.*validation start"):
        ema._swap_in("test start")
    with pytest.raises(RuntimeError, match="training ran on the EMA weights"):
        ema._update_for_step(3)
    ema._swap_out("validation end")
    with pytest.raises(RuntimeError, match="holds the raw weights already"):
        ema._swap_out("validation end")


def test_two_callbacks_and_bad_arguments_are_refused(tmp_path):
    # one EMA per trainer (the checkpoint's state_dict holds one); Lightning refuses a second one itself
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        make_trainer(tmp_path, [ExponentialMovingAverageCallback(), ExponentialMovingAverageCallback()])
    with pytest.raises(ConfigError, match="decay=1.5"):
        ExponentialMovingAverageCallback(decay=1.5)
    with pytest.raises(ConfigError, match="update_every_n_steps"):
        ExponentialMovingAverageCallback(update_every_n_steps=0)
    with pytest.raises(ConfigError, match="did you mean 'exponential'"):
        ExponentialMovingAverageCallback(warmup="exponentail")


# ---------------------------------------------------------------------------- YAML
YAML_BLOCK = """
callbacks:
  - class_path: matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback
    init_args:
      decay: 0.999
      warmup: exponential
      decay_tau: 500
      update_every_n_steps: 2
      start_step: 10
      device: cpu
      evaluate_raw: true
      keep_raw_weights_after_fit: true
      verbose: INFO
"""


def test_yaml_instantiate():
    import yaml

    spec = yaml.safe_load(YAML_BLOCK)["callbacks"][0]
    callback = instantiate(spec)
    assert isinstance(callback, ExponentialMovingAverageCallback)
    assert (callback.decay, callback.warmup, callback.decay_tau) == (0.999, "exponential", 500.0)
    assert (callback.update_every_n_steps, callback.start_step) == (2, 10)
    assert callback.device == torch.device("cpu")
    assert callback.evaluate_raw and callback.keep_raw_weights_after_fit and callback.verbose
    with pytest.raises(ConfigError, match="decay_ta"):
        instantiate({"class_path": spec["class_path"], "init_args": {"decay_taus": 3}})


def test_yaml_lightning_cli():
    jsonargparse = pytest.importorskip("jsonargparse")
    import yaml

    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_object(yaml.safe_load(YAML_BLOCK))
    callback = parser.instantiate(config).callbacks[0]
    assert isinstance(callback, ExponentialMovingAverageCallback) and callback.decay == 0.999


# ---------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_identical_ema_and_one_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(HERE / "ema_ddp_script.py"), str(tmp_path)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["num_updates"] == rank1["num_updates"] == 8  # 2 epochs x 4 batches per rank
    assert max_diff(rank0["ema"], rank1["ema"]) == 0.0  # batch-norm statistics included
    # raw parameters agree (DDP); raw batch-norm statistics are per rank, which is why the EMA syncs from rank 0
    params = [k for k in rank0["raw"] if "running" not in k and "num_batches" not in k]
    assert max_diff({k: rank0["raw"][k] for k in params}, {k: rank1["raw"][k] for k in params}) == 0.0
    assert (rank0["raw"]["encoder.2.running_mean"] - rank1["raw"]["encoder.2.running_mean"]).abs().max() > 1e-4
    assert max_diff(rank0["module"], rank0["ema"]) == 0.0  # after fit the module holds the EMA weights
    assert max_diff(rank0["ema"], rank0["raw"]) > 1e-3
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]  # one file per save, from rank 0
    last = torch.load(tmp_path / "ckpt" / files[-1], weights_only=True)
    assert max_diff(last["state_dict"], rank0["ema"]) == 0.0
    assert max_diff(last["callbacks"][KEY]["raw"], rank0["raw"]) == 0.0
