"""Tests of ForwardNaNDetection.

Oracles: a NaN planted at a known optimizer step in the embeddings of a known structure
of the batch; the written files are read back (ASE for the extxyz, ``json``) and compared
with the batch that was fed; weights recorded before and after every step.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import TrainingDynamicsWarning
from matsciml.lightning.callbacks.gradients import TrainingFaultError
from matsciml.lightning.callbacks.nan import ForwardNaNDetection, locate_nonfinite, write_batch_dump

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import PlainModule, TinyTask, WeightRecorder, fit, loader, make_batch, make_batches, trainer  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

STEP = 3
IDS = [f"b{STEP}-s{j}" for j in range(4)]


def check_dump(folder: Path, batch: dict) -> dict:
    """Read the dump of the bad batch back and compare it with ``batch``; return the JSON record."""
    stem = f"nonfinite_step{STEP}_batch{STEP}_rank0"
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.extxyz", f"{stem}.json"]  # no temporary files
    record = json.loads((folder / f"{stem}.json").read_text())
    assert record["step"] == STEP and record["batch_idx"] == STEP and record["ids"] == IDS
    assert record["offending_ids"] == ["b3-s1"]
    assert set(record["nonfinite"]) == {"loss", "energy"}
    assert record["first_nonfinite_module"] == "encoder (TinyEncoder)"
    assert record["nonfinite_inputs"] == []
    assert record["extxyz"] == f"{stem}.extxyz"
    frames = read(folder / f"{stem}.extxyz", ":")
    graph = batch["graph"]
    assert [f.info["id"] for f in frames] == IDS
    for g, (frame, entry) in enumerate(zip(frames, record["structures"])):
        mask = graph.batch == g
        np.testing.assert_allclose(frame.positions, graph.pos[mask].double().numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(entry["positions"]), graph.pos[mask].double().numpy(), atol=1e-6)
        assert frame.numbers.tolist() == graph.atomic_numbers[mask].tolist() == entry["atomic_numbers"]
        np.testing.assert_allclose(np.asarray(frame.cell), graph.cell[g].double().numpy(), atol=1e-6)
        assert entry["id"] == IDS[g] and entry["finite_positions"]
    return record


def test_nan_at_step_k_stops_with_the_batch_written(tmp_path):
    torch.manual_seed(0)
    batches = make_batches(6)
    recorder = WeightRecorder()
    callback = ForwardNaNDetection(tmp_path / "dumps")
    fitter = trainer(tmp_path, [recorder, callback], max_steps=6)
    with pytest.raises(TrainingFaultError, match="step 3") as error:
        fitter.fit(TinyTask(weight_decay=0.1, nan_at_step=STEP), loader(batches))
    assert fitter.global_step == STEP
    assert "b3-s1" in str(error.value) and "encoder (TinyEncoder)" in str(error.value)
    record = check_dump(tmp_path / "dumps", batches[STEP])
    assert record["action"] == "stop" and record["loss"] == "nan"
    module = fitter.lightning_module
    assert all(torch.equal(module.state_dict()[k], v) for k, v in recorder.before[STEP].items())
    assert callback._handles == []  # hooks removed


def test_nan_at_step_k_skips_the_step_and_goes_on(tmp_path):
    torch.manual_seed(0)
    batches = make_batches(6)
    recorder = WeightRecorder()
    callback = ForwardNaNDetection(tmp_path / "dumps", action="skip")
    fitter = trainer(tmp_path, [recorder, callback], max_steps=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitter.fit(TinyTask(weight_decay=0.1, nan_at_step=STEP), loader(batches))
    assert fitter.global_step == 6 and callback.nonfinite_batches == 1
    for name, value in recorder.before[STEP].items():
        assert torch.equal(recorder.after[STEP][name], value), name
    assert any(not torch.equal(recorder.after[4][n], v) for n, v in recorder.before[4].items())
    assert all(torch.isfinite(v).all() for v in fitter.lightning_module.state_dict().values())
    (message,) = [str(w.message) for w in caught if issubclass(w.category, TrainingDynamicsWarning)]
    assert "step 3" in message and "b3-s1" in message and "skipped" in message
    assert check_dump(tmp_path / "dumps", batches[STEP])["action"] == "skip"


def test_healthy_run_writes_nothing(tmp_path):
    torch.manual_seed(0)
    callback = ForwardNaNDetection(tmp_path / "dumps")
    assert fit(TinyTask(), make_batches(5), tmp_path, [callback], max_steps=5) == []
    assert not (tmp_path / "dumps").exists() and callback.nonfinite_batches == 0


def test_plain_module_gets_the_loss_check_and_is_told_once(tmp_path):
    torch.manual_seed(0)
    batches = make_batches(3)
    batches[1]["targets"]["energy"][2] = float("inf")
    callback = ForwardNaNDetection(action="skip")
    caught = fit(PlainModule(), batches, tmp_path, [callback], max_steps=3, everything=True)
    assert sum("only the loss is checked" in str(w.message) for w in caught) == 1
    assert sum(issubclass(w.category, TrainingDynamicsWarning) for w in caught) == 1
    (path,) = (tmp_path / "nonfinite_batches").glob("*.json")  # default folder: the run folder
    record = json.loads(path.read_text())
    assert record["step"] == 1 and record["nonfinite"] == ["loss"]
    assert record["nonfinite_inputs"] == ["targets.energy"] and record["first_nonfinite_module"] is None


def test_write_batch_dump_writes_strict_json_for_nonfinite_positions(tmp_path):
    batch = make_batch(0, size=2)
    batch["graph"].pos[0, 1] = float("nan")
    (json_path, xyz_path) = write_batch_dump(tmp_path, "dump", batch, {"step": 7, "loss": float("inf")})
    text = json_path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["structures"][0]["positions"][0][1] == "nan"
    assert record["structures"][0]["finite_positions"] is False and record["structures"][1]["finite_positions"]
    frames = read(xyz_path, ":")
    assert np.isnan(frames[0].positions[0, 1]) and len(frames) == 2
    (plain,) = write_batch_dump(tmp_path, "plain", {"x": torch.tensor([1.0, float("nan")])}, {})
    assert json.loads(plain.read_text())["tensors"] == {"x": [1.0, "nan"]}


def test_locate_nonfinite_names_the_first_module():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))
    assert locate_nonfinite(model, lambda: model(torch.ones(1, 2))) == "1 (Linear)"
    with torch.no_grad():
        model[1].bias.zero_()
    assert locate_nonfinite(model, lambda: model(torch.ones(1, 2))) is None


def test_config_errors():
    with pytest.raises(ConfigError):
        ForwardNaNDetection(action="ignore")
    with pytest.raises(ConfigError):
        ForwardNaNDetection(max_dumps=-1)
