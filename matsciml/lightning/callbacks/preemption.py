"""Preemption-safe checkpoints of batch jobs: save at a step boundary, requeue, stop.

SLURM ends a job at its time limit (``SIGTERM``, then ``SIGKILL`` after ``KillWait``,
30 s by default) and can warn it beforehand: ``#SBATCH --signal=SIGUSR1@90`` sends
``SIGUSR1`` 90 s before the limit. Lightning's stock handler for that signal saves a
checkpoint *from inside the signal handler*, i.e. at whatever point of a training step
the process happens to be (between backward and the optimizer step, while EMA weights
are swapped in for validation, half-way through an accumulation window).
:class:`PreemptionCheckpoint` instead only records the signal; at the next optimizer-step
boundary (the start of the next training step, after any validation that followed the
last one) every rank agrees on it, a resume checkpoint ``hpc_ckpt_<n>.ckpt`` is written,
``scontrol requeue <job id>`` is issued (rank 0) and training stops with
:class:`TrainingPreempted`. When the job starts again with the same command, the runner
finds that checkpoint (``--resume auto``) and continues exactly where it stopped.

The job's identity and the requeue command are in :mod:`matsciml.lightning.slurm`.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.checkpoint_io import save_checkpoint_atomic
from matsciml.lightning.checkpointing import AtomicCheckpointIO
from matsciml.lightning.slurm import requeue_job, slurm_job_id

__all__ = ["PreemptionCheckpoint", "TrainingPreempted"]

_HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")
#: Bits of the flag word the ranks agree on.
_REQUEUE, _TERM = 1, 2


class TrainingPreempted(SIGTERMException):
    """Training stopped on a preemption or termination signal after writing a resume checkpoint.

    A :class:`SystemExit`: left uncaught, the program ends with :attr:`code`, ``0`` when
    the job was requeued (it goes on in its next run) and ``128 + signal number`` when
    not (``143`` after ``SIGTERM``), as a shell reports a process ended by that signal.

    Attributes
    ----------
    signal_name
        ``"SIGUSR1"``, ``"SIGTERM"``, ...
    checkpoint
        The resume checkpoint written.
    requeued
        Whether the requeue command succeeded.
    job_id
        The SLURM job id, ``None`` outside SLURM.
    epoch, global_step
        Where training stopped.
    """

    def __init__(
        self,
        signal_name: str,
        checkpoint: Path,
        requeued: bool,
        job_id: str | None,
        epoch: int,
        global_step: int,
    ) -> None:
        number = getattr(signal, signal_name, None)
        code = 0 if requeued else 128 + int(number if number is not None else signal.SIGTERM)
        super().__init__(code)
        self.signal_name = signal_name
        self.checkpoint = Path(checkpoint)
        self.requeued = requeued
        self.job_id = job_id
        self.epoch = epoch
        self.global_step = global_step

    def __str__(self) -> str:
        what = f"SLURM job {self.job_id} requeued" if self.requeued else "not requeued"
        return (
            f"training stopped by {self.signal_name} at epoch {self.epoch}, step {self.global_step}: resume "
            f"checkpoint {self.checkpoint} ({what})"
        )


def _signal_number(value: str | int, where: str) -> signal.Signals:
    try:
        if isinstance(value, str):
            name = value.upper()
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(int(value))
    except (KeyError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a signal name or number (e.g. 'SIGUSR1', 'SIGUSR2')") from None


class PreemptionCheckpoint(Callback):
    """On the requeue signal or ``SIGTERM``: save a resume checkpoint at the next step boundary, requeue, stop.

    The signal handlers only record the signal. The callback acts at the start of the
    next training step that begins an optimizer step (so the gradients of a partial
    accumulation window are never lost, and any validation that followed the last step
    has finished and been recorded by ``ModelCheckpoint``). There, under several
    processes, the ranks agree with one ``all_reduce`` (a signal seen by any rank
    counts), then:

    1. every rank calls ``trainer.save_checkpoint`` on ``<dirpath>/hpc_ckpt_<n>.ckpt``
       (``n`` one above the highest present, Lightning's naming, so that
       ``trainer.fit(ckpt_path="hpc")`` finds it too); the file is written atomically
       and older ``hpc_ckpt_*`` files beyond ``keep`` are removed;
    2. after the requeue signal (or ``SIGTERM`` with ``requeue_on_sigterm``), inside a
       SLURM job, rank 0 runs ``scontrol requeue <job id>``;
    3. every rank raises :class:`TrainingPreempted`; Lightning runs the ``on_exception``
       hooks and tears down, and the exception leaves ``trainer.fit``.

    A signal that arrives after the last training step started ends nothing: training
    completes (there is nothing left to resume) and a message says so.

    Hooks it acts in: ``setup`` (installs the handlers), ``on_train_start`` (re-installs
    the ``SIGTERM`` handler over Lightning's, which would stop training without a
    checkpoint), ``on_train_batch_start`` (the boundary), ``on_train_end``, ``teardown``
    and ``on_exception`` (restore the previous handlers). Handlers are installed from the
    main thread only; outside ``fit`` they pass the signal on to the previous handler
    (the default action of ``SIGTERM`` ends the process).

    Under SLURM, request the warning signal with ``#SBATCH --signal=SIGUSR1@90``: the
    lead time must cover the rest of a step, one validation pass and one checkpoint
    write. ``SIGTERM`` leaves only ``KillWait`` (30 s by default).

    Example::

        callbacks:
          - class_path: matsciml.lightning.callbacks.preemption.PreemptionCheckpoint
            init_args: {requeue_signal: SIGUSR1, save_on_sigterm: true}

    Parameters
    ----------
    requeue_signal
        Signal announcing the end of the job, default ``"SIGUSR1"`` (as
        ``--signal=SIGUSR1@90``).
    save_on_sigterm
        Also save a resume checkpoint on ``SIGTERM`` (default ``True``). ``False`` leaves
        ``SIGTERM`` to Lightning (it stops at the end of the step without saving).
    requeue_on_sigterm
        Requeue the job after a ``SIGTERM`` too (default ``False``: at the time limit or
        on ``scancel`` the job is not put back in the queue; under preemption with
        ``PreemptMode=REQUEUE`` SLURM requeues it itself).
    requeue
        Run the requeue command after the requeue signal. ``None`` (default): when a
        SLURM job id is set.
    dirpath
        Folder of the resume checkpoints; ``None`` (default) = ``trainer.default_root_dir``
        (the run folder of the runner).
    keep
        Number of ``hpc_ckpt_*`` files kept after a new one is written (default 1).
    requeue_command
        The requeue command, ``{job_id}`` replaced (default ``["scontrol", "requeue",
        "{job_id}"]``).

    Raises
    ------
    ConfigError
        An unknown signal or ``keep < 1`` (at construction).
    TrainingPreempted
        From ``trainer.fit``, after the checkpoint was written.
    """

    def __init__(
        self,
        requeue_signal: str | int = "SIGUSR1",
        save_on_sigterm: bool = True,
        requeue_on_sigterm: bool = False,
        requeue: bool | None = None,
        dirpath: str | os.PathLike | None = None,
        keep: int = 1,
        requeue_command: Sequence[str] = ("scontrol", "requeue", "{job_id}"),
    ) -> None:
        super().__init__()
        self.requeue_signal = _signal_number(requeue_signal, "requeue_signal")
        if self.requeue_signal in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
            raise ConfigError(
                f"requeue_signal={requeue_signal!r}: use a signal reserved for the warning, such as SIGUSR1 or SIGUSR2"
            )
        if int(keep) < 1:
            raise ConfigError(f"keep={keep!r} must be >= 1 (the newest resume checkpoint is always kept)")
        self.save_on_sigterm = bool(save_on_sigterm)
        self.requeue_on_sigterm = bool(requeue_on_sigterm)
        self.requeue = requeue
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.keep = int(keep)
        self.requeue_command = [str(part) for part in requeue_command]
        self._flags = 0  # set by the handlers
        self._active = False
        self._originals: dict[int, Any] = {}
        self._launcher_notified = False
        self._trainer: pl.Trainer | None = None
        self._step_at_last_start: int | None = None

    # ------------------------------------------------------------------ signal handling
    @property
    def pending(self) -> str | None:
        """The signal recorded on this rank and not acted on yet (``"SIGUSR1"``, ``"SIGTERM"``), or ``None``."""
        return self._flag_name(self._flags)

    def _flag_name(self, flags: int) -> str | None:
        if flags & _REQUEUE:
            return self.requeue_signal.name
        if flags & _TERM:
            return "SIGTERM"
        return None

    def _managed_signals(self) -> list[signal.Signals]:
        return [self.requeue_signal] + ([signal.SIGTERM] if self.save_on_sigterm else [])

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._active:
            self._pass_on(signum, frame)
            return
        if signum == signal.SIGTERM:
            self._flags |= _TERM
            self._notify_launched_processes(signum)
        else:
            self._flags |= _REQUEUE

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        """Outside ``fit``: behave as the handler that was there before."""
        previous = self._originals.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _notify_launched_processes(self, signum: int) -> None:
        """Pass ``SIGTERM`` on to the processes Lightning itself started (``ddp`` outside SLURM), once."""
        if self._launcher_notified or self._trainer is None:
            return
        self._launcher_notified = True
        launcher = getattr(self._trainer.strategy, "launcher", None)
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signum)

    def install(self) -> None:
        """Install the signal handlers now (the runner does it before ``fit``; ``setup`` does it otherwise)."""
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread; signal handlers cannot be installed")
            return
        for sig in self._managed_signals():
            current = signal.getsignal(sig)
            if current == self._handle:
                continue
            self._originals.setdefault(int(sig), current)
            signal.signal(sig, self._handle)
        self._active = True

    def _uninstall(self) -> None:
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self._managed_signals():
            if signal.getsignal(sig) == self._handle and int(sig) in self._originals:
                signal.signal(sig, self._originals[int(sig)])

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer  # a signal recorded since install() is kept
        self._launcher_notified = False
        self._step_at_last_start = None
        self.install()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler after ``setup``: take SIGTERM back
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) != self._handle:
                signal.signal(signal.SIGTERM, self._handle)
        self._active = True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        boundary = batch_idx == 0 or self._step_at_last_start is None or step != self._step_at_last_start
        self._step_at_last_start = step
        if not boundary:
            return  # inside a gradient-accumulation window: its gradients are not in any checkpoint
        flags = self._agreed_flags(trainer)
        if flags:
            self._stop(trainer, flags)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.pending
        if name is not None:
            rank_zero_info(
                f"PreemptionCheckpoint: {name} arrived during the last training step; training finished, "
                "nothing to resume and the job is not requeued"
            )
        self._flags = 0

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._uninstall()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    # ------------------------------------------------------------------ the stop
    def _agreed_flags(self, trainer: pl.Trainer) -> int:
        local = self._flags
        dist = torch.distributed
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            word = torch.tensor(
                [local & _REQUEUE, local & _TERM], dtype=torch.int64, device=trainer.strategy.root_device
            )
            dist.all_reduce(word, op=dist.ReduceOp.MAX)
            values = word.tolist()
            return int(values[0]) | int(values[1])
        return local

    def _folder(self, trainer: pl.Trainer) -> Path:
        return self.dirpath if self.dirpath is not None else Path(trainer.default_root_dir)

    @staticmethod
    def _numbers(folder: Path) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if folder.is_dir():
            for path in folder.iterdir():
                match = _HPC_NAME.match(path.name)
                if match:
                    found[int(match.group(1))] = path
        return found

    def _save(self, trainer: pl.Trainer) -> Path:
        folder = self._folder(trainer)
        numbers = self._numbers(folder)
        path = folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
        path = Path(trainer.strategy.broadcast(str(path), src=0))
        if isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.save_checkpoint(path, weights_only=False)
        else:  # write under a temporary name, rename on rank 0 once complete (save_checkpoint ends with a barrier)
            save_checkpoint_atomic(trainer, path)
        if trainer.is_global_zero:
            numbers = self._numbers(folder)
            for number in sorted(numbers)[: -self.keep]:
                if numbers[number] != path:
                    numbers[number].unlink(missing_ok=True)
        return path

    def _stop(self, trainer: pl.Trainer, flags: int) -> None:
        name = self._flag_name(flags) or "SIGTERM"
        by_requeue_signal = bool(flags & _REQUEUE)
        epoch, step = trainer.current_epoch, trainer.global_step
        path = self._save(trainer)
        job = slurm_job_id()
        wants_requeue = by_requeue_signal or self.requeue_on_sigterm
        enabled = self.requeue if self.requeue is not None else job is not None
        requeued = False
        if wants_requeue and enabled:
            problem = ""
            if trainer.is_global_zero:
                problem = (
                    "no SLURM job id (SLURM_JOB_ID is not set)"
                    if job is None
                    else requeue_job(job, self.requeue_command)
                )
            problem = trainer.strategy.broadcast(problem, src=0)
            requeued = not problem
            if problem:
                rank_zero_warn(
                    f"PreemptionCheckpoint: the job was NOT requeued: {problem}. Resubmit the same command; it "
                    f"resumes from {path}"
                )
        what = f"SLURM job {job} requeued" if requeued else "the job was not requeued"
        rank_zero_info(
            f"PreemptionCheckpoint: {name} received; stopped at epoch {epoch}, step {step}; resume checkpoint "
            f"{path}; {what}"
        )
        self._flags = 0
        raise TrainingPreempted(name, path, requeued, job, epoch, step)
