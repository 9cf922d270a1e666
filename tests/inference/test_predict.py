"""matsciml-predict on the real OQMD file with a band-gap checkpoint; bad checkpoints give one clear line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from helpers import cli_error

from matsciml.inference.cli import main

OQMD = Path(__file__).resolve().parents[1] / "data" / "oqmd_devset.extxyz"


@pytest.fixture(scope="module")
def predicted(band_gap_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "oqmd"
    result = main([band_gap_run.last_checkpoint, str(OQMD), "-o", str(out), "--batch_size", "32", "--no_progress"])
    return result


def test_files_and_nan_record(predicted):
    out = predicted.output_dir
    for name in ("predictions.csv", "predictions.extxyz", "metrics.json", "parity_band_gap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "parity_band_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames = ase.io.read(OQMD, ":")
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(frames) == 200  # every record predicted, the NaN one included
    nan_rows = [i for i, a in enumerate(frames) if not np.isfinite(a.info["band_gap"])]
    assert len(nan_rows) == 1
    for i, (row, atoms) in enumerate(zip(rows, frames)):
        assert int(row["index"]) == i and int(row["natoms"]) == len(atoms)
        assert np.isfinite(float(row["band_gap_pred"]))
        if i in nan_rows:
            assert row["band_gap_target"] == ""
        else:
            assert float(row["band_gap_target"]) == pytest.approx(atoms.info["band_gap"], rel=1e-6)
    parity = json.loads((out / "inference_data.json").read_text())["band_gap"]
    assert parity["name"] == "band_gap" and len(parity["predictions"]) == len(parity["targets"]) == 200
    assert parity["targets"][nan_rows[0]] is None
    assert parity["predictions"][3] == pytest.approx(float(rows[3]["band_gap_pred"]), rel=1e-6)
    written = ase.io.read(out / "predictions.extxyz", ":")
    assert len(written) == 200
    assert "band_gap_target" not in written[nan_rows[0]].info and "band_gap_pred" in written[nan_rows[0]].info
    np.testing.assert_allclose(written[5].positions, frames[5].positions, atol=1e-5)


def test_predictions_equal_the_task_and_metrics_equal_hand_computation(band_gap_run, predicted):
    """Oracle: the task's forward on the dataset's own samples; the MAE from ASE's reading of the file."""
    from matsciml.datasets.collate import collate_samples
    from matsciml.datasets.structure_dataset import StructureDataset
    from matsciml.inference import load_task

    loaded = load_task(band_gap_run.last_checkpoint)
    dataset = StructureDataset(OQMD, transforms=loaded.transforms)
    with torch.no_grad():
        pred = torch.cat([loaded.task(collate_samples([dataset[i] for i in range(k, min(k + 7, 200))]))["band_gap"]
                          for k in range(0, 200, 7)]).numpy()  # fmt: skip
    with open(predicted.csv, newline="") as fh:
        written = np.array([float(r["band_gap_pred"]) for r in csv.DictReader(fh)])
    np.testing.assert_allclose(written, pred, rtol=1e-5, atol=1e-6)
    target = np.array([a.info["band_gap"] for a in ase.io.read(OQMD, ":")])
    keep = np.isfinite(target)
    metrics = json.loads((predicted.output_dir / "metrics.json").read_text())["metrics"]["band_gap"]
    assert metrics["count"] == 199 and metrics["skipped"] == 1
    assert metrics["mae"] == pytest.approx(np.abs(pred[keep] - target[keep]).mean(), rel=1e-5)
    assert metrics["mean_predictor_mae"] == pytest.approx(np.abs(target[keep] - target[keep].mean()).mean(), rel=1e-6)


def test_missing_and_corrupt_checkpoint_give_one_line(tmp_path, capsys, band_gap_run):
    err = cli_error(capsys, main, [str(tmp_path / "nope.ckpt"), str(OQMD), "-o", str(tmp_path / "o")])
    assert "nope.ckpt" in err and "does not exist" in err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(open(band_gap_run.last_checkpoint, "rb").read()[:4000])  # a truncated copy
    err = cli_error(capsys, main, [str(corrupt), str(OQMD), "-o", str(tmp_path / "o")])
    assert "corrupt.ckpt" in err and "cannot read" in err
    err = cli_error(
        capsys, main, [band_gap_run.last_checkpoint, str(tmp_path / "none.extxyz"), "-o", str(tmp_path / "o")]
    )
    assert "none.extxyz" in err


def test_calculator_gives_the_scalar_property(band_gap_run, predicted):
    from matsciml.interfaces.ase import MatSciMLCalculator

    calc = MatSciMLCalculator.from_checkpoint(band_gap_run.last_checkpoint)
    assert "band_gap" in calc.implemented_properties and "forces" not in calc.implemented_properties
    with open(predicted.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for index in (0, 172):  # 172: the record whose band gap is NaN in the file
        atoms = ase.io.read(OQMD, index)
        atoms.calc = calc
        assert calc.get_property("band_gap", atoms) == pytest.approx(float(rows[index]["band_gap_pred"]), abs=1e-5)
