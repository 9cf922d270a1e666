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
* when that one is missing: the other best checkpoint (``"loss"`` for ``"metric"`` and
  the reverse), else the last checkpoint (``last_model_path``, else the newest checkpoint
  of a ``ModelCheckpoint`` without ``monitor``), with a warning; when there is none either,
  the stage is skipped with a warning. The weights in memory are used only when asked
  for (``preferred_checkpoint: current``).

With :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback` on,
a checkpoint's ``state_dict`` holds the EMA weights, so the tested, exported and archived
weights are the EMA weights of that checkpoint.

Under a multi-process strategy every rank runs the test; files are written by rank 0.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.lightning._compat import preserved_trainer_state
from matsciml.lightning.callbacks._base.train_end import (
    TrainEndCallback,
    TrainEndContext,
    load_checkpoint_weights,
)
from matsciml.lightning.callbacks._utils.run_metadata import collect_metadata, find_config
from matsciml.lightning.checkpointing import atomic_path

__all__ = ["TestOnTrainEnd", "ExportOnTrainEnd", "ArchiveOnTrainEnd", "example_batch", "write_archive"]


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
        (best by ``loss_monitor``); falls back to the other best checkpoint, then to the
        last one, else the stage is skipped with a warning; ``"current"``: the weights in memory.
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
        with preserved_trainer_state(trainer):
            output = trainer.test(
                pl_module,
                datamodule=datamodule,
                ckpt_path=None if choice.path is None else str(choice.path),
                verbose=self.verbose,
            )
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
        module = load_checkpoint_weights(pl_module, choice)
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
        choice = self.checkpoint(context)
        if not trainer.is_global_zero:
            return
        folder = self.dirpath if self.dirpath is not None else context.run_dir
        name = self.filename or f"{context.run_dir.resolve().name or 'run'}.tar.gz"
        target = folder / name
        config = self.config_path if self.config_path is not None else find_config(trainer)
        context.archive_path = target
        # the same keys and config as the metadata stage's metadata.json, when there is one
        source = context.metadata_config if context.metadata_config is not None else config
        metadata = collect_metadata(trainer, pl_module, context.metadata_keys, source, context)
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
    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as archive:
        for name, source in members:
            if isinstance(source, bytes):
                info = tarfile.TarInfo(name)
                info.size = len(source)
                info.mtime = int(time.time())
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(source))
            else:
                archive.add(str(source), arcname=name, recursive=False)
    return path
