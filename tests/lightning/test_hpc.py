"""SLURM helpers and PreemptionCheckpoint in one process: where the checkpoint is taken, what it holds, requeue.

A signal is sent to this process from inside a chosen hook of a chosen step; the oracle
of "saved at a consistent step boundary" is an uninterrupted run of exactly as many steps
from the same start, whose weights and optimizer state must equal the checkpoint's bitwise.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from matsciml.common.errors import ConfigError
from matsciml.lightning.checkpointing import AtomicCheckpointIO
from matsciml.lightning.hpc import (
    PreemptionCheckpoint,
    TrainingPreempted,
    requeue_job,
    slurm_job_id,
    slurm_run_name,
    slurm_trainer_arguments,
)

BATCHES_PER_EPOCH = 4


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4 * BATCHES_PER_EPOCH, 3, generator=g)
        return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


class SignalAt(Callback):
    """Send ``signum`` to this process in ``on_after_backward`` (between backward and optimizer step) of ``batch``."""

    def __init__(self, batch: int, signum: int = signal.SIGUSR1, epoch: int = 0) -> None:
        self.batch, self.signum, self.epoch = batch, signum, epoch
        self._idx = -1
        self.handler_during_fit = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._idx = batch_idx
        self.handler_during_fit = signal.getsignal(signal.SIGTERM)

    def on_after_backward(self, trainer, pl_module):
        if self._idx == self.batch and trainer.current_epoch == self.epoch:
            watcher = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
            os.kill(os.getpid(), self.signum)
            deadline = time.monotonic() + 10
            while watcher.pending is None and time.monotonic() < deadline:
                time.sleep(0.001)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A ``scontrol`` first on PATH that records its arguments; the SLURM job id 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)  # not an srun step: no SLURM cluster environment
    return log


def trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    args = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        plugins=[AtomicCheckpointIO(fsync=False)],
    )
    args.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **args)


def reference_state(root: Path, steps: int, **kwargs) -> dict:
    """Module and optimizer state after exactly ``steps`` optimizer steps, uninterrupted."""
    module = Tiny()
    t = trainer(root, [], max_steps=steps, **kwargs)
    t.fit(module)
    return {"state_dict": module.state_dict(), "optimizer": t.optimizers[0].state_dict()}


def assert_same_state(checkpoint: dict, reference: dict) -> None:
    for key, value in reference["state_dict"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    saved = checkpoint["optimizer_states"][0]["state"]
    for index, entry in reference["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(saved[index][name]), torch.as_tensor(value)), (index, name)


# ----------------------------------------------------------------------------- SLURM environment


def test_job_id_and_run_name():
    assert slurm_job_id({}) is None and slurm_run_name({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "123"}) == "123"
    array = {"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "7"}
    assert slurm_job_id(array) == "123_7" and slurm_run_name(array) == "slurm-123_7"


def test_trainer_arguments_from_the_allocation():
    env = {"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "32"}
    assert slurm_trainer_arguments({"devices": "auto"}, env) == {"devices": 8, "num_nodes": 4}
    assert slurm_trainer_arguments({}, env) == {"devices": 8, "num_nodes": 4}
    # explicit values are kept (Lightning reports a mismatch)
    assert slurm_trainer_arguments({"devices": 2, "num_nodes": 1}, env) == {"devices": 2, "num_nodes": 1}
    # without SLURM_NTASKS_PER_NODE: tasks / nodes; heterogeneous layouts are left to Lightning
    assert slurm_trainer_arguments({}, {"SLURM_NNODES": "2", "SLURM_NTASKS": "8"})["devices"] == 4
    assert "devices" not in slurm_trainer_arguments({}, {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2(x3)"})


def test_requeue_job_command_and_failures(fake_scontrol, tmp_path):
    assert requeue_job("4242") == ""
    assert fake_scontrol.read_text().split() == ["requeue", "4242"]
    assert "not found on PATH" in requeue_job("1", ("no-such-scontrol-here", "requeue", "{job_id}"))
    failing = tmp_path / "bin" / "failing"
    failing.write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    failing.chmod(0o755)
    problem = requeue_job("1", (str(failing), "requeue", "{job_id}"))
    assert "exited with status 1" in problem and "Invalid job id" in problem
    with pytest.raises(ConfigError, match="not a SLURM job id"):
        requeue_job("12; rm -rf /")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="not a signal name"):
        PreemptionCheckpoint(requeue_signal="SIGNOPE")
    with pytest.raises(ConfigError, match="reserved for the warning"):
        PreemptionCheckpoint(requeue_signal="SIGTERM")
    with pytest.raises(ConfigError, match="keep"):
        PreemptionCheckpoint(keep=0)
    assert PreemptionCheckpoint(requeue_signal="usr2").requeue_signal == signal.SIGUSR2


# ----------------------------------------------------------------------------- the stop


def test_requeue_signal_mid_step_saves_at_next_step_boundary(tmp_path, fake_scontrol):
    before = signal.getsignal(signal.SIGUSR1)
    watcher = PreemptionCheckpoint()
    t = trainer(tmp_path / "run", [SignalAt(batch=2), watcher])
    with pytest.raises(TrainingPreempted) as stop:
        t.fit(Tiny())
    # batches 0, 1 and 2 finished their optimizer step: the checkpoint is taken at the start of batch 3
    assert stop.value.global_step == 3 and stop.value.requeued and stop.value.code == 0
    assert stop.value.checkpoint == tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert fake_scontrol.read_text().split() == ["requeue", "4242"]
    checkpoint = torch.load(stop.value.checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert_same_state(checkpoint, reference_state(tmp_path / "ref", 3))
    # after fit the handler is the previous one again, or ours passing signals on to it (Lightning puts back the
    # handlers it found at fit start after ours on the exception path)
    assert signal.getsignal(signal.SIGUSR1) in (before, watcher._handle) and not watcher._active
    assert not list((tmp_path / "run").glob(".partial-*"))


def test_gradient_accumulation_window_is_never_split(tmp_path, fake_scontrol):
    """Signal in the first micro-batch of the second window: the save waits for that window's optimizer step."""
    t = trainer(tmp_path / "run", [SignalAt(batch=2), PreemptionCheckpoint()], accumulate_grad_batches=2)
    with pytest.raises(TrainingPreempted) as stop:
        t.fit(Tiny())
    assert stop.value.global_step == 2  # saved at the start of batch 4, after the step of batches 2 + 3
    checkpoint = torch.load(stop.value.checkpoint, weights_only=True)
    assert_same_state(checkpoint, reference_state(tmp_path / "ref", 2, accumulate_grad_batches=2))


