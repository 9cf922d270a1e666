"""``UploadCheckpoint``: send the best checkpoint, the run's config, report and metadata to MLflow and W&B."""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from matsciml.common.errors import ConfigError, closest
from matsciml.lightning.callbacks._base import train_end as stages
from matsciml.lightning.callbacks._base.isolation import CallbackError
from matsciml.lightning.callbacks._utils.checkpoint_io import checkpoint_dir, save_local_checkpoint_atomic
from matsciml.lightning.callbacks._utils.reporting import run_folder
from matsciml.lightning.callbacks._utils.run_metadata import collect_metadata, find_config
from matsciml.lightning.callbacks._utils.trackers import stage_files, tracker_loggers, upload_folder

__all__ = ["UploadCheckpoint", "BEST_NAME", "LAST_NAME", "ERROR_NAME", "METADATA_NAME", "CONFIG_NAME"]

#: Names of the uploaded files (in the MLflow folder and in the W&B artifact).
BEST_NAME = "best.ckpt"
LAST_NAME = "last.ckpt"
ERROR_NAME = "error.ckpt"
CONFIG_NAME = "config.yaml"
METADATA_NAME = "metadata.json"
_PREFERENCES = ("metric", "loss")


class UploadCheckpoint(Callback):
    """Upload the run's best checkpoint, config, training-dynamics figure and metadata to the trackers.

    When ``fit`` has ended, every :class:`~lightning.pytorch.loggers.MLFlowLogger` and
    :class:`~lightning.pytorch.loggers.WandbLogger` of the trainer receives the same files:

    * ``best.ckpt``: the best checkpoint of the trainer's ``ModelCheckpoint`` callbacks
      (``preferred_checkpoint``, with the fallbacks of the train-end stages: the other best
      checkpoint, else the last one, each with a warning); with
      :class:`~matsciml.lightning.callbacks.ExponentialMovingAverageCallback` on, its
      ``state_dict`` holds the EMA weights (the checkpoint is uploaded as written);
    * ``last.ckpt``: the last checkpoint (``last_model_path``), with ``upload_last``;
    * ``config.yaml``: the run's resolved config (``config_path``, else ``config.yaml`` of
      the run folder, written there by the runner), when there is one;
    * the training-dynamics figure ``<run folder>/<report_filename>``
      (:class:`~matsciml.lightning.callbacks.TrainingDynamicsReport`), when written;
    * the archive of :class:`~matsciml.lightning.callbacks.ArchiveOnTrainEnd`, when it ran
      and ``upload_archive``;
    * ``metadata.json``: :func:`~matsciml.lightning.callbacks._utils.run_metadata.collect_metadata`
      (hyperparameters, git commit, versions, host, seed, the train-end stages' results)
      plus ``"upload"``: which checkpoints were uploaded (path, monitor, score, step).

    MLflow: the run's artifacts under ``artifact_path`` (``model/best.ckpt``, ...). W&B: one
    artifact ``<artifact_name>`` (default ``model-<run id>``) of type ``model`` holding the
    files, with the aliases ``best`` and ``latest`` and the checkpoint choice as metadata.

    **A failed run.** When training raises (an ``Exception`` or ``KeyboardInterrupt``; a
    ``SystemExit`` such as :class:`~matsciml.lightning.callbacks.StopTrainingError` or a
    preemption is not a failure), the error checkpoint is uploaded as ``error.ckpt`` with the
    config, the figure when it exists already (list this callback after
    ``TrainingDynamicsReport``, whose ``on_exception`` writes it) and ``metadata.json``
    (with ``"error"``); W&B alias ``error``. The error checkpoint is the one the failure
    isolation wrote (:class:`~matsciml.lightning.callbacks.CallbackError`), else one this
    callback writes atomically to ``<run>/checkpoints/error-step<k>.ckpt`` (the same
    content as a ``ModelCheckpoint`` file: EMA weights in ``state_dict``). An upload error
    is reported as a warning and never hides the training error.

    Under several processes only global rank 0 uploads (and writes the error checkpoint).

    luxonis-train's ``UploadCheckpoint`` / ``UploadCheckpointOnTrainEnd`` are the same
    callback in YAML; their ``upload_directory`` is ``artifact_path``.

    Hooks it acts in: ``on_fit_start`` (warns when the trainer has no MLflow or W&B
    logger), ``on_fit_end`` (notes that fit finished), ``teardown`` of ``fit`` (the upload:
    after every ``on_fit_end``, so the train-end stages and the figure are done, and before
    Lightning finalises the loggers), ``on_exception`` (the failure upload).

    Example::

        trainer:
          logger:
            - class_path: lightning.pytorch.loggers.MLFlowLogger
              init_args: {experiment_name: devset, tracking_uri: http://127.0.0.1:5000}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {monitor: val_loss, save_last: true}
            - kind: ema
              decay: 0.999
            - kind: TrainingDynamicsReport
            - kind: UploadCheckpoint
              upload_last: true

    Needs ``pip install 'matsciml[tracking]'`` (mlflow, wandb) for the loggers themselves.

    Parameters
    ----------
    preferred_checkpoint
        ``"metric"`` (default: best by the first ``ModelCheckpoint`` with a monitor) or
        ``"loss"`` (best by ``loss_monitor``).
    loss_monitor
        Logged validation loss, default ``"val_loss"``.
    upload_last
        Also upload the last checkpoint as ``last.ckpt`` (default ``False``).
    artifact_path
        MLflow folder of the files, default ``"model"`` (``""``: the artifacts' root).
    artifact_name
        W&B artifact name, default ``model-<run id>``.
    config_path
        The config file to upload (default: ``config.yaml`` of the run folder).
    report_filename
        File name of the training-dynamics figure in the run folder, default
        ``"training_dynamics.png"``.
    upload_archive
        Upload the train-end archive when there is one (default ``True``).
    upload_on_exception
        Upload an error checkpoint when training fails (default ``True``).

    Attributes
    ----------
    uploads
        One record per logger and upload: ``{"logger", "kind", "destination", "files"}``.
    error_checkpoint
        The error checkpoint of a failed run (``None`` otherwise).

    Raises
    ------
    ConfigError
        Unknown ``preferred_checkpoint``, or a file name with folders (at construction).
    """

    def __init__(
        self,
        preferred_checkpoint: str = "metric",
        loss_monitor: str = "val_loss",
        upload_last: bool = False,
        artifact_path: str = "model",
        artifact_name: str | None = None,
        config_path: str | os.PathLike | None = None,
        report_filename: str = "training_dynamics.png",
        upload_archive: bool = True,
        upload_on_exception: bool = True,
    ) -> None:
        super().__init__()
        if preferred_checkpoint not in _PREFERENCES:
            raise ConfigError(
                f"UploadCheckpoint: preferred_checkpoint={preferred_checkpoint!r}; "
                f"{closest(str(preferred_checkpoint), _PREFERENCES)}"
            )
        if not isinstance(report_filename, str) or Path(report_filename).name != report_filename:
            raise ConfigError(f"UploadCheckpoint: report_filename={report_filename!r} must be a file name")
        self.preferred_checkpoint = preferred_checkpoint
        self.loss_monitor = str(loss_monitor)
        self.upload_last = bool(upload_last)
        self.artifact_path = str(artifact_path or "").strip("/")
        self.artifact_name = artifact_name
        self.config_path = None if config_path is None else Path(config_path)
        self.report_filename = report_filename
        self.upload_archive = bool(upload_archive)
        self.upload_on_exception = bool(upload_on_exception)
        self.uploads: list[dict[str, Any]] = []
        self.error_checkpoint: Path | None = None
        self._fit_ended = False

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = False
        if not tracker_loggers(trainer):
            rank_zero_warn(
                "UploadCheckpoint: the trainer has no MLFlowLogger or WandbLogger; nothing will be uploaded "
                "(add one to the trainer's loggers; pip install 'matsciml[tracking]')"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_ended = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self._fit_ended:
            return
        self._fit_ended = False
        if trainer.is_global_zero and tracker_loggers(trainer):
            self._upload_success(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._fit_ended = False
        if not self.upload_on_exception or not isinstance(exception, (Exception, KeyboardInterrupt)):
            return
        if not trainer.is_global_zero or not tracker_loggers(trainer):
            return
        try:
            self._upload_failure(trainer, pl_module, exception)
        except Exception as err:  # noqa: BLE001 - never hide the training error
            rank_zero_warn(
                f"UploadCheckpoint: could not upload the error checkpoint after the failure: "
                f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exception(err)[-3:])
            )

    # ------------------------------------------------------------------ what is uploaded
    def _checkpoints(self, trainer: pl.Trainer) -> tuple[dict[str, Path], dict[str, Any]]:
        """(``{name: file}``, ``{name: choice record}``) of the checkpoints to upload."""
        records = stages.checkpoint_records(trainer)
        found = stages.find_checkpoints(records, self.loss_monitor)
        files: dict[str, Path] = {}
        info: dict[str, Any] = {}
        try:
            choice = stages.choose_checkpoint(found, self.preferred_checkpoint, "UploadCheckpoint")
        except stages.SkipStage as skip:
            rank_zero_warn(f"UploadCheckpoint: no checkpoint to upload: {skip}")
        else:
            files[BEST_NAME] = Path(choice.path)
            info[BEST_NAME] = choice.as_dict()
        if self.upload_last:
            last = next((Path(r["last_model_path"]) for r in records
                         if r["last_model_path"] and Path(r["last_model_path"]).is_file()), None)  # fmt: skip
            if last is None:
                rank_zero_warn("UploadCheckpoint: upload_last=True but no ModelCheckpoint wrote a last checkpoint")
            else:
                files[LAST_NAME] = last
                info[LAST_NAME] = {"path": str(last), "kind": "last"}
        return files, info

    def _context(self, trainer: pl.Trainer) -> Any:
        """The train-end pipeline's context when the trainer ran one (``None`` otherwise)."""
        for callback in trainer.callbacks:
            if isinstance(callback, stages.TrainEndCallback) and callback.context is not None:
                return callback.context
        return None

    def _common_files(self, trainer: pl.Trainer) -> dict[str, Path]:
        files: dict[str, Path] = {}
        config = self.config_path if self.config_path is not None else find_config(trainer)
        if config is not None and Path(config).is_file():
            files[CONFIG_NAME] = Path(config)
        elif self.config_path is not None:
            rank_zero_warn(f"UploadCheckpoint: config_path={str(self.config_path)!r} does not exist; not uploaded")
        report = run_folder(trainer) / self.report_filename
        if report.is_file():
            files[self.report_filename] = report
        return files

    def _upload_success(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        files, info = self._checkpoints(trainer)
        files.update(self._common_files(trainer))
        context = self._context(trainer)
        archive = getattr(context, "archive_path", None)
        if self.upload_archive and archive is not None and Path(archive).is_file():
            files[Path(archive).name] = Path(archive)
        upload = {"checkpoints": info, "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        metadata = collect_metadata(trainer, pl_module, context=context)
        metadata["upload"] = upload
        self._send(trainer, files, metadata, aliases=["best", "latest"], artifact_metadata=upload)

    def _upload_failure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        path = _isolation_checkpoint(exception)
        if path is None:
            if getattr(trainer.state, "fn", None) != TrainerFn.FITTING or trainer.lightning_module is None:
                return
            path = checkpoint_dir(trainer) / f"error-step{trainer.global_step}.ckpt"
            save_local_checkpoint_atomic(trainer, path)
        self.error_checkpoint = Path(path)
        files = {ERROR_NAME: Path(path), **self._common_files(trainer)}
        error = f"{type(exception).__name__}: {exception}"
        upload = {
            "checkpoints": {ERROR_NAME: {"path": str(path), "kind": "error"}},
            "error": error,
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
        }
        metadata = collect_metadata(trainer, pl_module)
        metadata["upload"] = upload
        self._send(trainer, files, metadata, aliases=["error"], artifact_metadata=upload)

    def _send(
        self,
        trainer: pl.Trainer,
        files: Mapping[str, Path],
        metadata: dict[str, Any],
        aliases: list[str],
        artifact_metadata: dict[str, Any],
    ) -> None:
        folder = run_folder(trainer)
        parent = folder if folder.is_dir() else None
        with tempfile.TemporaryDirectory(prefix=".upload-", dir=parent) as tmp:
            stage = stage_files(tmp, files)
            (stage / METADATA_NAME).write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
            for logger in tracker_loggers(trainer):
                name = self.artifact_name or f"model-{_run_id(logger)}"
                try:
                    record = upload_folder(logger, stage, self.artifact_path, name, "model", aliases,
                                           artifact_metadata, who="UploadCheckpoint")  # fmt: skip
                except Exception as err:  # noqa: BLE001 - one tracker down must not stop the others
                    rank_zero_warn(
                        f"UploadCheckpoint: uploading {sorted(files)} to {type(logger).__name__} failed: "
                        f"{type(err).__name__}: {err}; the files stay in {folder}"
                    )
                    continue
                self.uploads.append(record)
                rank_zero_info(f"UploadCheckpoint: uploaded {', '.join(record['files'])} to {record['destination']}")


def _isolation_checkpoint(exception: BaseException) -> Path | None:
    """The error checkpoint named by a :class:`CallbackError` in ``exception``'s chain, when it exists."""
    seen: set[int] = set()
    current: BaseException | None = exception
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CallbackError) and current.failure.checkpoint:
            path = Path(current.failure.checkpoint)
            if path.is_file():
                return path
        current = current.__cause__ or current.__context__
    return None


def _run_id(logger: Any) -> str:
    for attribute in ("run_id", "version"):
        try:
            value = getattr(logger, attribute)
        except Exception:  # noqa: BLE001, S112 - a logger property that needs a started run
            continue
        if value:
            return str(value)
    return "run"
