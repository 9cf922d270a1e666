"""Atomic checkpoint writes (a process killed while saving leaves a loadable checkpoint) and resume selection."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from torch.utils.data import DataLoader, TensorDataset

from matsciml.lightning.checkpointing import (
    AtomicCheckpointIO,
    atomic_torch_save,
    checkpoint_candidates,
    find_resume_checkpoint,
    read_checkpoint_info,
)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 24
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def full_checkpoint(step: int, size: int = 1000) -> dict:
    """A checkpoint with the keys of a training checkpoint and a recognisable payload."""
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"w": torch.full((size,), float(step))},
        "loops": {},
        "optimizer_states": [],
    }


def test_atomic_save_round_trip(tmp_path):
    path = atomic_torch_save(full_checkpoint(3), tmp_path / "sub" / "a.ckpt", fsync=False)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    atomic_torch_save(full_checkpoint(4), path)  # replaces the old file
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt"]  # no temporary file left


def test_trainer_checkpoints_through_the_plugin(tmp_path, monkeypatch):
    calls = []
    original = atomic_torch_save

    def spy(obj, path, fsync=True):
        calls.append(Path(path).name)
        return original(obj, path, fsync)

    monkeypatch.setattr("matsciml.lightning.checkpointing.atomic_torch_save", spy)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(Tiny())
    assert "last.ckpt" in calls
    info = read_checkpoint_info(tmp_path / "checkpoints" / "last.ckpt")
    assert info.usable and info.global_step == 4


def test_temporary_files_do_not_disturb_lightning_numbering(tmp_path):
    """Lightning numbers hpc_ckpt_<n> from every file name containing 'ckpt_': temporary names must not."""
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"x")
    (tmp_path / ".partial-123-deadbeef").write_bytes(b"half")  # left by a killed save
    assert Path(_CheckpointConnector.hpc_save_path(tmp_path)).name == "hpc_ckpt_3.ckpt"


def test_read_checkpoint_info_problems(tmp_path):
    good = atomic_torch_save(full_checkpoint(7), tmp_path / "good.ckpt")
    info = read_checkpoint_info(good)
    assert info.usable and info.global_step == 7 and info.problem == ""
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    cut = read_checkpoint_info(tmp_path / "cut.ckpt")
    assert not cut.usable and "does not load with weights_only=True" in cut.problem
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "weights.ckpt")
    weights = read_checkpoint_info(tmp_path / "weights.ckpt")
    assert not weights.usable and "loops" in weights.problem and "optimizer_states" in weights.problem
    torch.save({**full_checkpoint(1), "hyper_parameters": {"f": Path("x")}}, tmp_path / "unsafe.ckpt")
    assert not read_checkpoint_info(tmp_path / "unsafe.ckpt").usable  # needs an unsafe load


def test_find_resume_checkpoint_order(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    assert find_resume_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last = atomic_torch_save(full_checkpoint(8), tmp_path / "checkpoints" / "last.ckpt")
    hpc = atomic_torch_save(full_checkpoint(6), tmp_path / "hpc_ckpt_1.ckpt")
    os.utime(hpc, (time.time() + 10, time.time() + 10))
    assert find_resume_checkpoint(tmp_path) == last  # more steps wins over a newer file
    same = atomic_torch_save(full_checkpoint(8), tmp_path / "hpc_ckpt_2.ckpt")
    os.utime(same, (time.time() + 20, time.time() + 20))
    assert find_resume_checkpoint(tmp_path) == same  # same step: the later file (written after validation)
    data = same.read_bytes()
    newer = tmp_path / "hpc_ckpt_3.ckpt"
    newer.write_bytes(data[: len(data) // 3])  # truncated by a non-atomic writer
    (tmp_path / ".partial-1-ab").write_bytes(data)
    assert find_resume_checkpoint(tmp_path) == same
    assert tmp_path / ".partial-1-ab" not in checkpoint_candidates(tmp_path)


# ----------------------------------------------------------------------------- killed while saving

HELPER = Path(__file__).resolve().parent / "checkpoint_helpers" / "kill_during_save.py"
REPO = Path(__file__).resolve().parents[2]


def _kill_trials(root: Path, trials: int, *more: str) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(HELPER), str(root), str(trials), "20", *more],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-3000:]


def _newest_loads(folder: Path) -> int:
    """The newest surviving checkpoint loads with weights_only=True and holds what was saved; return its step."""
    files = list(folder.glob("*.ckpt"))
    assert files, f"{folder}: the child was killed before its first save completed"
    newest = max(files, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))
    state = torch.load(newest, weights_only=True)
    step = state["global_step"]
    assert torch.equal(state["state_dict"]["w"], torch.full((200_000,), float(step)))
    last = torch.load(folder / "last.ckpt", weights_only=True)  # the overwritten file is always complete
    assert torch.equal(last["state_dict"]["w"], torch.full((200_000,), float(last["global_step"])))
    return step


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")
def test_kill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL at random moments of repeated saves (20 trials): the newest surviving checkpoint always loads."""
    _kill_trials(tmp_path, 20)
    for trial in range(20):
        folder = tmp_path / f"trial{trial}"
        assert _newest_loads(folder) >= 1
        assert find_resume_checkpoint(folder) is not None


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")
def test_kill_in_the_middle_of_a_write(tmp_path):
    """Deterministic case: the process dies with half of a checkpoint written; the previous one is intact."""
    _kill_trials(tmp_path, 1, "--mid-write")
    folder = tmp_path / "trial0"
    (partial,) = folder.glob(".partial-*")
    assert partial.stat().st_size > 0  # half of step 2 reached the disk...
    assert not read_checkpoint_info(partial).usable  # ...and is not a checkpoint
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1  # the previous one is intact
    assert _newest_loads(folder) == 1
    assert find_resume_checkpoint(folder) in (folder / "last.ckpt", folder / "step-1.ckpt")
