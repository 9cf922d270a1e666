"""DatasetStatsCallback: statistics of real OQMD structures against ase and numpy reading the same file."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from ase.io import read
from lightning.pytorch.loggers import CSVLogger

from matsciml.datasets.structure_dataset import StructureDataset
from matsciml.lightning.callbacks import DatasetStatsCallback
from matsciml.lightning.callbacks.dataset_stats import split_statistics

DATA = Path(__file__).resolve().parents[2] / "data" / "oqmd_devset.extxyz"


def test_split_statistics_match_ase_and_numpy():
    dataset = StructureDataset(DATA, target_keys=["band_gap", "formation_energy_per_atom"], on_invalid="drop")
    stats = split_statistics(dataset, max_samples=50)
    atoms = read(DATA, index=":50")
    assert stats["size"] == len(dataset) and stats["counted"] == 50
    assert stats["elements"] == dict(sorted(Counter(s for a in atoms for s in a.get_chemical_symbols()).items()))
    natoms = [len(a) for a in atoms]
    assert stats["atoms"] == {"min": min(natoms), "mean": pytest.approx(np.mean(natoms)), "max": max(natoms)}
    gaps = np.array([a.info["band_gap"] for a in atoms])
    t = stats["targets"]["band_gap"]
    assert t["count"] == 50
    assert t["mean"] == pytest.approx(gaps.mean(), rel=1e-6, abs=1e-9)
    assert t["std"] == pytest.approx(gaps.std(ddof=1), rel=1e-5)
    assert (t["min"], t["max"]) == (pytest.approx(gaps.min()), pytest.approx(gaps.max()))


def test_logged_per_split_at_fit_start(tmp_path):
    from _callback_toys import ToyTask, make_datamodule, make_trainer

    dm = make_datamodule(n=20, val=0.25, batch_size=4)
    cb = DatasetStatsCallback()
    logger = CSVLogger(tmp_path, name="", version="")
    make_trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(ToyTask(), datamodule=dm)
    assert cb.stats["train"]["size"] == 15 and cb.stats["val"]["size"] == 5
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert any(r.get("data/train/size") == "15.0" for r in rows)
