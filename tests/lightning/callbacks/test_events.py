"""Custom events: fired from a task's training_step and from a callback; who receives them, in which order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.isolation import IsolatedCallback
from matsciml.lightning.callbacks.events import event_receivers, fire_event

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402

LOG: list[tuple[str, str, dict]] = []


class Receiver(Callback):
    def __init__(self, label: str) -> None:
        self.label = label
        self.seen: list[tuple] = []

    @property
    def state_key(self) -> str:
        return f"Receiver[{self.label}]"

    def on_stage_changed(self, trainer, pl_module, **payload):
        self.seen.append((trainer.global_step, pl_module, payload))
        LOG.append((self.label, "on_stage_changed", payload))

    def on_batch_summary(self, trainer, pl_module, **payload):
        LOG.append((self.label, "on_batch_summary", payload))


class Bystander(Callback):
    """Defines no event method."""


class StageTask(ToyTask):
    def training_step(self, batch, batch_idx):
        if self.global_step == 2:
            self.reached = fire_event(self.trainer, "on_stage_changed", stage=2, step=self.global_step)
        return super().training_step(batch, batch_idx)


class Emitter(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fire_event(trainer, "on_batch_summary", batch_idx=batch_idx, size=batch["batch_size"])


def test_fired_from_training_step(tmp_path):
    LOG.clear()
    a, b = Receiver("a"), Receiver("b")
    task = StageTask()
    trainer = make_trainer(tmp_path, [a, Bystander(), b], max_steps=4)
    trainer.fit(task, datamodule=make_datamodule(n=16, batch_size=4))
    assert task.reached == [a, b]
    for receiver in (a, b):
        assert len(receiver.seen) == 1
        step, module, payload = receiver.seen[0]
        assert step == 2 and module is task and payload == {"stage": 2, "step": 2}
    assert [entry[0] for entry in LOG] == ["a", "b"]


def test_fired_from_a_callback(tmp_path):
    LOG.clear()
    a, b = Receiver("a"), Receiver("b")
    trainer = make_trainer(tmp_path, [a, Emitter(), b], max_steps=3)
    trainer.fit(ToyTask(), datamodule=make_datamodule(n=10, batch_size=4))  # batches of 4, 4, 2
    expected = []
    for batch_idx, size in enumerate([4, 4, 2]):
        expected += [(r, "on_batch_summary", {"batch_idx": batch_idx, "size": size}) for r in ("a", "b")]
    assert LOG == expected
    assert event_receivers(trainer, "on_batch_summary") == [a, b]
    assert fire_event(trainer, "on_nobody_listens") == []


class Recursive(Callback):
    def on_loop(self, trainer, pl_module):
        fire_event(trainer, "on_loop")


class FailingReceiver(IsolatedCallback):
    def on_stage_changed(self, trainer, pl_module, **payload):
        raise ValueError("bad payload")


def test_bad_names_and_recursion(tmp_path):
    trainer = make_trainer(tmp_path, [Recursive()], max_steps=1)
    for name in ("on_train_batch_end", "state_dict", "_private", "not an identifier", 3):
        with pytest.raises(ConfigError):
            fire_event(trainer, name)
    with pytest.raises(RuntimeError, match="fired again"):
        fire_event(trainer, "on_loop")


def test_isolated_receiver_failure_continues(tmp_path):
    failing = FailingReceiver(on_error="continue", error_checkpoint=False)
    after = Receiver("after")
    trainer = make_trainer(tmp_path, [failing, after], max_steps=4)
    with pytest.warns(UserWarning, match=r"FailingReceiver\.on_stage_changed raised ValueError: bad payload"):
        trainer.fit(StageTask(), datamodule=make_datamodule(n=16, batch_size=4))
    assert trainer.global_step == 4
    assert [(f.hook, f.step) for f in failing.failures] == [("on_stage_changed", 2)]
    assert len(after.seen) == 1  # the receivers after the failing one still got the event
