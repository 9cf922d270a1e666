"""Tests of PeakMemoryCallback and the memory readers against psutil, getrusage and /proc."""

from __future__ import annotations

import builtins
import csv
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks import memory
from matsciml.lightning.callbacks.memory import PeakMemoryCallback, memory_snapshot, peak_rss_bytes, rss_bytes

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

MIB = 2**20
TOLERANCE_MIB = 16  # the interpreter may allocate a little between two readings


def psutil_rss_mib() -> float:
    psutil = pytest.importorskip("psutil")
    return psutil.Process().memory_info().rss / MIB


def test_rss_matches_psutil():
    assert rss_bytes() / MIB == pytest.approx(psutil_rss_mib(), abs=TOLERANCE_MIB)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_rss_without_psutil_reads_proc(monkeypatch):
    reference = psutil_rss_mib()
    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("psutil hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    assert rss_bytes() / MIB == pytest.approx(reference, abs=TOLERANCE_MIB)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux")
def test_peak_is_getrusage_and_above_current():
    resource = pytest.importorskip("resource")
    expected = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak_rss_bytes() == pytest.approx(expected, abs=TOLERANCE_MIB * MIB)
    assert peak_rss_bytes() / MIB >= psutil_rss_mib() - TOLERANCE_MIB


def test_cuda_figures(monkeypatch):
    """The CUDA branch reads the allocator's peak and reserved bytes, and resets the peak when asked."""
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * MIB + MIB // 2)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 8 * MIB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    device = torch.device("cuda", 0)
    values = memory_snapshot(device, reset_cuda_peak=True)
    assert values["memory/cuda_peak_mb"] == 3.5 and values["memory/cuda_reserved_mb"] == 8.0
    assert resets == [device]
    assert "memory/cuda_peak_mb" not in memory_snapshot(torch.device("cpu"))
    memory_snapshot(device, reset_cuda_peak=False)
    assert len(resets) == 1


def test_arguments_are_checked():
    for bad in (0, -1, 1.5, False):
        with pytest.raises(ConfigError, match="every_n_steps"):
            PeakMemoryCallback(every_n_steps=bad)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.lin(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_logged_to_csv_and_close_to_psutil(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)]
    readings = []

    class Reference(pl.Callback):  # listed after the monitor: reads psutil right after it
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            readings.append((trainer.global_step, psutil_rss_mib()))

    cb = PeakMemoryCallback(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        callbacks=[cb, Reference()],
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=None))
    # every 2 steps, plus a last record at the end of training (step 7)
    assert [int(r["step"]) for r in cb.history] == [2, 4, 6, 7]
    reference = dict(readings)
    for record in cb.history[:-1]:
        assert record["memory/rss_mb"] > 0
        assert record["memory/rss_mb"] == pytest.approx(reference[int(record["step"])], abs=TOLERANCE_MIB)
        assert record["memory/rss_peak_mb"] >= record["memory/rss_mb"] - TOLERANCE_MIB
    assert cb.peaks["memory/rss_mb"] == max(r["memory/rss_mb"] for r in cb.history)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("memory/rss_mb")]
    assert [int(r["step"]) for r in logged] == [2, 4, 6, 7]
    for row, record in zip(logged, cb.history):
        assert float(row["memory/rss_mb"]) == pytest.approx(record["memory/rss_mb"], rel=1e-6)
        assert float(row["memory/rss_peak_mb"]) > 0


def test_module_has_no_hard_psutil_dependency():
    assert "psutil" not in memory.__dict__
