"""Record what a run was: hyperparameters, chosen config keys, code version, library versions, host, seed.

:func:`collect_metadata` gathers it as plain JSON data; :class:`MetadataLogger` writes it
to ``<run>/metadata.json`` and sends it to every logger (``logger.log_hyperparams``).

Layout of ``metadata.json``::

    {
      "created": "2026-01-31T12:00:00",
      "hyperparameters": {...},          # the module's hparams (plain data)
      "datamodule_hyperparameters": {...},
      "config": {"model.lr": 0.0001, "trainer.max_epochs": 10},   # the chosen keys
      "config_path": "<run>/config.yaml",
      "git": {"commit": "<sha>" | null, "dirty": true | false | null, "path": "<package folder>"},
      "versions": {"python": "3.11.9", "torch": "...", "lightning": "...", "torch_geometric": "...",
                   "e3nn": "...", "matsciml": "..."},
      "host": {"hostname": "...", "platform": "..."},
      "seed": 0,
      "run_dir": "...",
      "trainer": {"global_step": 120, "current_epoch": 3},
      "train_end": {...}                 # written at the end: checkpoints, test metrics, export, archive
    }
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from typing_extensions import override

from matsciml.lightning.callbacks._base.train_end import TrainEndCallback, TrainEndContext
from matsciml.lightning.callbacks._utils.reporting import run_folder
from matsciml.lightning.callbacks._utils.run_metadata import (
    collect_metadata,
    find_config,
    key_sources,
    read_config,
    resolve_keys,
    write_json,
)

__all__ = ["MetadataLogger"]


class MetadataLogger(TrainEndCallback):
    """Log and save the run's metadata: hyperparameters, chosen config keys, git commit, versions, host, seed.

    At the start of ``fit`` it checks ``keys`` (a key found nowhere raises, before any
    training), then writes ``<run>/<filename>`` and sends the metadata to every logger
    with ``logger.log_hyperparams({"metadata": ...})``. At the end of training, as the
    last stage of the train-end pipeline
    (:mod:`~matsciml.lightning.callbacks.train_end`), it writes the file again with the
    results of the other stages (tested checkpoint and ``test_*`` metrics, exported
    model, archive) and the final step and epoch. So a run that crashes still leaves
    its metadata, and a finished one records what it produced.

    ``keys`` are read from the run's ``config.yaml`` (the runner's resolved config:
    ``model.lr``, ``trainer.generic.max_epochs``, ``run.seed``, ...) and, when absent
    there, from the module's hyperparameters (``model.lr`` or ``lr``), the data
    module's (``datamodule.batch_size``) and the trainer's settings
    (``trainer.max_epochs``). The git commit is that of the checkout holding the
    matsciml package (``git rev-parse HEAD`` there; ``None`` outside a git checkout).

    Hooks it acts in: ``on_fit_start`` (check, write, log) and ``on_fit_end`` (through
    the train-end pipeline, last stage). Files and logging on rank 0 only.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.metadata.MetadataLogger
              init_args:
                keys: [model.lr, trainer.max_epochs, dataset.batch_size]

    Parameters
    ----------
    keys
        Config keys to record, in dot notation (default none).
    filename
        File name in the run folder, default ``"metadata.json"``.
    config_path
        The config file to read keys from (default: ``config.yaml`` of the run folder).
    log_hyperparams
        Also send the metadata to the loggers (default ``True``).

    Attributes
    ----------
    metadata
        The last metadata written.
    path
        The file written.

    Raises
    ------
    ConfigError
        At fit start, a key found in neither the config file nor the hyperparameters
        (the message names the closest keys that exist).
    """

    order: ClassVar[int] = 40

    def __init__(
        self,
        keys: Sequence[str] | None = None,
        filename: str = "metadata.json",
        config_path: str | os.PathLike | None = None,
        log_hyperparams: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(keys, str):
            keys = [keys]
        self.keys = [str(k) for k in keys or []]
        self.filename = str(filename)
        self.config_path = None if config_path is None else Path(config_path)
        self.log_hyperparams = bool(log_hyperparams)
        self.metadata: dict[str, Any] = {}
        self.path: Path | None = None

    def collect(self, trainer: pl.Trainer, pl_module: Any, context: TrainEndContext | None = None) -> dict[str, Any]:
        """:func:`collect_metadata` with this callback's keys and config."""
        return collect_metadata(trainer, pl_module, self.keys, self.config_path, context)

    def _write(self, trainer: pl.Trainer, pl_module: Any, context: TrainEndContext | None) -> None:
        self.metadata = self.collect(trainer, pl_module, context)
        if not trainer.is_global_zero:
            return
        folder = context.run_dir if context is not None else run_folder(trainer)
        self.path = write_json(folder / self.filename, self.metadata)
        if context is not None:
            context.metadata_path = self.path
        if self.log_hyperparams:
            for logger in trainer.loggers:
                logger.log_hyperparams({"metadata": self.metadata})
                logger.save()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.config_path if self.config_path is not None else find_config(trainer)
        resolve_keys(self.keys, key_sources(trainer, pl_module, read_config(config)), type(self).__name__)
        self._write(trainer, pl_module, None)

    @override
    def prepare_context(self, context: TrainEndContext) -> None:
        context.metadata_keys = list(self.keys)
        context.metadata_config = self.config_path

    @override
    def run_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TrainEndContext) -> None:
        self._write(trainer, pl_module, context)
