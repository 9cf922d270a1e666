"""Experiment trackers among the trainer's loggers: MLflow and W&B, found and sent files and images.

* :func:`tracker_loggers`: the trainer's :class:`~lightning.pytorch.loggers.MLFlowLogger` and
  :class:`~lightning.pytorch.loggers.WandbLogger` instances (subclasses included), in order;
* :func:`stage_files`: a folder holding files under the names they should have in the tracker
  (hard links where possible, copies otherwise);
* :func:`upload_folder`: send such a folder to one tracker logger: to MLflow as the run's
  artifacts under ``artifact_path`` (``MlflowClient.log_artifacts``), to W&B as one artifact
  (``wandb.Artifact`` with every file, logged with ``run.log_artifact`` and its aliases);
* :func:`mlflow_image_key`: an image name MLflow accepts (``log_image(key=...)``).

``mlflow`` and ``wandb`` are never imported here unless a logger of theirs is in use (the
loggers themselves need them); a missing one raises a
:class:`~matsciml.common.errors.ConfigError` naming the extra (``pip install 'matsciml[tracking]'``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

from matsciml.common.optional import require
from matsciml.common.plain import to_plain

__all__ = [
    "TRACKER_LOGGERS",
    "tracker_kind",
    "tracker_loggers",
    "stage_files",
    "upload_folder",
    "wandb_artifact_name",
    "mlflow_image_key",
]

#: The logger classes this module sends files to, by kind.
TRACKER_LOGGERS: dict[str, type[Logger]] = {"mlflow": MLFlowLogger, "wandb": WandbLogger}


def tracker_kind(logger: Any) -> str | None:
    """``"mlflow"``, ``"wandb"`` or ``None`` for any other logger."""
    for kind, cls in TRACKER_LOGGERS.items():
        if isinstance(logger, cls):
            return kind
    return None


def tracker_loggers(trainer: Any) -> list[Logger]:
    """The trainer's MLflow and W&B loggers, in the order of ``trainer.loggers``."""
    return [lg for lg in getattr(trainer, "loggers", None) or [] if tracker_kind(lg) is not None]


def stage_files(folder: str | os.PathLike, files: Mapping[str, str | os.PathLike]) -> Path:
    """Put ``files`` (``{name in the tracker: local file}``) into ``folder`` under their names.

    Hard links when the file system allows (no copy of a large checkpoint), copies otherwise.

    Raises
    ------
    FileNotFoundError
        A source file does not exist (named in the message).
    ValueError
        A name is not a plain file name (it holds a path separator).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        if not name or Path(name).name != name:
            raise ValueError(f"artifact file name {name!r} must be a plain file name, without folders")
        source = Path(source)
        if not source.is_file():
            raise FileNotFoundError(f"cannot upload {source} as {name!r}: no such file")
        target = folder / name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return folder


def wandb_artifact_name(name: str) -> str:
    """``name`` with every character W&B refuses in an artifact name (all but ``[A-Za-z0-9_.-]``) made ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "artifact"


def mlflow_image_key(name: str) -> str:
    """``name`` with every character MLflow refuses in an image key made ``_`` (``/`` is kept)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name) or "image"


def upload_folder(
    logger: Logger,
    folder: str | os.PathLike,
    artifact_path: str | None = None,
    artifact_name: str = "model",
    artifact_type: str = "model",
    aliases: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    who: str = "upload",
) -> dict[str, Any]:
    """Send every file of ``folder`` (not recursive) to one MLflow or W&B logger.

    Parameters
    ----------
    logger
        An :class:`~lightning.pytorch.loggers.MLFlowLogger` or
        :class:`~lightning.pytorch.loggers.WandbLogger`.
    folder
        The files, under the names they get (see :func:`stage_files`).
    artifact_path
        MLflow: the folder of the run's artifacts they go to (``None``: the root).
    artifact_name, artifact_type, aliases, metadata
        W&B: the artifact's name (see :func:`wandb_artifact_name`), type, aliases and
        metadata (plain data).
    who
        Named in the error when the tracker's library is missing.

    Returns
    -------
    dict
        ``{"logger": class name, "kind": "mlflow" | "wandb", "destination": ..., "files": [names]}``;
        the destination is ``runs:/<run id>/<artifact_path>`` for MLflow and
        ``<artifact name>:<aliases>`` for W&B.

    Raises
    ------
    TypeError
        ``logger`` is neither an MLflow nor a W&B logger.
    ConfigError
        The tracker's library is not installed (the message names the extra).
    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    kind = tracker_kind(logger)
    if kind == "mlflow":
        require("mlflow", who)
        run_id = logger.run_id
        logger.experiment.log_artifacts(run_id, str(folder), artifact_path=artifact_path or None)
        destination = f"runs:/{run_id}/{artifact_path or ''}".rstrip("/")
    elif kind == "wandb":
        wandb = require("wandb", who)
        name = wandb_artifact_name(artifact_name)
        artifact = wandb.Artifact(name=name, type=artifact_type, metadata=to_plain(dict(metadata or {})))
        for file in names:
            artifact.add_file(str(folder / file), name=file)
        logger.experiment.log_artifact(artifact, aliases=list(aliases))
        destination = f"{name}:{','.join(aliases)}" if aliases else name
    else:
        raise TypeError(f"{who}: {type(logger).__name__} is neither an MLFlowLogger nor a WandbLogger")
    return {"logger": type(logger).__name__, "kind": kind, "destination": destination, "files": names}
