"""Tests of the run metadata (MetadataLogger and its helpers).

Oracles: the git repository's own files (``.git/HEAD`` and the ref it names), the
library modules' ``__version__``, values written into the config file and given to the
module, the seed given to ``seed_everything``.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import subprocess
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.run_metadata import (
    collect_metadata,
    flatten,
    git_commit,
    library_versions,
    lookup,
)
from matsciml.lightning.callbacks.metadata import MetadataLogger

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
REPO = Path(__file__).resolve().parents[3]


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.1, width: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 3, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(-1))), batch_size=4)


def fit(root: Path, callbacks: list, max_epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=CSVLogger(root, name="", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
    )
    trainer.fit(Tiny(lr=0.1))
    return trainer


def head_from_git_files(repo: Path) -> str | None:
    """HEAD's commit read from the files of the .git folder (no git executable)."""
    git = repo / ".git"
    if git.is_file():  # a worktree: "gitdir: <path>"
        git = Path(git.read_text().split(":", 1)[1].strip())
    if not (git / "HEAD").is_file():
        return None
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head
    ref = head.split(":", 1)[1].strip()
    for folder in (git, Path((git / "commondir").read_text().strip()) if (git / "commondir").is_file() else git):
        folder = folder if folder.is_absolute() else git / folder
        if (folder / ref).is_file():
            return (folder / ref).read_text().strip()
        packed = folder / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    return None


# ----------------------------------------------------------------------------- helpers
def test_lookup_and_flatten():
    data = {"model": {"lr": 0.1, "layers": [4, {"width": 8}]}, "seed": 3}
    assert lookup(data, "model.lr") == 0.1
    assert lookup(data, "model.layers.1.width") == 8
    assert lookup(data, "model.layers.-1.width") == 8
    for missing in ("model.lrr", "model.layers.2", "seed.x"):
        with pytest.raises(KeyError):
            lookup(data, missing)
    assert flatten(data) == {"model.lr": 0.1, "model.layers.0": 4, "model.layers.1.width": 8, "seed": 3}
    assert all(lookup(data, k) == v for k, v in flatten(data).items())


def test_git_commit_of_the_package_and_outside_a_checkout(tmp_path):
    expected = head_from_git_files(REPO)
    info = git_commit()
    if expected is None:
        pytest.skip("the package does not live in a git checkout")
    try:
        subprocess.run(["git", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git executable")
    assert info["commit"] == expected and len(expected) == 40
    assert isinstance(info["dirty"], bool)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None, "path": str(tmp_path)}


def test_library_versions():
    import e3nn
    import torch_geometric

    versions = library_versions()
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["lightning"] == lightning.__version__
    assert versions["torch_geometric"] == torch_geometric.__version__
    assert versions["e3nn"] == e3nn.__version__


# ----------------------------------------------------------------------------- callback
def test_metadata_logger_writes_logs_and_updates(tmp_path):
    config = {"model": {"lr": 0.5}, "trainer": {"generic": {"max_epochs": 9}}, "run": {"seed": 99}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    pl.seed_everything(123, verbose=False)
    logger_cb = MetadataLogger(keys=["model.lr", "trainer.max_epochs", "width", "trainer.generic.max_epochs"])
    trainer = fit(tmp_path, [logger_cb])
    data = json.loads((tmp_path / "metadata.json").read_text())
    # the config file wins where it has the key; the run's objects answer the others
    assert data["config"] == {
        "model.lr": 0.5,
        "trainer.max_epochs": 2,
        "width": 3,
        "trainer.generic.max_epochs": 9,
    }
    assert data["hyperparameters"] == {"lr": 0.1, "width": 3}
    assert data["seed"] == 123  # seed_everything's, not the config's
    assert data["host"]["hostname"] == socket.gethostname()
    assert data["versions"]["torch"] == torch.__version__
    assert data["config_path"] == str(tmp_path / "config.yaml")
    assert data["module_class"].endswith(".Tiny")
    # the end-of-training update: final step, and the (empty) pipeline results
    assert data["trainer"]["global_step"] == trainer.global_step == 4
    assert data["train_end"]["errors"] == {} and data["train_end"]["test_metrics"] == {}
    assert logger_cb.path == tmp_path / "metadata.json"
    # sent to the logger: CSVLogger keeps hyperparameters in hparams.yaml
    hparams = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert hparams["metadata"]["config"]["model.lr"] == 0.5
    assert hparams["metadata"]["git"]["commit"] == data["git"]["commit"]


def test_unknown_key_fails_at_fit_start(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"lr": 0.5}}))
    with pytest.raises(ConfigError, match=r"key 'model\.lrr' is neither .* did you mean 'model\.lr'"):
        fit(tmp_path, [MetadataLogger(keys=["model.lrr"])])
    assert not (tmp_path / "metadata.json").exists()


def test_collect_without_config(tmp_path):
    trainer = fit(tmp_path, [], max_epochs=1)
    with pytest.warns(UserWarning, match="did you mean 'lr'"):
        data = collect_metadata(trainer, trainer.lightning_module, keys=["lr", "l"])
    assert data["config"] == {"lr": 0.1, "l": None}
    assert data["config_path"] is None and "train_end" not in data
