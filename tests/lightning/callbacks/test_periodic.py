"""PeriodicCallback: argument checks, call sequences against hand-computed ones, identical sequences after resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.periodic import PeriodicCallback, check_period, infer_batch_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402


class Recorder(PeriodicCallback):
    """Records every periodic call and every track call; the calls travel in the checkpoint."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int, int]] = []
        self.tracked: list[int] = []

    def track(self, trainer, pl_module, batch, outputs):
        self.tracked.append(int(batch["batch_size"]))

    def periodic(self, trainer, pl_module, interval_type, interval):
        self.calls.append((interval_type, interval, trainer.global_step))

    def state_dict(self):
        return {**super().state_dict(), "calls": list(self.calls)}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.calls = [tuple(c) for c in state_dict["calls"]]


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"every_n_epochs": 1, "every_n_updates": 2}, {"every_n_samples": 0}, {"every_n_updates": 1.5}],
)
def test_exactly_one_valid_period(kwargs):
    with pytest.raises(ConfigError) as info:
        Recorder(**kwargs)
    message = str(info.value)
    if len(kwargs) != 1:
        assert all(n in message for n in ("every_n_epochs", "every_n_updates", "every_n_samples"))
    else:
        assert next(iter(kwargs)) in message


def test_check_period_rejects_bool():
    with pytest.raises(ConfigError, match="integer >= 1"):
        check_period("X", every_n_epochs=True, every_n_updates=None)


def test_state_keys_tell_instances_apart():
    keys = {
        Recorder(every_n_epochs=1).state_key,
        Recorder(every_n_epochs=2).state_key,
        Recorder(every_n_updates=2).state_key,
        Recorder(every_n_updates=2, name="b").state_key,
    }
    assert len(keys) == 4


def test_infer_batch_size():
    assert infer_batch_size({"batch_size": 5, "x": torch.zeros(2)}) == 5
    assert infer_batch_size({"ids": ["a", "b", "c"]}) == 3
    assert infer_batch_size([torch.zeros(7, 2), torch.zeros(7)]) == 7


# ---------------------------------------------------------------------------- sequences
def _expected_sample_calls(batch_sizes: list[int], n: int) -> list[int]:
    """Hand-written rule: a call after each batch whose cumulative count crosses a multiple of n."""
    out, total = [], 0
    for size in batch_sizes:
        before, total = total, total + size
        if total // n > before // n:
            out.append(total)
    return out


def test_call_sequences(tmp_path):
    # 10 training samples, batch 4: batches of 4, 4, 2 per epoch; 3 epochs; 2 batches per optimizer step
    dm = make_datamodule(n=10, batch_size=4)
    samples = Recorder(every_n_samples=6)
    updates = Recorder(every_n_updates=2)
    epochs = Recorder(every_n_epochs=2)
    trainer = make_trainer(tmp_path, [samples, updates, epochs], max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(ToyTask(), datamodule=dm)

    sizes = [4, 4, 2] * 3
    assert samples.tracked == sizes  # track: every micro-batch
    assert [c[1] for c in samples.calls] == _expected_sample_calls(sizes, 6) == [8, 14, 18, 24, 30]
    # optimizer steps after batches 2 and 3 of each epoch (Lightning steps on the last, incomplete group)
    assert trainer.global_step == 6
    assert updates.calls == [("updates", 2, 2), ("updates", 4, 4), ("updates", 6, 6)]
    assert epochs.calls == [("epochs", 2, 4)]
    assert [c.num_periodic_calls for c in (samples, updates, epochs)] == [5, 3, 1]


def test_resume_gives_the_same_call_sequence(tmp_path):
    def callbacks():
        return [Recorder(every_n_samples=5), Recorder(every_n_updates=2), Recorder(every_n_epochs=1)]

    dm_kwargs = dict(n=10, batch_size=4)  # 3 steps per epoch
    full = callbacks()
    make_trainer(tmp_path / "full", full, max_epochs=4).fit(ToyTask(), datamodule=make_datamodule(**dm_kwargs))

    # interrupted: a checkpoint after step 5 (in the middle of epoch 2), then a new process resumes from it
    first = callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="s{step}")
    make_trainer(tmp_path / "a", [*first, ckpt], max_steps=5).fit(ToyTask(), datamodule=make_datamodule(**dm_kwargs))
    path = tmp_path / "ckpt" / "sstep=5.ckpt"
    assert path.exists()
    second = callbacks()
    trainer = make_trainer(tmp_path / "b", second, max_epochs=4)
    trainer.fit(ToyTask(), datamodule=make_datamodule(**dm_kwargs), ckpt_path=str(path))

    assert trainer.global_step == 12
    for resumed, reference in zip(second, full):
        assert resumed.calls == reference.calls
    assert second[0].samples_seen == full[0].samples_seen == 40
    assert [c[1] for c in full[0].calls] == _expected_sample_calls([4, 4, 2] * 4, 5)
    assert [c[1] for c in full[2].calls] == [1, 2, 3, 4]


class SaveAtStep(Callback):
    """Writes a checkpoint in on_train_batch_end *before* the callbacks after it have seen the step."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


def test_resume_from_a_checkpoint_written_before_the_callback_saw_the_step(tmp_path):
    path = tmp_path / "early.ckpt"
    full = Recorder(every_n_updates=5)
    make_trainer(tmp_path / "a", [SaveAtStep(path, 5), full], max_epochs=4).fit(
        ToyTask(), datamodule=make_datamodule(n=10, batch_size=4)
    )
    assert [c[1] for c in full.calls] == [5, 10]
    assert torch.load(path, weights_only=False)["callbacks"][full.state_key]["last_step"] == 4
    resumed = Recorder(every_n_updates=5)
    make_trainer(tmp_path / "b", [resumed], max_epochs=4).fit(
        ToyTask(), datamodule=make_datamodule(n=10, batch_size=4), ckpt_path=str(path)
    )
    assert resumed.calls == full.calls


def test_documented_example_runs(tmp_path, monkeypatch):
    """The runnable example of docs/callbacks_core.rst (its first python block) runs and its assertion holds."""
    rst = Path(__file__).resolve().parents[3] / "docs" / "callbacks_core.rst"
    if not rst.exists():
        pytest.skip(f"{rst} not found")
    text = rst.read_text()
    start = text.index("# example: periodic callback")
    lines = []
    for line in text[start:].splitlines():
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    monkeypatch.chdir(tmp_path)
    exec(compile("\n".join(lines), str(rst), "exec"), {"__name__": "doc_example"})
