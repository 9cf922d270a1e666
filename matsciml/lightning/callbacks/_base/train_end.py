"""Base of the train-end stages: one pipeline, run once in ``on_fit_end``, with a shared context.

See :mod:`matsciml.lightning.callbacks.train_end` for the stages and the choice of checkpoint.
Stages exchange what they produce only through :class:`TrainEndContext`: before the first
stage runs, each stage may :meth:`~TrainEndCallback.prepare_context` (e.g. the metadata
stage says which keys and config file its metadata uses, so the archive stage can record
the same).
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.lightning.callbacks._utils.reporting import run_folder

__all__ = [
    "CHECKPOINT_PREFERENCES",
    "CheckpointChoice",
    "TrainEndContext",
    "TrainEndCallback",
    "checkpoint_records",
    "find_checkpoints",
    "run_train_end_pipeline",
    "choose_checkpoint",
    "load_checkpoint_weights",
    "SkipStage",
]

#: Values of ``preferred_checkpoint`` (``"current"``: the weights in memory, only when asked for).
CHECKPOINT_PREFERENCES = ("metric", "loss", "current")


class SkipStage(Exception):  # noqa: N818 - a signal to the pipeline, not an error
    """Raised by a stage that has no checkpoint to work on; the pipeline skips it with a warning."""


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointChoice:
    """The checkpoint a stage uses.

    Attributes
    ----------
    path
        The file, or ``None`` for the weights in memory.
    kind
        ``"metric"``, ``"loss"``, ``"last"`` or ``"current"`` (in memory).
    monitor, score
        The monitored quantity and its best value (``None`` for ``"last"``/``"current"``).
    fallback
        Why the preferred checkpoint was not used (``None`` when it was).
    """

    path: Path | None
    kind: str
    monitor: str | None = None
    score: float | None = None
    fallback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {
            "path": None if self.path is None else str(self.path),
            "kind": self.kind,
            "monitor": self.monitor,
            "score": self.score,
            "fallback": self.fallback,
        }


def _score(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError):
        return None


def checkpoint_records(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """What the trainer's ``ModelCheckpoint`` callbacks hold now (``monitor``, best and last paths, best score)."""
    return [
        {
            "monitor": cb.monitor,
            "best_model_path": cb.best_model_path,
            "best_model_score": _score(cb.best_model_score),
            "last_model_path": cb.last_model_path,
        }
        for cb in trainer.callbacks
        if isinstance(cb, ModelCheckpoint)
    ]


def find_checkpoints(
    source: pl.Trainer | list[dict[str, Any]], loss_monitor: str = "val_loss"
) -> dict[str, CheckpointChoice]:
    """The checkpoints on disk, by kind.

    Parameters
    ----------
    source
        A trainer, or :func:`checkpoint_records` taken earlier.
    loss_monitor
        The monitor whose best checkpoint is ``"loss"``.

    Returns
    -------
    dict
        Some of ``"metric"``, ``"loss"``, ``"last"`` (only those whose file exists).
    """
    records = checkpoint_records(source) if isinstance(source, pl.Trainer) else source
    found: dict[str, CheckpointChoice] = {}

    def exists(path: Any) -> bool:
        return bool(path) and Path(path).is_file()

    for rec in records:
        if rec["monitor"] is None or not exists(rec["best_model_path"]):
            continue
        path, score = Path(rec["best_model_path"]), rec["best_model_score"]
        found.setdefault("metric", CheckpointChoice(path, "metric", rec["monitor"], score))
        if rec["monitor"] == loss_monitor:
            found.setdefault("loss", CheckpointChoice(path, "loss", rec["monitor"], score))
    for rec in records:
        if exists(rec["last_model_path"]):
            found.setdefault("last", CheckpointChoice(Path(rec["last_model_path"]), "last"))
    for rec in records:
        if rec["monitor"] is None and exists(rec["best_model_path"]):
            found.setdefault("last", CheckpointChoice(Path(rec["best_model_path"]), "last"))
    return found


def choose_checkpoint(found: dict[str, CheckpointChoice], preferred: str, who: str = "") -> CheckpointChoice:
    """The checkpoint a train-end stage uses.

    ``found[preferred]``; else the other best checkpoint (``"loss"`` for ``"metric"`` and the
    reverse); else the last checkpoint; each fallback with a warning. ``preferred="current"``
    takes the weights in memory. Otherwise, with no checkpoint at all, :class:`SkipStage`.

    Raises
    ------
    SkipStage
        No checkpoint exists and the weights in memory were not asked for.
    """
    if preferred == "current":
        return CheckpointChoice(None, "current")
    if preferred in found:
        return found[preferred]
    what = {"metric": "no ModelCheckpoint with a monitor saved a checkpoint",
            "loss": "no ModelCheckpoint monitors the validation loss"}[preferred]  # fmt: skip
    prefix = f"{who}: " if who else ""
    for other in ("loss" if preferred == "metric" else "metric", "last"):
        if other in found:
            reason = f"preferred_checkpoint={preferred!r} but {what}; using the {other} checkpoint {found[other].path}"
            rank_zero_warn(prefix + reason)
            return CheckpointChoice(found[other].path, found[other].kind, found[other].monitor,
                                    found[other].score, fallback=reason)  # fmt: skip
    raise SkipStage(
        f"preferred_checkpoint={preferred!r} but {what}, and there is no other checkpoint; stage skipped "
        "(preferred_checkpoint: current uses the weights in memory)"
    )


def _check_preference(value: str, name: str) -> str:
    if value not in CHECKPOINT_PREFERENCES:
        raise ConfigError(f"{name}: preferred_checkpoint={value!r}; {closest(str(value), CHECKPOINT_PREFERENCES)}")
    return value


