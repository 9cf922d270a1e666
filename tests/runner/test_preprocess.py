"""``matsciml-preprocess`` builds the disk graph cache that a training run then reads, and the
runner's loader defaults follow the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from matsciml.datasets import StructureDataset
from matsciml.datasets.cache import attach_graph_cache
from matsciml.datasets.collate import collate_samples
from matsciml.datasets.disk_cache import DiskGraphStore
from matsciml.runner.loader_defaults import apply_loader_defaults, machine_loader_defaults
from matsciml.runner.preprocess import main

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "experiments" / "configs" / "experiments" / "oqmd_band_gap.yaml"


def test_preprocess_builds_the_cache_training_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the dataset config's train_path is relative to the checkout
    assert main(["-e", str(EXPERIMENT), "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    files = sorted(tmp_path.glob("*.lmdb"))
    assert len(files) == 1 and printed and all(line.endswith(str(files[0])) for line in printed)
    # the model config's transforms (6.5 Å, adaptive) over the real file: the stored graphs are those
    from matsciml.runner.build import build_transforms
    from matsciml.runner.configs import default_config_path, load_registry

    model = load_registry(default_config_path("models"), "model")["egnn_dgl"]
    plain = StructureDataset(REPO / "tests/data/oqmd_devset.extxyz", transforms=build_transforms(model))
    cached = StructureDataset(REPO / "tests/data/oqmd_devset.extxyz", transforms=build_transforms(model))
    cache = attach_graph_cache(cached, {"mode": "disk", "cache_dir": str(tmp_path)})
    assert cache.disk.path == files[0] and isinstance(cache.disk, DiskGraphStore)
    assert cache.disk.length == len(plain) - 1  # the NaN band_gap record is dropped by the dataset config
    for index in (0, 57, 198):
        got, want = collate_samples([cached[index]]), collate_samples([plain[index]])
        assert torch.equal(got["graph"].edge_index, want["graph"].edge_index)
        assert torch.equal(got["graph"].cell_shifts, want["graph"].cell_shifts)
    assert cache.misses <= 1  # only the dropped record is computed on the fly


def test_preprocess_reports_bad_arguments(capsys):
    assert main(["-e", str(EXPERIMENT), "--workers", "-1"]) == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("gpu", "devices", "cpus", "workers"),
    [(False, 1, 16, 0), (True, 1, 16, 4), (True, 4, 16, 3), (True, 1, 2, 1), (True, 8, 8, 0)],
)
def test_machine_loader_defaults(gpu, devices, cpus, workers):
    got = machine_loader_defaults(gpu, devices, cpus)
    assert got == {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": gpu}


def test_loader_defaults_keep_what_the_config_says():
    kwargs = {"num_workers": 2, "pin_memory": False}
    assert apply_loader_defaults(kwargs, {"accelerator": "gpu"}) == {"num_workers": 2, "pin_memory": False}
    kwargs = {"num_workers": "auto"}
    assert apply_loader_defaults(kwargs, {"accelerator": "cpu"}) == {
        "num_workers": 0,
        "persistent_workers": False,
        "pin_memory": False,
    }


def test_workers_chosen_for_a_gpu_give_way_to_a_cache_that_holds_everything():
    kwargs = apply_loader_defaults({}, {"accelerator": "gpu", "devices": 1})
    assert kwargs.get("in_process_if_cached", False) is (kwargs["num_workers"] > 0)
    assert "in_process_if_cached" not in apply_loader_defaults({"num_workers": 2}, {"accelerator": "gpu"})
    assert "in_process_if_cached" not in apply_loader_defaults({}, {"accelerator": "cpu"})
