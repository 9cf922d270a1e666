"""The experiment runner: train a task from experiment, trainer, model and dataset YAML configs.

Command line: ``matsciml-train`` or ``python experiments/training_script.py`` (see
:mod:`matsciml.runner.cli` and ``docs/runner.rst``).

=============================== ==========================================================
:mod:`~matsciml.runner.cli`       argument parsing and ``main(argv)``
:mod:`~matsciml.runner.configs`   YAML loading, registries by file stem, ``-c`` overrides
:mod:`~matsciml.runner.build`     data module, task, callbacks, loggers, trainer
:mod:`~matsciml.runner.weights`   ``load_weights`` (whole task or encoder only)
:mod:`~matsciml.runner.run_dir`   the run folder and its ``config.yaml``
:mod:`~matsciml.runner.experiment` prepare, train, summarise
:mod:`~matsciml.runner.summary`   validation MAE against the mean predictor
=============================== ==========================================================
"""

from __future__ import annotations

from matsciml.runner.cli import main
from matsciml.runner.experiment import PreparedRun, RunResult, prepare_experiment, run_experiment
from matsciml.runner.weights import load_weights

__all__ = ["main", "run_experiment", "prepare_experiment", "PreparedRun", "RunResult", "load_weights"]
