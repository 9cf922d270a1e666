"""Kill processes while they save checkpoints (run by ``tests/lightning/test_checkpointing.py``).

Usage::

    python kill_during_save.py ROOT TRIALS SEED            # random kill moments
    python kill_during_save.py ROOT 1 0 --mid-write        # kill with half a checkpoint on disk

For each trial a forked child saves step 1, 2, 3, ... with
:func:`matsciml.lightning.checkpointing.atomic_torch_save` to ``ROOT/trial<i>/last.ckpt``
(overwritten) and ``ROOT/trial<i>/step-<n>.ckpt`` until this process sends it SIGKILL,
at a random moment after its first complete save. This process is started fresh by the
test so that it forks while single-threaded (forking a process that runs threads, such
as a test runner after training, can deadlock the child). The test checks the folders.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from matsciml.lightning.checkpointing import atomic_torch_save

SIZE = 200_000  # 0.8 MB per checkpoint: a save takes milliseconds


def checkpoint(step: int) -> dict:
    return {
        "global_step": step,
        "epoch": 0,
        "state_dict": {"w": torch.full((SIZE,), float(step))},
        "loops": {},
        "optimizer_states": [],
    }


def save_forever(folder: Path, announce_fd: int | None) -> None:
    if announce_fd is not None:  # the second save stops half-way and says so
        real_save = torch.save

        def half_save(obj, fh, *args, **kwargs):
            if obj["global_step"] == 1:
                return real_save(obj, fh, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.write(announce_fd, b"x")
            time.sleep(600)

        torch.save = half_save
    step = 0
    while True:
        step += 1
        state = checkpoint(step)
        atomic_torch_save(state, folder / "last.ckpt")
        atomic_torch_save(state, folder / f"step-{step}.ckpt")


def trial(folder: Path, delay: float, mid_write: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe() if mid_write else (None, None)
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(folder, write_fd)
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        if mid_write:
            os.close(write_fd)
            os.read(read_fd, 1)
        else:
            while not (folder / "last.ckpt").exists() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delay)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main() -> None:
    root, trials, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    mid_write = "--mid-write" in sys.argv
    rng = random.Random(seed)
    for i in range(trials):
        trial(root / f"trial{i}", rng.uniform(0.0, 0.08), mid_write)
    print("done", flush=True)


if __name__ == "__main__":
    main()
