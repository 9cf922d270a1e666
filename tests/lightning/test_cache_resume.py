"""Training with the graph cache: the same weights as without it, and a resumed run (cold cache in a
fresh data module) equal bit for bit to the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_trainer, tiny_egnn_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform
from matsciml.lightning import MatSciMLDataModule

STEPS = 10  # 24 structures, 18 for training in batches of 4: 5 steps per epoch, 2 epochs


def _task():
    from matsciml.models.tasks.scalar import ScalarRegressionTask

    torch.manual_seed(0)
    return ScalarRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=tiny_egnn_kwargs(),
        task_keys=["energy_per_atom"],
        output_kwargs={"hidden_dim": 8},
        lr=0.01,
    )


def _data(graph_cache: str, num_workers: int = 0, in_process_if_cached: bool = False) -> MatSciMLDataModule:
    transforms = [PeriodicPropertiesTransform(3.3, adaptive_cutoff=True), PointCloudToGraphTransform("pyg")]
    return MatSciMLDataModule.from_devset(
        dset_kwargs={"n": 24, "transforms": transforms},
        val_split=0.25,
        batch_size=4,
        seed=3,
        target_keys=["energy_per_atom"],
        graph_cache=graph_cache,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        in_process_if_cached=in_process_if_cached,
    )


def _fit(root: Path, dm: MatSciMLDataModule, ckpt: Path | None = None, save: bool = False) -> dict:
    task = _task()
    callbacks = []
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}"))
    trainer = make_trainer(root, callbacks, max_steps=STEPS, max_epochs=None)
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt)
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_resume")
    import os

    old = os.environ.get("MATSCIML_CACHE")
    os.environ["MATSCIML_CACHE"] = str(root / "cache")
    try:
        cached_dm = _data("memory")
        with_cache = _fit(root / "cached", cached_dm, save=True)
        without = _fit(root / "plain", _data("off"))
        yield {"root": root, "with": with_cache, "without": without, "dm": cached_dm}
    finally:
        if old is None:
            os.environ.pop("MATSCIML_CACHE", None)
        else:
            os.environ["MATSCIML_CACHE"] = old


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cache_changes_nothing_in_training(runs):
    base = runs["dm"].datasets["train"].dataset
    cache = base.graph_cache
    assert cache is not None and len(cache.memory) == len(base) and cache.hits > 0  # it really served batches
    _same(runs["with"], runs["without"])


@pytest.mark.parametrize("step", [3, 6, 9])  # mid-epoch 0, mid-epoch 1, near the end
def test_resume_with_cache_is_bitwise_equal(runs, step, tmp_path):
    ckpt = runs["root"] / "cached" / f"step={step}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == step
    _same(_fit(tmp_path, _data("memory"), ckpt=ckpt), runs["with"])


@pytest.mark.slow
def test_resume_with_cache_and_workers_is_bitwise_equal(runs, tmp_path):
    """Two loader workers: the cache is filled up front in the parent and shared by the forked workers."""
    ckpt = runs["root"] / "cached" / "step=6.ckpt"
    dm = _data("memory", num_workers=2)
    _same(_fit(tmp_path, dm, ckpt=ckpt), runs["with"])
    assert len(dm.datasets["train"].dataset.graph_cache.memory) == 24


def test_workers_give_way_to_the_training_process_when_the_cache_holds_everything(runs, tmp_path):
    """``in_process_if_cached`` (the runner's choice on a GPU): the same weights, loaded in this process."""
    dm = _data("memory", num_workers=2, in_process_if_cached=True)
    _same(_fit(tmp_path, dm), runs["with"])
    assert (dm.num_workers, dm.persistent_workers) == (0, False)


def test_workers_stay_when_the_cache_is_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path))
    dm = _data("disk", num_workers=2, in_process_if_cached=True)
    dm.setup("fit")
    assert (dm.num_workers, dm.persistent_workers) == (2, True)
