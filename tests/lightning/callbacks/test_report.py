"""Tests of TrainingDynamicsReport: the figure's file and panels, and the recorded series against their sources."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import log_scalars
from matsciml.lightning.callbacks.memory import PeakMemoryCallback
from matsciml.lightning.callbacks.report import PANEL_TITLES, TrainingDynamicsReport
from matsciml.lightning.callbacks.throughput import ThroughputCallback

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Regressor(pl.LightningModule):
    """Logs train_loss / val_loss like a task; a step LR schedule so the learning rate moves."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def loss(self, batch):
        x, y = batch["x"], batch["y"]
        return (self.head(torch.tanh(self.encoder(x))) - y).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["x"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), batch_size=len(batch["x"]))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(6, 4, generator=g)
        batches.append({"x": x, "y": x[:, :1].sin(), "natoms": torch.full((6,), 3)})
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


class FakeGradientMonitor(pl.Callback):
    """Sends grad_norm/* to the loggers the way a gradient monitor does, and remembers what it sent."""

    def __init__(self) -> None:
        self.sent: dict[str, dict[int, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        values = {
            "grad_norm/total": float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()),
            "grad_norm/encoder": float(torch.cat([p.grad.flatten() for p in pl_module.encoder.parameters()]).norm()),
        }
        for name, value in values.items():
            self.sent.setdefault(name, {})[trainer.global_step] = value
        log_scalars(trainer, values)


class FakeEMAGain(pl.Callback):
    """Logs ema_gain_total through pl_module.log at the end of validation, as the EMA callback does."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = 0.01 * (trainer.global_step + 1)
        self.sent[trainer.global_step] = value
        pl_module.log("ema_gain_total", value)


class Sources(pl.Callback):
    """Listed last: the training loss returned and the learning rate after every optimizer step."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[trainer.global_step] = float(outputs["loss"])
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def description(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["Description"]


def trainer_for(callbacks, logger, tmp_path, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=3,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def test_full_report_with_csv_logger(tmp_path):
    grads, gain, sources = FakeGradientMonitor(), FakeEMAGain(), Sources()
    throughput, memory = ThroughputCallback(every_n_steps=2), PeakMemoryCallback(every_n_steps=2)
    report = TrainingDynamicsReport(every_n_steps=1)
    logger = CSVLogger(tmp_path, name="exp")
    checkpoint = ModelCheckpoint(monitor="val_loss")
    trainer = trainer_for(
        [grads, gain, throughput, memory, report, checkpoint, sources], logger, tmp_path, enable_checkpointing=True
    )
    trainer.fit(Regressor(), loader(), loader(2, seed=1))

    path = Path(logger.log_dir) / "training_dynamics.png"
    assert report.path == path and path.exists()
    with Image.open(path) as image:
        assert image.size == (15 * 110, int(8.5 * 110))
        assert "exp/version_0" in image.text["Title"] and "12 optimizer steps, 3 epochs" in image.text["Title"]
    assert description(path) == "panels: " + "; ".join(PANEL_TITLES)
    assert report.panel_titles == PANEL_TITLES  # no panel says "not recorded"

    # the recorded series are the values their sources produced
    series = report.series
    assert series["train_loss"] == pytest.approx(sources.loss)
    assert series["lr/group0"] == pytest.approx(sources.lr)
    assert series["lr/group0"] == pytest.approx({k: 0.1 * 0.5 ** (k // 3) for k in range(1, 13)})  # StepLR
    for name, sent in grads.sent.items():
        assert series[name] == pytest.approx(sent)
    assert series["ema_gain_total"] == pytest.approx(gain.sent)
    assert list(series["val_loss"]) == [4, 8, 12]
    tp = {int(r["step"]): r["graphs_per_s"] for r in throughput.history}
    assert series["throughput/graphs_per_s"] == pytest.approx(tp)
    mem = {int(r["step"]): r["memory/rss_mb"] for r in memory.history}
    assert series["memory/rss_mb"] == pytest.approx(mem)

    # the listener logger is gone after fit and did not move the checkpoints
    assert trainer.loggers == [logger]
    assert Path(checkpoint.best_model_path).parent == Path(logger.log_dir) / "checkpoints"


def test_missing_panels_say_what_to_enable(tmp_path):
    report = TrainingDynamicsReport()
    trainer = trainer_for([report], False, tmp_path, max_epochs=1)
    trainer.fit(Regressor(), loader())
    path = tmp_path / "training_dynamics.png"
    assert path.exists()
    titles = dict(zip(PANEL_TITLES, report.panel_titles))
    assert titles["Loss"] == "Loss" and titles["Learning rate"] == "Learning rate"
    for panel in PANEL_TITLES[2:]:
        assert titles[panel] == f"{panel}: not recorded"
    figure = report.make_figure()
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    assert any("MonitorGradients" in t and "logger" in t for t in texts)
    assert any("ExponentialMovingAverageCallback\n(evaluate_raw=True)" in t for t in texts)
    assert any("ThroughputCallback" in t for t in texts) and any("PeakMemoryCallback" in t for t in texts)
    # the default period is the trainer's log_every_n_steps (1 here), plus the first step
    assert sorted(report.series["train_loss"]) == [1, 2, 3, 4]


def test_tensorboard_logger_writes_the_file_too(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, name="tb")
    report = TrainingDynamicsReport(filename="dynamics.png", every_n_steps=2)
    trainer_for([ThroughputCallback(every_n_steps=2), report], logger, tmp_path, max_epochs=2).fit(
        Regressor(), loader()
    )
    path = Path(logger.log_dir) / "dynamics.png"
    assert path.exists() and "Throughput" in description(path).split("; ")
    assert sorted(report.series["throughput/graphs_per_s"]) == [2, 4, 6, 8]


def test_state_round_trip_and_failed_run(tmp_path):
    report = TrainingDynamicsReport(every_n_steps=1)

    class Failing(Regressor):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        trainer_for([report], False, tmp_path).fit(Failing(), loader())
    assert (tmp_path / "training_dynamics.png").exists()  # written on the way out
    restored = TrainingDynamicsReport()
    restored.load_state_dict(report.state_dict())
    assert restored.series == report.series and sorted(restored.series["train_loss"]) == [1, 2, 3]


def test_arguments_are_checked():
    with pytest.raises(ConfigError, match="filename"):
        TrainingDynamicsReport(filename="dynamics.pdf")
    with pytest.raises(ConfigError, match="every_n_steps"):
        TrainingDynamicsReport(every_n_steps=0)
