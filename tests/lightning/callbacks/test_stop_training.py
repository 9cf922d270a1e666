"""StopTrainingError: raised from a callback hook or the task, it ends fit at that step with status 0 and a checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from matsciml.lightning.callbacks import StopTrainingCheckpoint, StopTrainingError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    from lightning.pytorch.callbacks import Callback
    from _callback_toys import ToyTask, make_datamodule, make_trainer
    from matsciml.lightning.callbacks import StopTrainingCheckpoint, StopTrainingError
    import logging
    logging.basicConfig(level=logging.INFO)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.INFO)

    class StopAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                raise StopTrainingError("plateau reached")

    trainer = make_trainer({root!r}, [StopAt(), StopTrainingCheckpoint()], max_epochs=10)
    trainer.fit(ToyTask(), datamodule=make_datamodule(n=12, batch_size=4))
    print("NOT REACHED")
    """
)


def test_raised_at_step_7_ends_fit_at_step_7_with_status_0_and_a_checkpoint(tmp_path):
    # 12 samples, batch 4: 3 steps per epoch, so step 7 is inside epoch 2 (a stop mid-epoch)
    script = SCRIPT.format(here=str(HERE), root=str(tmp_path))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT REACHED" not in done.stdout
    ckpt = tmp_path / "checkpoints" / "stopped.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 7
    assert state["epoch"] == 2
    assert "plateau reached" in done.stdout + done.stderr


class _RaisingTask(ToyTask):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 7:
            raise StopTrainingError("raised by the task")
        return super().training_step(batch, batch_idx)


def test_raised_by_the_task_checkpoint_holds_the_weights_after_step_7(tmp_path):
    torch.manual_seed(0)
    task = _RaisingTask()
    trainer = make_trainer(tmp_path, [StopTrainingCheckpoint(dirpath=tmp_path / "out")], max_epochs=10)
    with pytest.raises(StopTrainingError) as info:
        trainer.fit(task, datamodule=make_datamodule(n=12, batch_size=4))
    stop = info.value
    assert stop.code == 0 and stop.global_step == 7 and stop.checkpoint == tmp_path / "out" / "stopped.ckpt"
    assert trainer.global_step == 7
    state = torch.load(stop.checkpoint, weights_only=True, map_location="cpu")
    # oracle: an uninterrupted run of exactly 7 steps from the same seed has the same weights
    torch.manual_seed(0)
    reference = ToyTask()
    make_trainer(tmp_path / "ref", [], max_steps=7, max_epochs=10).fit(
        reference, datamodule=make_datamodule(n=12, batch_size=4)
    )
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=0, atol=0)
    assert "raised by the task" in str(stop)


def test_other_errors_write_no_checkpoint(tmp_path):
    class Boom(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            raise RuntimeError("boom")

    trainer = make_trainer(tmp_path, [Boom(), StopTrainingCheckpoint()], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(ToyTask(), datamodule=make_datamodule(n=12, batch_size=4))
    assert not (tmp_path / "checkpoints" / "stopped.ckpt").exists()
