"""Batch-log progress lines (no redraws), their numbers against the training loop's own, rank-zero warnings."""

from __future__ import annotations

import io
import re
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

from matsciml.common.errors import ConfigError
from matsciml.lightning.progress import LogProgressBar, format_duration, show_warnings_on_rank_zero_only
from matsciml.runner.build import BAR_REFRESH_STEPS, runtime_callbacks

TRAIN_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train epoch (\d+)/(\d+) batch (\d+)/(\d+) step (\d+)/(\d+) \| loss (\S+) \| "
    r"(\S+) steps/s (\S+) samples/s \| elapsed (\d+:\d\d:\d\d) ETA (\d+:\d\d:\d\d)$"
)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _loader(self):
        x = torch.arange(30, dtype=torch.float32).reshape(10, 3) / 30
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=3)  # 3, 3, 3, 1

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(interval_s: float, epochs: int = 2) -> tuple[str, LossRecorder, pl.Trainer]:
    stream = io.StringIO()
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, LogProgressBar(interval_s=interval_s, stream=stream)],
    )
    trainer.fit(Tiny())
    return stream.getvalue(), recorder, trainer


def test_a_line_per_interval_with_the_loops_numbers():
    text, recorder, trainer = fit(interval_s=1e-9)
    assert "\r" not in text and "\x1b" not in text  # no redraws, no terminal control
    lines = text.splitlines()
    assert lines[0].endswith("start training: 8 optimizer steps, 1 process(es); a line every 1e-09 s")
    train = [TRAIN_LINE.match(line) for line in lines if " train epoch " in line]
    assert all(train) and len(train) == 8  # one per step at this interval
    for i, match in enumerate(train):
        epoch, epochs, batch, batches, step, steps, loss = match.groups()[:7]
        assert (int(epoch), int(epochs)) == (i // 4 + 1, 2)
        assert (int(batch), int(batches)) == (i % 4 + 1, 4)
        assert (int(step), int(steps)) == (i + 1, 8)
        assert float(loss) == pytest.approx(recorder.losses[i], rel=1e-3)  # the step's loss (printed to 4 digits)
    val = [line for line in lines if " val   epoch " in line]
    assert len(val) == 2
    value = float(re.search(r"val_loss (\S+)", val[-1]).group(1))
    assert value == pytest.approx(float(trainer.callback_metrics["val_loss"]), rel=1e-3)
    assert re.search(r"end training: 2 epoch\(s\), step 8, \d+:\d\d:\d\d in this run$", lines[-1])


def test_long_interval_writes_the_first_step_and_the_mean_loss_of_a_window():
    text, recorder, _ = fit(interval_s=3600.0)
    train = [TRAIN_LINE.match(line) for line in text.splitlines() if " train epoch " in line]
    assert len(train) == 1  # the first step only
    assert float(train[0].group(7)) == pytest.approx(recorder.losses[0], rel=1e-3)


def test_mean_loss_over_the_window(monkeypatch):
    """A clock at 10 s per step and a 50 s interval: lines after steps 1 and 6; the second has the mean of 2..6."""
    now = {"t": 0.0}

    class Clock(Callback):  # runs before the bar: the step's time is set when the bar looks
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now["t"] = 10.0 * trainer.global_step

    monkeypatch.setattr("matsciml.lightning.callbacks.progress.time.monotonic", lambda: now["t"])
    stream = io.StringIO()
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, Clock(), LogProgressBar(interval_s=50.0, stream=stream)],
    )
    trainer.fit(Tiny())
    train = [TRAIN_LINE.match(line) for line in stream.getvalue().splitlines() if " train epoch " in line]
    assert [m.group(5) for m in train] == ["1", "6"]
    window = recorder.losses[1:6]
    assert float(train[1].group(7)) == pytest.approx(sum(window) / len(window), rel=1e-3)
    assert float(train[1].group(8)) == pytest.approx(5 / 50)  # 5 steps in 50 s
    assert train[1].group(10) == "0:01:00" and train[1].group(11) == "0:00:20"  # 6 steps in 60 s, 2 to go


def test_not_rank_zero_writes_nothing():
    bar = LogProgressBar(stream=io.StringIO())
    bar._trainer = SimpleNamespace(is_global_zero=False)
    assert bar.is_disabled
    bar._trainer = SimpleNamespace(is_global_zero=True)
    assert bar.is_enabled
    bar.disable()
    assert not bar.is_enabled


def test_arguments_and_durations():
    with pytest.raises(ConfigError, match="interval_s"):
        LogProgressBar(interval_s=0)
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?" and format_duration(None) == "?"


def test_runner_uses_batch_logs_when_stdout_is_not_a_terminal():
    def bars(callbacks):
        return [type(cb).__name__ for cb in callbacks if isinstance(cb, pl.callbacks.ProgressBar)]

    assert bars(runtime_callbacks([], {}, stdout_is_terminal=False)) == ["LogProgressBar"]
    (terminal,) = [cb for cb in runtime_callbacks([], {}, stdout_is_terminal=True) if isinstance(cb, TQDMProgressBar)]
    assert terminal.refresh_rate == BAR_REFRESH_STEPS == 10  # Lightning's bar, not redrawn at every step
    assert bars(runtime_callbacks([], {"enable_progress_bar": False}, stdout_is_terminal=False)) == []
    mine = TQDMProgressBar()
    assert bars(runtime_callbacks([mine], {}, stdout_is_terminal=False)) == ["TQDMProgressBar"]


def test_warnings_from_rank_zero_only(monkeypatch):
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, n, file=None, line=None: stream.write(f"{m}\n"))
        show_warnings_on_rank_zero_only()
        show_warnings_on_rank_zero_only()  # idempotent: one wrapper
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        warnings.warn("the same on every rank", UserWarning, stacklevel=1)
        warnings.warn("[rank: 1] only this rank saw a NaN", UserWarning, stacklevel=1)
        monkeypatch.setattr(rank_zero_only, "rank", 0)
        warnings.warn("from rank zero", UserWarning, stacklevel=1)
    assert stream.getvalue().splitlines() == ["[rank: 1] only this rank saw a NaN", "from rank zero"]
