"""Random generator states in checkpoints, exact resume with dropout, and ``seed:`` making runner runs repeatable."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import tiny_egnn_yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from matsciml.lightning.loaders import ResumableDataLoader
from matsciml.lightning.seeding import RNGStateCallback, capture_rng_state, restore_rng_state


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_capture_and_restore_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # plain data and tensors only
    assert draws() == expected


class Dropout(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        # resumes mid-epoch and never draws from the global generators (as the runner's loaders)
        x = torch.linspace(-1, 1, 32).reshape(8, 4)
        return ResumableDataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2, seed=3)


def _trainer(root: Path, steps: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


def _run(root: Path, rng_callback: bool) -> tuple[dict, Path]:
    """7 steps with a checkpoint after step 3 (``ModelCheckpoint`` at the end of that step)."""
    torch.manual_seed(11)
    module = Dropout()
    saver = ModelCheckpoint(
        dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}", auto_insert_metric_name=False
    )
    _trainer(root, 7, ([RNGStateCallback()] if rng_callback else []) + [saver]).fit(module)
    return module.state_dict(), root / "3.ckpt"


def _resume(checkpoint: Path, rng_callback: bool) -> dict:
    torch.manual_seed(12345)  # a fresh process starts from other generator states
    module = Dropout()
    _trainer(checkpoint.parent, 7, [RNGStateCallback()] if rng_callback else []).fit(module, ckpt_path=checkpoint)
    return module.state_dict()


@pytest.mark.parametrize("rng_callback", [True, False])
def test_resume_with_dropout(tmp_path, rng_callback):
    """With the generator states the resumed run ends bitwise where the uninterrupted one does; without, it does not."""
    whole, checkpoint = _run(tmp_path, rng_callback)
    resumed = _resume(checkpoint, rng_callback)
    same = [torch.equal(resumed[key], value) for key, value in whole.items()]
    assert all(same) == rng_callback


# ----------------------------------------------------------------------------- seed: N in the runner

MODEL = """\
encoder_class: {class_path: matsciml.models.egnn.PLEGNNBackbone}
encoder_kwargs: ENCODER_KWARGS
output_kwargs: {hidden_dim: 16, num_hidden: 1, dropout: 0.3}
lr: 0.01
transforms:
  - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
    init_args: {cutoff_radius: 3.3, adaptive_cutoff: true}
  - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
    init_args: {backend: pyg}
""".replace("ENCODER_KWARGS", tiny_egnn_yaml(readout="mean"))


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seed")
    files = {
        "models/tiny.yaml": MODEL,
        "datasets/small.yaml": """\
            dataset: EMTAlloyDataset
            debug: {batch_size: 8, val_split: 0.25, dset_kwargs: {n: 40}}
            target_keys: [energy_per_atom]
            """,
        "trainer.yaml": """\
            generic: {max_epochs: 2, enable_model_summary: false, enable_progress_bar: false}
            debug: {accelerator: cpu}
            """,
        "exp.yaml": """\
            model: tiny
            dataset: {small: [{task: ScalarRegressionTask, targets: [energy_per_atom]}]}
            seed: 5
            """,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def _weights(root: Path, run: str, *more: str) -> dict:
    from matsciml.runner.cli import main

    main(
        [
            "-e", str(root / "exp.yaml"), "-t", str(root / "trainer.yaml"), "-m", str(root / "models"),
            "-d", str(root / "datasets"), "--debug", "--run_dir", str(root / run), *more,
        ]
    )  # fmt: skip
    return torch.load(root / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_seed_makes_runner_runs_bitwise_repeatable(configs):
    """``seed: 5`` (model initialisation, data order, dropout): two runs end with the same weights, bit for bit."""
    a = _weights(configs, "a")
    random.random(), torch.rand(5), np.random.rand()  # whatever ran before does not matter
    b = _weights(configs, "b")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    c = _weights(configs, "c", "--seed", "6")  # the seed is what fixes them
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
