"""Prediction writers: per-structure splitting, merging in dataset order, and a real two-process DDP run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matsciml.lightning.writers import merge_records, split_batch

HERE = Path(__file__).resolve().parent / "writer_helpers"


def test_split_and_merge_restore_dataset_order():
    natoms = [2, 3, 1, 2]
    forces = torch.arange(sum(natoms) * 3, dtype=torch.float32).reshape(-1, 3)
    energy = torch.tensor([10.0, 11.0, 12.0, 13.0])
    prediction = {"ids": ["a", "b", "c", "d"], "energy": energy, "forces": forces}
    batch = {
        "natoms": torch.tensor(natoms),
        "targets": {
            "energy": energy + 1,
            "stress": torch.zeros(4, 3, 3),
            "band_gap": torch.tensor([0.1, np.nan, 0.3, 0.4]),
        },
    }
    records = split_batch(prediction, batch, [7, 2, 5, 0])
    assert [r["index"] for r in records] == [7, 2, 5, 0]
    assert torch.equal(records[1]["predictions"]["forces"], forces[2:5])
    assert records[2]["targets"]["stress"].shape == (3, 3)
    # two "ranks" in any order, one structure repeated (a padding sampler), one record lacking a target
    extra = split_batch(
        {"ids": ["e"], "energy": torch.tensor([14.0]), "forces": torch.ones(1, 3)}, {"natoms": torch.tensor([1])}, [9]
    )
    merged = merge_records(records[2:] + extra + records[:2] + records[1:2])
    assert merged["index"].tolist() == [0, 2, 5, 7, 9] and merged["ids"] == ["d", "b", "c", "a", "e"]
    assert merged["natoms"].tolist() == [2, 3, 1, 2, 1]
    assert merged["predictions"]["energy"].tolist() == [13.0, 11.0, 12.0, 10.0, 14.0]
    expected = torch.cat([forces[6:8], forces[2:5], forces[5:6], forces[0:2], torch.ones(1, 3)])
    assert torch.equal(merged["predictions"]["forces"], expected)
    assert merged["targets"]["stress"].shape == (5, 3, 3)
    band_gap = merged["targets"]["band_gap"].tolist()
    assert band_gap[0] == pytest.approx(0.4) and np.isnan(band_gap[1]) and np.isnan(band_gap[4])


@pytest.mark.slow
def test_two_process_ddp_prediction_equals_one_process(tmp_path):
    import ase.io

    from matsciml.datasets.collate import collate_samples
    from matsciml.datasets.devset import generate_structures

    sys.path.insert(0, str(HERE))
    from writers_ddp_worker import make_dataset, make_task

    data = tmp_path / "eleven.extxyz"
    ase.io.write(data, generate_structures(11), format="extxyz")  # odd: the ranks get 6 and 5
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "writers_ddp_worker.py"), str(data), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    parts = [torch.load(tmp_path / "inference" / f"results_rank{r}.pt", weights_only=True) for r in range(2)]
    seen = [r["index"] for part in parts for r in part]
    assert len(parts[0]) > 0 and len(parts[1]) > 0 and sorted(set(seen)) == list(range(11))
    merged = torch.load(tmp_path / "inference" / "predictions.pt", weights_only=True)
    # oracle: the same weights, one structure at a time, in one process
    task = make_task()
    task.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    dataset = make_dataset(data)
    energies, forces, ids = [], [], []
    for i in range(len(dataset)):
        batch = collate_samples([dataset[i]])
        out = task(batch)
        energies.append(out["energy"])
        forces.append(out["forces"])
        ids += batch["ids"]
    assert merged["index"].tolist() == list(range(11)) and merged["ids"] == ids
    torch.testing.assert_close(merged["predictions"]["energy"], torch.cat(energies), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["predictions"]["forces"], torch.cat(forces), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        merged["targets"]["energy"],
        torch.tensor([a.get_potential_energy() for a in ase.io.read(data, ":")], dtype=torch.float32),
    )
    (npz,) = list((tmp_path / "leaderboard").rglob("*.npz"))
    assert npz.parent.parent.name == "ForceRegressionTask" and npz.parent.name == "PLEGNNBackbone"
    board = np.load(npz)
    assert list(board["ids"]) == ids
    np.testing.assert_allclose(board["energy"], merged["predictions"]["energy"].numpy())
    assert not (tmp_path / "leaderboard" / ".parts").exists()