def load_checkpoint_weights(pl_module: pl.LightningModule, choice: CheckpointChoice) -> pl.LightningModule:
    """A CPU copy of ``pl_module`` holding the weights of ``choice`` (the module itself is not changed)."""
    module = copy.deepcopy(pl_module).cpu()  # LightningModule pickling leaves the trainer out
    if choice.path is not None:
        checkpoint = torch.load(choice.path, map_location="cpu", weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


# ----------------------------------------------------------------------------- pipeline
@dataclass
class TrainEndContext:
    """What the stages of one train-end run share.

    Attributes
    ----------
    run_dir
        The run folder (:func:`~matsciml.lightning.callbacks._utils.reporting.run_folder`).
    checkpoints
        :func:`checkpoint_records` at the start of the pipeline (before testing, which
        reloads the checkpoint callbacks' state).
    used
        ``{stage name: CheckpointChoice}`` of the checkpoint each stage used.
    test_metrics
        The metrics of :class:`TestOnTrainEnd` (``{"test_loss": ..., ...}``).
    export_path, archive_path, metadata_path
        Files written by the stages (``None`` when not run).
    export_info
        Metadata of the export (method, mode, outputs).
    metadata_keys, metadata_config
        The config keys and config file the metadata records (set by the metadata stage in
        :meth:`TrainEndCallback.prepare_context`, read by every stage that writes metadata).
    errors
        ``{stage name: "ExceptionType: message"}`` of the stages that failed.
    """

    run_dir: Path
    checkpoints: list[dict[str, Any]]
    used: dict[str, CheckpointChoice] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    export_path: Path | None = None
    export_info: dict[str, Any] = field(default_factory=dict)
    archive_path: Path | None = None
    metadata_path: Path | None = None
    metadata_keys: list[str] = field(default_factory=list)
    metadata_config: Path | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for metadata JSON)."""
        return {
            "checkpoints": {name: choice.as_dict() for name, choice in self.used.items()},
            "test_metrics": dict(self.test_metrics),
            "export": None if self.export_path is None else {"path": str(self.export_path), **self.export_info},
            "archive": None if self.archive_path is None else str(self.archive_path),
            "errors": dict(self.errors),
        }


class TrainEndCallback(Callback):
    """Base of the train-end stages: they run once, in ``on_fit_end``, sorted by :attr:`order`.

    Subclasses set :attr:`order` and implement :meth:`run_train_end`. See the module
    docstring for the pipeline and the checkpoint choice.

    Hooks it acts in: ``on_fit_end`` (the first pipeline callback in
    ``trainer.callbacks`` runs all of them).

    Parameters
    ----------
    preferred_checkpoint
        ``"metric"`` (default), ``"loss"`` or ``"current"`` (the weights in memory). Without
        the preferred checkpoint the other best one is used, else the last one, else the
        stage is skipped with a warning (see :func:`choose_checkpoint`).
    loss_monitor
        Name of the logged validation loss, default ``"val_loss"``.

    Raises
    ------
    ConfigError
        Unknown ``preferred_checkpoint``.
    """

    #: Position in the pipeline (lower runs first).
    order: ClassVar[int] = 100

    def __init__(self, preferred_checkpoint: str = "metric", loss_monitor: str = "val_loss") -> None:
        super().__init__()
        self.preferred_checkpoint = _check_preference(preferred_checkpoint, type(self).__name__)
        self.loss_monitor = str(loss_monitor)
        #: The context of the last pipeline run (``None`` before).
        self.context: TrainEndContext | None = None

    @property
    def stage_name(self) -> str:
        """Name of the stage in messages and in ``context.used`` / ``context.errors``."""
        return type(self).__name__

    def checkpoint(self, context: TrainEndContext) -> CheckpointChoice:
        """The checkpoint this stage uses (recorded in ``context.used``)."""
        found = find_checkpoints(context.checkpoints, self.loss_monitor)
        choice = choose_checkpoint(found, self.preferred_checkpoint, self.stage_name)
        context.used[self.stage_name] = choice
        return choice

    def prepare_context(self, context: TrainEndContext) -> None:
        """Put into ``context`` what other stages need from this one before any runs (default: nothing)."""

    def run_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TrainEndContext) -> None:
        """Do this stage's work (called on every rank)."""
        raise NotImplementedError

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        members = [cb for cb in trainer.callbacks if isinstance(cb, TrainEndCallback)]
        if not members or members[0] is not self:
            return
        run_train_end_pipeline(trainer, pl_module, members)


def run_train_end_pipeline(
    trainer: pl.Trainer, pl_module: pl.LightningModule, members: list[TrainEndCallback]
) -> TrainEndContext:
    """Run ``members`` in ``order`` with one shared :class:`TrainEndContext` and return it."""
    context = TrainEndContext(run_dir=run_folder(trainer), checkpoints=checkpoint_records(trainer))
    members = sorted(members, key=lambda m: m.order)
    for member in members:
        member.prepare_context(context)
    for member in members:
        member.context = context
        try:
            member.run_train_end(trainer, pl_module, context)
        except SkipStage as skip:
            context.errors[member.stage_name] = f"skipped: {skip}"
            rank_zero_warn(f"{member.stage_name}: {skip}")
        except Exception as err:  # noqa: BLE001 - one failing stage must not stop the others
            context.errors[member.stage_name] = f"{type(err).__name__}: {err}"
            rank_zero_warn(
                f"{member.stage_name} failed at the end of training: {type(err).__name__}: {err}\n"
                + "".join(traceback.format_exception(err)[-3:])
            )
    return context
