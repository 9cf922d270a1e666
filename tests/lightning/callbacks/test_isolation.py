"""Failure isolation: the message names the callback, the error checkpoint exists and loads, stop vs continue."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.isolation import (
    CallbackError,
    CallbackFailureWarning,
    IsolatedCallback,
    is_isolated,
    isolate,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402


class RaiseAtStep(IsolatedCallback):
    def __init__(self, step: int = 3, always: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.always = always
        self.calls = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls += 1
        if trainer.global_step == self.step or (self.always and trainer.global_step >= self.step):
            raise ZeroDivisionError(f"boom at {trainer.global_step}")


class Counter(Callback):
    """A callback after the failing one: it must keep running under on_error='continue'."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def run(tmp_path, callbacks, max_steps=6):
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps)
    trainer.fit(ToyTask(), datamodule=make_datamodule(n=16, batch_size=2))
    return trainer


def check_error_checkpoint(tmp_path, name="RaiseAtStep", step=3):
    path = tmp_path / "checkpoints" / f"error-{name}-step{step}.ckpt"
    assert path.exists()
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == step
    task = ToyTask()
    task.load_state_dict(ckpt["state_dict"])  # the weights load into a fresh task
    assert not list(path.parent.glob(".partial-*"))
    return path


def test_stop(tmp_path):
    callback = RaiseAtStep(on_error="stop")
    counter = Counter()
    trainer = make_trainer(tmp_path, [callback, counter], max_steps=6)
    with pytest.raises(CallbackError) as info:
        trainer.fit(ToyTask(), datamodule=make_datamodule(n=16, batch_size=2))
    message = str(info.value)
    assert "RaiseAtStep.on_train_batch_end raised ZeroDivisionError: boom at 3" in message
    assert "step 3" in message and "on_error='stop'" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert trainer.global_step == 3 and counter.steps == [1, 2]
    path = check_error_checkpoint(tmp_path)
    assert str(path) in message
    assert info.value.failure.checkpoint == str(path)


def test_continue(tmp_path):
    callback = RaiseAtStep(on_error="continue")
    counter = Counter()
    with pytest.warns(CallbackFailureWarning, match=r"RaiseAtStep\.on_train_batch_end .*step 3.*continuing"):
        trainer = run(tmp_path, [callback, counter])
    assert trainer.global_step == 6 and counter.steps == [1, 2, 3, 4, 5, 6]
    assert callback.calls == 6
    assert [(f.callback, f.hook, f.step) for f in callback.failures] == [("RaiseAtStep", "on_train_batch_end", 3)]
    check_error_checkpoint(tmp_path)


def test_one_error_checkpoint_per_callback(tmp_path):
    callback = RaiseAtStep(step=2, always=True, on_error="continue")
    with pytest.warns(CallbackFailureWarning):
        run(tmp_path, [callback])
    assert [f.step for f in callback.failures] == [2, 3, 4, 5, 6]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["error-RaiseAtStep-step2.ckpt"]
    assert callback.failures[1].checkpoint is None


class PlainRaiser(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            raise KeyError("missing")


def test_isolate_a_plain_callback(tmp_path):
    plain = PlainRaiser()
    key = plain.state_key
    assert isolate(plain, on_error="continue") is plain and is_isolated(plain)
    assert isinstance(plain, PlainRaiser) and plain.state_key == key
    pickle.loads(pickle.dumps(plain))  # picklable (ddp_spawn pickles callbacks)
    with pytest.warns(CallbackFailureWarning, match="PlainRaiser.on_train_batch_end raised KeyError"):
        trainer = run(tmp_path, [plain])
    assert trainer.global_step == 6
    check_error_checkpoint(tmp_path, "PlainRaiser")


class Misconfigured(IsolatedCallback):
    def on_train_start(self, trainer, pl_module):
        raise ConfigError("monitor='x' is not logged")


def test_config_errors_pass_through(tmp_path):
    with pytest.raises(ConfigError, match="monitor='x'"):
        run(tmp_path, [Misconfigured(on_error="continue")])
    assert not (tmp_path / "checkpoints").exists()


def test_bad_on_error():
    with pytest.raises(ConfigError, match="'stop'.*'continue'"):
        RaiseAtStep(on_error="ignore")
