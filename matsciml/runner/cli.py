"""Command line of the experiment runner (``matsciml-train``, ``experiments/training_script.py``).

Usage::

    matsciml-train -e experiments/configs/experiments/devset_energy.yaml \\
        [-t TRAINER] [-m MODELS] [-d DATASETS] [--debug] [-c dataset.debug.batch_size.16 ...] \\
        [--seed 0] [--run_dir DIR | --log_dir DIR] [--resume auto|CHECKPOINT]
    matsciml-train -o            # list models, datasets, targets and tasks

Configuration mistakes end the program with one line ``error: ...`` on stderr and exit
status 2; see ``docs/runner.rst``. Training stopped by the requeue signal or ``SIGTERM``
(see ``docs/hpc.rst``) ends with status 0 when the SLURM job was requeued, else
``128 + signal number`` (143 after ``SIGTERM``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matsciml.common.cli import command_parser, run_command

__all__ = ["build_parser", "main", "format_options"]


def build_parser() -> argparse.ArgumentParser:
    """The runner's argument parser."""
    parser = command_parser(
        "matsciml-train", "Train a matsciml task from experiment, trainer, model and dataset YAML configs."
    )
    parser.add_argument("-e", "--experiment_config", type=Path, help="experiment config YAML (model, dataset, task)")
    parser.add_argument(
        "-t",
        "--trainer_config",
        type=Path,
        default=None,
        help="trainer config YAML, or a folder holding one (default: experiments/configs/trainer)",
    )
    parser.add_argument(
        "-m",
        "--model_config",
        type=Path,
        default=None,
        help="model config YAML or folder of them, registered by file stem (default: experiments/configs/models)",
    )
    parser.add_argument(
        "-d",
        "--dataset_config",
        type=Path,
        default=None,
        help="dataset config YAML or folder of them, registered by file stem (default: experiments/configs/datasets)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="use the 'debug' sections of the trainer and dataset configs and the bundled devset",
    )
    parser.add_argument(
        "-c",
        "--cli_args",
        nargs="+",
        action="extend",
        default=None,
        metavar="CONFIG.KEY.VALUE",
        help="override single values, e.g. dataset.debug.batch_size.16 trainer.generic.max_epochs.3 model.lr.0.001 "
        "(-c may be given several times; every override applies, in order)",
    )
    parser.add_argument(
        "-o",
        "--options",
        action="store_true",
        help="print the available models, datasets, targets and tasks, then exit",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="global seed (overrides 'seed:' of the experiment config)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|CHECKPOINT",
        help="continue a run: 'auto' = the newest usable checkpoint of the run folder (a fresh start when there is "
        "none; the default inside a SLURM job, whose run folder is <log_dir>/<experiment>/slurm-<job id>), or a "
        "checkpoint file; overrides 'resume:' of the experiment config",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--run_dir", type=Path, default=None, help="exact run folder (must be new or empty)")
    group.add_argument(
        "--log_dir",
        type=Path,
        default=None,
        help="parent of run folders (default: experiments/logs); the run goes to <log_dir>/<experiment>/<time>",
    )
    return parser


def format_options(model_path: Path | None = None, dataset_path: Path | None = None) -> str:
    """The ``-o`` listing: models, datasets with their ``target_keys``, and tasks."""
    from matsciml.registry import names
    from matsciml.runner.configs import default_config_path, load_registry

    model_path = model_path or default_config_path("models")
    dataset_path = dataset_path or default_config_path("datasets")
    models = load_registry(model_path, "model")
    datasets = load_registry(dataset_path, "dataset")
    lines = [f"Models ({model_path}):"]
    lines += [f"  {name:<20s} {file.path}" for name, file in sorted(models.items())]
    lines += ["", f"Datasets and their targets ({dataset_path}):"]
    for name, file in sorted(datasets.items()):
        targets = file.data.get("target_keys") or []
        cls = file.data.get("dataset", "?")
        lines.append(f"  {name:<20s} {cls}: {', '.join(map(str, targets)) or '(no target_keys listed)'}")
    lines += [
        "",
        "Tasks:",
        "  " + ", ".join(names("task")),
        "  (names and aliases: " + ", ".join(names("task", True)) + ")",
    ]
    lines += ["", "Encoders:", "  " + ", ".join(names("encoder"))]
    lines += ["", "Dataset classes:", "  " + ", ".join(names("dataset"))]
    from matsciml.datasets.schema import TARGET_ALIASES
    from matsciml.datasets.upstream.records import FORMATS as UPSTREAM

    lines += ["", "Open MatSciML Toolkit dataset classes (LMDB folders) and their targets:"]
    lines += [f"  {name:<24s} {', '.join(fmt.targets)}" for name, fmt in UPSTREAM.items()]
    lines += ["  (the toolkit's target names work too: " + ", ".join(f"{a} = {b}" for a, b in TARGET_ALIASES.items())
              + "; OQMDDataset energy = delta_e, the formation energy per atom)"]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None):
    """Run the command line (``argv`` and the result as for :func:`~matsciml.common.cli.run_command`).

    Returns
    -------
    RunResult or int or None
        The :class:`~matsciml.runner.experiment.RunResult` of the run (``0`` after ``-o``);
        ``None`` as a console script.

    Raises
    ------
    SystemExit
        Status 2 after printing ``error: <one line>`` to stderr, for a configuration or data
        error (the library functions raise :class:`~matsciml.common.errors.ConfigError`).
        As a console script, after training stopped early on a signal: the status of
        :class:`~matsciml.lightning.hpc.TrainingPreempted` (0 when requeued).
    """
    parser = build_parser()
    return run_command(parser, argv, lambda args: _train(parser, args), status=_preempted_status)


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace):
    if args.options:
        print(format_options(args.model_config, args.dataset_config))
        return 0
    if args.experiment_config is None:
        parser.error("-e/--experiment_config is required (or -o to list the options)")
    from matsciml.runner.experiment import run_experiment

    result = run_experiment(
        experiment_config=args.experiment_config,
        trainer_config=args.trainer_config,
        model_config=args.model_config,
        dataset_config=args.dataset_config,
        debug=args.debug,
        overrides=args.cli_args,
        seed=args.seed,
        run_dir=args.run_dir,
        log_dir=args.log_dir,
        resume=args.resume,
    )
    if result.summary_text:
        print(result.summary_text, flush=True)
    return result


def _preempted_status(result: Any) -> int | None:
    """The exit status of a run that a signal stopped (``None``: it was not stopped)."""
    preempted = getattr(result, "preempted", None)
    return None if preempted is None else preempted.code


if __name__ == "__main__":  # pragma: no cover
    main()