def test_sigterm_saves_without_requeue_and_takes_sigterm_from_lightning(tmp_path, fake_scontrol):
    sender = SignalAt(batch=1, signum=signal.SIGTERM)
    watcher = PreemptionCheckpoint()
    t = trainer(tmp_path / "run", [sender, watcher])
    with pytest.raises(TrainingPreempted) as stop:
        t.fit(Tiny())
    assert sender.handler_during_fit == watcher._handle  # not Lightning's, which would stop without a checkpoint
    assert stop.value.signal_name == "SIGTERM" and not stop.value.requeued and stop.value.code == 143
    assert stop.value.global_step == 2
    assert not fake_scontrol.exists()  # no requeue at the time limit
    assert_same_state(torch.load(stop.value.checkpoint, weights_only=True), reference_state(tmp_path / "ref", 2))


def test_sigterm_requeue_when_asked_and_older_resume_checkpoints_removed(tmp_path, fake_scontrol):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"old": 1}, run / "hpc_ckpt_3.ckpt")
    t = trainer(run, [SignalAt(batch=0, signum=signal.SIGTERM), PreemptionCheckpoint(requeue_on_sigterm=True)])
    with pytest.raises(TrainingPreempted) as stop:
        t.fit(Tiny())
    assert stop.value.requeued and stop.value.checkpoint.name == "hpc_ckpt_4.ckpt"
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_4.ckpt"]  # keep=1


def test_signal_in_the_last_step_lets_training_finish(tmp_path, fake_scontrol):
    last = BATCHES_PER_EPOCH - 1
    t = trainer(tmp_path / "run", [SignalAt(batch=last, epoch=1), PreemptionCheckpoint()])
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    t.fit(Tiny())  # nothing left to resume: no checkpoint, no requeue
    assert t.global_step == 2 * BATCHES_PER_EPOCH
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert not list((tmp_path / "run").glob("hpc_ckpt_*")) and not fake_scontrol.exists()


def test_no_requeue_outside_slurm(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    t = trainer(tmp_path / "run", [SignalAt(batch=1), PreemptionCheckpoint()])
    with pytest.raises(TrainingPreempted) as stop:
        t.fit(Tiny())
    assert not stop.value.requeued and stop.value.job_id is None and stop.value.code == 128 + signal.SIGUSR1
    assert stop.value.checkpoint.is_file()


def test_handler_passes_signals_on_outside_fit():
    """A handler left in place (Lightning restores handlers after ours on errors) defers to the previous one."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        watcher = PreemptionCheckpoint(requeue_signal="SIGUSR2", save_on_sigterm=False)
        watcher.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watcher.pending == "SIGUSR2" and seen == []
        watcher._uninstall()
        signal.signal(signal.SIGUSR2, watcher._handle)  # as if restored by someone else
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
