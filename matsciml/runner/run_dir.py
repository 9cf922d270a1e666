"""The run folder: one folder per run holding its checkpoints, metrics and resolved config.

Layout::

    <run>/
      config.yaml          the resolved configs (experiment, trainer, model, dataset, run)
      metrics.csv          CSVLogger's metrics (one row per logging step / epoch)
      hparams.yaml         the task's hyperparameters, written by CSVLogger
      checkpoints/         ModelCheckpoint's files (``last.ckpt`` and the best ones)
      hpc_ckpt_<n>.ckpt    resume checkpoint written on the requeue signal or SIGTERM

By default a run folder is ``experiments/logs/<experiment stem>/<YYYYmmdd-HHMMSS>``
relative to the working directory (a ``-1``, ``-2``... suffix keeps two runs started in
the same second apart). Inside a SLURM job it is ``<log_dir>/<experiment stem>/slurm-<job
id>`` instead: the same for every rank and for every restart of a requeued job, so the
job finds its own resume checkpoints.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

from matsciml.common.atomic import atomic_write_text
from matsciml.common.errors import ConfigError
from matsciml.common.plain import to_plain as _to_plain

__all__ = ["DEFAULT_LOG_DIR", "make_run_dir", "write_config", "to_plain"]

#: Parent folder of run folders, relative to the working directory.
DEFAULT_LOG_DIR = Path("experiments") / "logs"


def make_run_dir(
    experiment_name: str,
    run_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    now: datetime.datetime | None = None,
    create: bool = True,
    name: str | None = None,
    exist_ok: bool = False,
) -> Path:
    """Choose (and by default create) the run folder.

    Parameters
    ----------
    experiment_name
        Stem of the experiment config; names the folder grouping its runs.
    run_dir
        Exact folder to use (``--run_dir``). It may exist but must then be empty, unless ``exist_ok``.
    log_dir
        Parent of the experiment folders (``--log_dir``); default ``experiments/logs``.
    now
        Time stamp naming the folder (default: the current local time).
    create
        Create the folder (default). ``False`` only chooses a path that does not exist
        yet, so that a run stopped by a configuration error leaves nothing behind.
    name
        Fixed folder name under ``<log_dir>/<experiment_name>`` instead of the time stamp
        (``slurm-<job id>`` in a SLURM job); such a folder may exist.
    exist_ok
        Accept a ``run_dir`` that exists and is not empty (a resumed run), default ``False``.

    Raises
    ------
    ConfigError
        ``run_dir`` exists and is not an empty folder while ``exist_ok`` is false (runs
        never overwrite each other), or is a file.
    """
    if run_dir is not None or name is not None:
        parent = Path(log_dir) if log_dir is not None else DEFAULT_LOG_DIR
        path = Path(run_dir) if run_dir is not None else parent / experiment_name / str(name)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run folder {path} exists and is a file; choose a folder")
        if run_dir is not None and not exist_ok and path.exists() and any(path.iterdir()):
            raise ConfigError(
                f"--run_dir {path} exists and is not an empty folder; choose a new folder (or --resume auto to "
                "continue the run in it)"
            )
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    parent = Path(log_dir) if log_dir is not None else DEFAULT_LOG_DIR
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = parent / experiment_name
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        if not create:
            if not path.exists():
                return path
            continue
        base.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"could not find a new run folder name under {base}")  # pragma: no cover


def to_plain(value: Any) -> Any:
    """Turn a config value into plain YAML data (paths and other objects become strings)."""
    return _to_plain(value, other=str)


def write_config(run_dir: str | Path, config: dict) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return its path."""
    return atomic_write_text(
        Path(run_dir) / "config.yaml", yaml.safe_dump(to_plain(config), sort_keys=False, default_flow_style=False)
    )
