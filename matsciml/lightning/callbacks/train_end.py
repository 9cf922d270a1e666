"""The train-end pipeline: test the best checkpoint, export it, archive the run (and record its metadata).

Callbacks derived from :class:`TrainEndCallback` form one pipeline that runs once, in
``on_fit_end`` (after the last validation and the last checkpoint), in a fixed order
whatever their order in the callback list:

* ``order = 10``: :class:`TestOnTrainEnd`, logs the ``test_*`` metrics;
* ``order = 20``: :class:`ExportOnTrainEnd`, writes ``<run>/export/model.pt``;
* ``order = 30``: :class:`ArchiveOnTrainEnd`, writes ``<run>/<run name>.tar.gz``;
* ``order = 40``: :class:`~matsciml.lightning.callbacks.metadata.MetadataLogger`, writes
  ``<run>/metadata.json``.

The first pipeline callback that Lightning calls runs every configured one, sorted by
``order`` (ties keep the list order); the others then do nothing. They share a
:class:`TrainEndContext`, so later stages see what earlier ones produced (the archive
holds the exported model; the metadata names the tested checkpoint, its test metrics,
the export and the archive). A stage that fails is reported with a warning and recorded
in ``context.errors``; the next stages still run (training is over and its checkpoints
are on disk: an export error must not lose the archive).

**Which checkpoint.** ``preferred_checkpoint`` picks among the trainer's
:class:`~lightning.pytorch.callbacks.ModelCheckpoint` callbacks, as they stand when
``fit`` ends:

* ``"metric"``: ``best_model_path`` of the first one with a ``monitor``;
* ``"loss"``: ``best_model_path`` of the first one monitoring ``loss_monitor``
  (``"val_loss"``);
* when that one is missing: the last checkpoint (``last_model_path``, else the newest
  checkpoint of a ``ModelCheckpoint`` without ``monitor``), with a warning; when there is
  none either, the weights in memory, with a warning.

With :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback` on,
a checkpoint's ``state_dict`` holds the EMA weights, so the tested, exported and archived
weights are the EMA weights of that checkpoint.

Under a multi-process strategy every rank runs the test; files are written by rank 0.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.lightning.callbacks._utils.reporting import run_folder

__all__ = [
    "CHECKPOINT_PREFERENCES",
    "CheckpointChoice",
    "TrainEndContext",
    "TrainEndCallback",
    "TestOnTrainEnd",
    "ExportOnTrainEnd",
    "ArchiveOnTrainEnd",
    "checkpoint_records",
    "find_checkpoints",
    "run_train_end_pipeline",
    "example_batch",
    "write_archive",
    "choose_checkpoint",
]

#: Values of ``preferred_checkpoint``.
CHECKPOINT_PREFERENCES = ("metric", "loss")


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
    """``found[preferred]``, else the last checkpoint, else the weights in memory (warning for each fallback)."""
    if preferred in found:
        return found[preferred]
    what = {"metric": "no ModelCheckpoint with a monitor saved a checkpoint",
            "loss": "no ModelCheckpoint monitors the validation loss"}[preferred]  # fmt: skip
    prefix = f"{who}: " if who else ""
    if "last" in found:
        reason = f"preferred_checkpoint={preferred!r} but {what}; using the last checkpoint {found['last'].path}"
        rank_zero_warn(prefix + reason)
        last = found["last"]
        return CheckpointChoice(last.path, "last", fallback=reason)
    reason = (
        f"preferred_checkpoint={preferred!r} but {what}, and there is no last checkpoint; using the weights in memory"
    )
    rank_zero_warn(prefix + reason)
    return CheckpointChoice(None, "current", fallback=reason)


def _check_preference(value: str, name: str) -> str:
    if value not in CHECKPOINT_PREFERENCES:
        raise ConfigError(f"{name}: preferred_checkpoint={value!r}; {closest(str(value), CHECKPOINT_PREFERENCES)}")
    return value


def _load_weights(pl_module: pl.LightningModule, choice: CheckpointChoice) -> pl.LightningModule:
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
        ``"metric"`` (default) or ``"loss"``.
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
    for member in sorted(members, key=lambda m: m.order):
        member.context = context
        try:
            member.run_train_end(trainer, pl_module, context)
        except Exception as err:  # noqa: BLE001 - one failing stage must not stop the others
            context.errors[member.stage_name] = f"{type(err).__name__}: {err}"
            rank_zero_warn(
                f"{member.stage_name} failed at the end of training: {type(err).__name__}: {err}\n"
                + "".join(traceback.format_exception(err)[-3:])
            )
    return context


# ----------------------------------------------------------------------------- test
class TestOnTrainEnd(TrainEndCallback):
    """Test the best checkpoint (not the last weights) when training ends.

    Calls ``trainer.test(pl_module, datamodule=trainer.datamodule, ckpt_path=<checkpoint>)``,
    so the task's ``test_step`` logs its ``test_*`` metrics to the run's loggers as in any
    test run. The checkpoint's ``state_dict`` is what is tested: the EMA weights when
    :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback` is on.
    Afterwards the module holds the tested weights, and the trainer's state and its
    ``ModelCheckpoint`` callbacks (which the test reloads from the checkpoint) are put
    back as they were at the end of ``fit``. Nothing is tested (with a warning) when the
    trainer has no data module, or the data module no test set.

    Hooks it acts in: ``on_fit_end`` (through the train-end pipeline, first stage).

    Example::

        trainer:
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {monitor: val_energy_mae, mode: min}
            - class_path: matsciml.lightning.callbacks.train_end.TestOnTrainEnd
              init_args: {preferred_checkpoint: metric}

    Parameters
    ----------
    preferred_checkpoint
        ``"metric"`` (default: best by the ``ModelCheckpoint`` monitor) or ``"loss"``
        (best by ``loss_monitor``); falls back to the last checkpoint, then to the
        weights in memory, with a warning.
    loss_monitor
        Logged validation loss, default ``"val_loss"``.
    verbose
        Print Lightning's table of test metrics, default ``False``.

    Attributes
    ----------
    results
        ``{name: value}`` of the test (also in ``context.test_metrics``).

    Raises
    ------
    ConfigError
        Unknown ``preferred_checkpoint``.
    """

    order: ClassVar[int] = 10

    def __init__(self, preferred_checkpoint: str = "metric", loss_monitor: str = "val_loss", verbose: bool = False):
        super().__init__(preferred_checkpoint, loss_monitor)
        self.verbose = bool(verbose)
        self.results: dict[str, float] = {}

    @override
    def run_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TrainEndContext) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not _has_test_data(datamodule):
            rank_zero_warn(f"{self.stage_name}: nothing to test (no data module with a test set); skipped")
            return
        choice = self.checkpoint(context)
        saved_state = (trainer.state.fn, trainer.state.status, trainer.state.stage)
        saved_ckpt = [(cb, dict(vars(cb))) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        try:
            output = trainer.test(
                pl_module,
                datamodule=datamodule,
                ckpt_path=None if choice.path is None else str(choice.path),
                verbose=self.verbose,
            )
        finally:
            trainer.state.fn, trainer.state.status, trainer.state.stage = saved_state
            for cb, attributes in saved_ckpt:
                vars(cb).update(attributes)
        metrics: dict[str, float] = {}
        for results in output or []:
            metrics.update({k: float(v) for k, v in results.items()})
        self.results = metrics
        context.test_metrics.update(metrics)
        rank_zero_info(f"{self.stage_name}: tested {choice.path or 'the weights in memory'}: {metrics}")


def _has_test_data(datamodule: Any) -> bool:
    hook = getattr(datamodule, "test_dataloader", None)
    if hook is None:
        return False
    try:
        loader = hook()
    except (NotImplementedError, RuntimeError, KeyError):
        return False
    if isinstance(loader, (list, tuple)):
        return len(loader) > 0
    return loader is not None


# ----------------------------------------------------------------------------- export
class ExportOnTrainEnd(TrainEndCallback):
    """Write an inference artefact (encoder and heads) of the chosen checkpoint when training ends.

    Loads the checkpoint's weights into a copy of the task and calls
    :func:`matsciml.lightning.export.export_model` with a batch of the data module
    (validation set, else test, else training set) as the example; the artefact is
    checked against the task on that batch before it is written. When ``method`` fails
    and ``fallback`` is on, the other method is tried (with a warning). Keys computed by
    autograd (forces, stress) are not exported: see :mod:`matsciml.lightning.export`.
    Load the file with :func:`matsciml.lightning.export.load_exported`.

    Hooks it acts in: ``on_fit_end`` (through the train-end pipeline, after
    :class:`TestOnTrainEnd`); the file is written by rank 0.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.train_end.ExportOnTrainEnd
              init_args: {method: torchscript, preferred_checkpoint: loss}

    Parameters
    ----------
    method
        ``"torchscript"`` (default; works with this package's encoders) or ``"export"``
        (``torch.export``, dynamic batch sizes; needs export-friendly encoder code).
    preferred_checkpoint
        ``"metric"`` (default) or ``"loss"``, with the fallback of the module docstring.
    loss_monitor
        Logged validation loss, default ``"val_loss"``.
    dirpath
        Folder of the file, default ``<run folder>/export``.
    filename
        File name, default ``model.pt`` (TorchScript) or ``model.pt2`` (``torch.export``).
    keys
        Prediction keys to export (default: the task's keys that need no autograd).
    fallback
        Try the other method when ``method`` fails (default ``True``).

    Attributes
    ----------
    path
        The written file (``None`` before the end of training or on failure).

    Raises
    ------
    ConfigError
        Unknown ``method`` or ``preferred_checkpoint`` (at construction).
    matsciml.lightning.export.ExportError
        Neither method exports the model (reported as a warning by the pipeline).
    """

    order: ClassVar[int] = 20

    def __init__(
        self,
        method: str = "torchscript",
        preferred_checkpoint: str = "metric",
        loss_monitor: str = "val_loss",
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        keys: list[str] | None = None,
        fallback: bool = True,
    ) -> None:
        from matsciml.lightning.export import METHODS

        super().__init__(preferred_checkpoint, loss_monitor)
        if method not in METHODS:
            raise ConfigError(f"ExportOnTrainEnd: method={method!r}; {closest(str(method), METHODS)}")
        self.method = method
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.keys = None if keys is None else [str(k) for k in keys]
        self.fallback = bool(fallback)
        self.path: Path | None = None

    def _target(self, context: TrainEndContext, method: str) -> Path:
        folder = self.dirpath if self.dirpath is not None else context.run_dir / "export"
        name = self.filename or ("model.pt" if method == "torchscript" else "model.pt2")
        return folder / name

    @override
    def run_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TrainEndContext) -> None:
        from matsciml.lightning.export import ExportError, export_model

        choice = self.checkpoint(context)
        if not trainer.is_global_zero:
            return
        batch = example_batch(trainer)
        if batch is None:
            raise ConfigError(f"{self.stage_name}: no data to take an example batch from (no data module or loaders)")
        module = _load_weights(pl_module, choice)
        methods = [self.method] + ([m for m in ("torchscript", "export") if m != self.method] if self.fallback else [])
        failures = []
        for method in methods:
            try:
                path = export_model(
                    module,
                    batch,
                    self._target(context, method),
                    method=method,
                    keys=self.keys,
                    extra_metadata={"checkpoint": choice.as_dict()},
                )
            except ExportError as err:
                failures.append(f"{method}: {err}")
                if method != methods[-1]:
                    rank_zero_warn(f"{self.stage_name}: method={method!r} failed ({err}); trying {methods[-1]!r}")
                continue
            self.path = path
            context.export_path = path
            context.export_info = {"method": method, "checkpoint": str(choice.path) if choice.path else None}
            rank_zero_info(f"{self.stage_name}: wrote {path} ({method}) from {choice.path or 'the weights in memory'}")
            return
        raise ExportError("; ".join(failures))


def example_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the data module's validation, test or training loader (``None`` if none)."""
    datamodule = trainer.datamodule
    sources = []
    if datamodule is not None:
        sources = [getattr(datamodule, f"{split}_dataloader", None) for split in ("val", "test", "train")]
    for source in sources:
        if source is None:
            continue
        try:
            loader = source()
        except (NotImplementedError, RuntimeError, KeyError):
            continue
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            continue
        for batch in loader:
            return batch
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is not None:
            for batch in loaders:
                return batch
    return None


# ----------------------------------------------------------------------------- archive
class ArchiveOnTrainEnd(TrainEndCallback):
    """Pack the run into one ``.tar.gz`` when training ends: checkpoint, resolved config, metadata, export.

    Members of the archive:

    * ``model.ckpt``: the chosen checkpoint (EMA weights in its ``state_dict`` when EMA
      is on); loads with ``Task.load_from_checkpoint`` and ``torch.load(weights_only=True)``;
    * ``config.yaml``: the resolved config of the run (``config_path``, else
      ``config.yaml`` in the run folder or ``trainer.default_root_dir``), when present;
    * ``metadata.json``: :func:`~matsciml.lightning.callbacks.metadata.collect_metadata`
      (as the :class:`~matsciml.lightning.callbacks.metadata.MetadataLogger` of the
      pipeline would write it, with its ``keys``), including the test metrics and
      which checkpoint was archived;
    * ``export/<file>``: the file of :class:`ExportOnTrainEnd`, when it ran.

    The archive is written to a temporary file in the destination folder and renamed,
    so a crash never leaves a truncated archive.

    Hooks it acts in: ``on_fit_end`` (through the train-end pipeline, after the export);
    written by rank 0.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.train_end.ArchiveOnTrainEnd
              init_args: {preferred_checkpoint: metric}

    Parameters
    ----------
    preferred_checkpoint
        ``"metric"`` (default) or ``"loss"``, with the fallback of the module docstring
        (with no checkpoint at all the archive has no ``model.ckpt``).
    loss_monitor
        Logged validation loss, default ``"val_loss"``.
    dirpath
        Folder of the archive, default the run folder.
    filename
        Archive name, default ``<run folder name>.tar.gz``.
    config_path
        The resolved config to include (default: ``config.yaml`` of the run folder).
    include_export
        Include the exported model (default ``True``).

    Attributes
    ----------
    path
        The written archive.

    Raises
    ------
    ConfigError
        Unknown ``preferred_checkpoint``.
    """

    order: ClassVar[int] = 30

    def __init__(
        self,
        preferred_checkpoint: str = "metric",
        loss_monitor: str = "val_loss",
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        config_path: str | os.PathLike | None = None,
        include_export: bool = True,
    ) -> None:
        super().__init__(preferred_checkpoint, loss_monitor)
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.config_path = None if config_path is None else Path(config_path)
        self.include_export = bool(include_export)
        self.path: Path | None = None

    @override
    def run_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TrainEndContext) -> None:
        from matsciml.lightning.callbacks.metadata import MetadataLogger, collect_metadata, find_config

        choice = self.checkpoint(context)
        if not trainer.is_global_zero:
            return
        folder = self.dirpath if self.dirpath is not None else context.run_dir
        name = self.filename or f"{context.run_dir.resolve().name or 'run'}.tar.gz"
        target = folder / name
        config = self.config_path if self.config_path is not None else find_config(trainer)
        logger = next((cb for cb in trainer.callbacks if isinstance(cb, MetadataLogger)), None)
        context.archive_path = target
        if logger is not None:
            metadata = logger.collect(trainer, pl_module, context)
        else:
            metadata = collect_metadata(trainer, pl_module, config_path=config, context=context)
        metadata["archived_checkpoint"] = choice.as_dict()
        members: list[tuple[str, Path | bytes]] = []
        if choice.path is not None:
            members.append(("model.ckpt", choice.path))
        if config is not None and Path(config).is_file():
            members.append(("config.yaml", Path(config)))
        members.append(("metadata.json", json.dumps(metadata, indent=2, default=str).encode("utf-8")))
        if self.include_export and context.export_path is not None and Path(context.export_path).is_file():
            members.append((f"export/{Path(context.export_path).name}", Path(context.export_path)))
        write_archive(target, members)
        self.path = target
        rank_zero_info(f"{self.stage_name}: wrote {target} ({', '.join(m for m, _ in members)})")


def write_archive(path: str | os.PathLike, members: list[tuple[str, Path | bytes]]) -> Path:
    """Write a ``.tar.gz`` of ``members`` (``(name in archive, file path or bytes)``) atomically.

    Raises
    ------
    FileNotFoundError
        A member file does not exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with tarfile.open(tmp, "w:gz") as archive:
            for name, source in members:
                if isinstance(source, bytes):
                    info = tarfile.TarInfo(name)
                    info.size = len(source)
                    info.mtime = int(time.time())
                    info.mode = 0o644
                    archive.addfile(info, io.BytesIO(source))
                else:
                    archive.add(str(source), arcname=name, recursive=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
