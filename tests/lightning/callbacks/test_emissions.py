"""CodeCarbonCallback on a short real run, offline.

Oracles: codecarbon's own CSV (the energy it measured and the emissions it computed) and
the carbon intensity of the country read straight from codecarbon's data file: the logged
total must be the CSV's, and equal energy x intensity; the epochs' values must add up.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from helpers import make_trainer, tiny_egnn_kwargs
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks import CodeCarbonCallback
from matsciml.lightning.callbacks.builder import build_callbacks
from matsciml.lightning.callbacks.emissions import (
    EMISSIONS_EPOCH_KG,
    EMISSIONS_TOTAL_KG,
    ENERGY_EPOCH_KWH,
    ENERGY_TOTAL_KWH,
)
from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.models.tasks.scalar import ScalarRegressionTask

codecarbon = pytest.importorskip("codecarbon", reason="pip install 'matsciml[emissions]'")

TARGET = "energy_per_atom"


def usa_intensity_g_per_kwh() -> float:
    """The USA's carbon intensity in codecarbon's data file, read without codecarbon's code."""
    path = Path(codecarbon.__file__).parent / "data" / "private_infra" / "global_energy_mix.json"
    return float(json.loads(path.read_text())["USA"]["carbon_intensity"])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def fit(root: Path, callbacks: list, epochs: int) -> None:
    task = ScalarRegressionTask(encoder_class="PLEGNNBackbone", encoder_kwargs=tiny_egnn_kwargs(depth=1),
                                task_keys=[TARGET], lr=0.01)  # fmt: skip
    dm = MatSciMLDataModule.from_devset(dset_kwargs={"n": 16}, val_split=0.25, target_keys=[TARGET], batch_size=4)
    logger = CSVLogger(root, name="", version="")
    make_trainer(root, callbacks, logger=logger, max_epochs=epochs).fit(task, datamodule=dm)


def test_epochs_add_up_and_total_is_energy_times_intensity(devset_cache, tmp_path):
    callback = CodeCarbonCallback(country_iso_code="USA", measure_power_secs=1)
    fit(tmp_path, [callback], epochs=3)
    assert callback.tracker is None  # stopped at fit end

    logged = read_rows(tmp_path / "metrics.csv")
    per_epoch = column(logged, EMISSIONS_EPOCH_KG)
    energy_epoch = column(logged, ENERGY_EPOCH_KWH)
    totals, energy_totals = column(logged, EMISSIONS_TOTAL_KG), column(logged, ENERGY_TOTAL_KWH)
    assert len(per_epoch) == len(energy_epoch) == 3
    assert len(totals) == len(energy_totals) == 4  # running total at each epoch end, and the final one
    for value in per_epoch + energy_epoch + totals:
        assert math.isfinite(value) and value >= 0
    assert sum(energy_epoch) > 0
    # the epochs add up to the running total at the last epoch end; the final total adds the rest of fit
    assert sum(per_epoch) == pytest.approx(totals[2], rel=1e-9)
    assert sum(energy_epoch) == pytest.approx(energy_totals[2], rel=1e-9)
    rest = callback.after_last_epoch["emissions_kg"]
    # what follows the last epoch end is a share of the total, never more (its size depends on the machine's load)
    assert 0 <= rest < totals[-1]
    assert sum(per_epoch) + rest == pytest.approx(totals[-1], rel=1e-9)

    # oracle: codecarbon's CSV (one cumulative row per epoch end, then the total) and its intensity table
    written = read_rows(callback.csv_path)
    assert callback.csv_path == tmp_path / "emissions.csv"
    assert [r["country_iso_code"] for r in written] == ["USA"] * 4
    assert column(written, "emissions") == pytest.approx(totals, rel=1e-9)
    assert column(written, "energy_consumed") == pytest.approx(energy_totals, rel=1e-9)
    final = written[-1]
    expected = float(final["energy_consumed"]) * usa_intensity_g_per_kwh() / 1000.0
    assert totals[-1] == pytest.approx(expected, rel=1e-9)
    assert callback.total["emissions_kg"] == pytest.approx(expected, rel=1e-9)


class Fail(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise RuntimeError("planted failure")


def test_a_failed_run_stops_the_tracker_and_logs_its_total(devset_cache, tmp_path):
    callback = CodeCarbonCallback(measure_power_secs=1)
    with pytest.raises(RuntimeError, match="planted"):
        fit(tmp_path, [callback, Fail()], epochs=2)
    assert callback.tracker is None
    assert callback.epochs == []
    logged = column(read_rows(tmp_path / "metrics.csv"), EMISSIONS_TOTAL_KG)
    written = read_rows(callback.csv_path)
    assert len(logged) == len(written) == 1
    assert logged[0] == pytest.approx(float(written[0]["emissions"]), rel=1e-9)
    assert callback.total["emissions_kg"] == pytest.approx(logged[0], rel=1e-9)


def test_arguments_are_checked_and_yaml_names_work(monkeypatch):
    (built,) = build_callbacks([{"kind": "codecarbon", "country_iso_code": "FRA"}], where="trainer.yaml: callbacks")
    assert isinstance(built, CodeCarbonCallback) and built.country_iso_code == "FRA"
    with pytest.raises(ConfigError, match=r"callbacks\[0\].*country_iso_code='US'.*did you mean 'USA'"):
        build_callbacks([{"kind": "emissions", "country_iso_code": "US"}], where="trainer.yaml: callbacks")
    with pytest.raises(ConfigError, match="tracking_mode='proces'.*did you mean 'process'"):
        CodeCarbonCallback(tracking_mode="proces")
    with pytest.raises(ConfigError, match="measure_power_secs=0"):
        CodeCarbonCallback(measure_power_secs=0)
    monkeypatch.setitem(sys.modules, "codecarbon", None)
    with pytest.raises(ConfigError, match=r"CodeCarbonCallback needs the 'codecarbon'.*matsciml\[emissions\]"):
        CodeCarbonCallback()


def test_metric_names_are_the_documented_ones():
    assert (EMISSIONS_EPOCH_KG, EMISSIONS_TOTAL_KG, ENERGY_EPOCH_KWH, ENERGY_TOTAL_KWH) == (
        "emissions/epoch_kg",
        "emissions/total_kg",
        "energy/epoch_kWh",
        "energy/total_kWh",
    )
