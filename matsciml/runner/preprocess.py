"""``matsciml-preprocess``: build the on-disk graph cache of an experiment's datasets up front.

Reads the same configs as ``matsciml-train`` (experiment, model, dataset), builds the
data module with ``graph_cache: {mode: disk, ...}`` and sets it up: every dataset's
deterministic transforms (neighbour lists, graphs) run once, in ``--workers`` processes,
with a progress bar, and the result is written atomically to one LMDB file per source
(see :mod:`matsciml.datasets.cache`). A training run whose dataset config says
``graph_cache: disk`` (with the same ``cache_dir``) then starts from the finished cache.

Usage::

    matsciml-preprocess -e experiments/configs/experiments/devset_energy.yaml --workers 8 \\
        [-m MODELS] [-d DATASETS] [--debug] [--cache-dir DIR]

Configuration mistakes end the program with one line ``error: ...`` on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from matsciml.common.cli import add_no_progress, command_parser
from matsciml.common.errors import ConfigError, DataError

__all__ = ["build_parser", "preprocess", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = command_parser(
        "matsciml-preprocess",
        "Build the on-disk graph cache (neighbour lists and graphs) of an experiment's datasets.",
    )
    parser.add_argument("-e", "--experiment_config", type=Path, required=True, help="experiment config YAML")
    parser.add_argument("-m", "--model_config", type=Path, default=None, help="model config YAML or folder")
    parser.add_argument("-d", "--dataset_config", type=Path, default=None, help="dataset config YAML or folder")
    parser.add_argument("--debug", action="store_true", help="use the 'debug' section of the dataset config")
    parser.add_argument("--workers", type=int, default=0, help="processes building the cache (default 0: this one)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="folder of the cache files (default: $MATSCIML_CACHE/graphs)"
    )
    add_no_progress(parser, "--no-progress")
    return parser


def preprocess(
    experiment_config: str | Path,
    model_config: str | Path | None = None,
    dataset_config: str | Path | None = None,
    debug: bool = False,
    workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Build the disk graph cache of every dataset of an experiment.

    Parameters
    ----------
    experiment_config, model_config, dataset_config, debug
        As for ``matsciml-train``.
    workers
        Processes building the cache (default 0: this process).
    cache_dir
        Folder of the cache files (default: the dataset config's ``graph_cache.cache_dir``,
        else ``graphs/`` in the package cache folder).
    progress
        Progress bar (``None``: when stderr is a terminal).

    Returns
    -------
    dict[str, Path]
        ``{dataset name: cache file}``.

    Raises
    ------
    ConfigError
        A configuration mistake (naming the YAML file and key).
    """
    from matsciml.datasets.cache import GraphCacheConfig
    from matsciml.runner import build
    from matsciml.runner.configs import ConfigFile, default_config_path, load_registry, load_yaml, parse_experiment

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"--workers {workers!r}: give an integer >= 0")
    exp_path = Path(experiment_config)
    experiment = ConfigFile(exp_path.stem, exp_path, load_yaml(exp_path))
    models = load_registry(Path(model_config) if model_config else default_config_path("models"), "model")
    datasets = load_registry(Path(dataset_config) if dataset_config else default_config_path("datasets"), "dataset")
    spec = parse_experiment(experiment, models, datasets)
    model, dataset = models[spec.model].copy(), datasets[spec.dataset].copy()
    run_type = "debug" if debug else "experiment"
    section = dataset.data.setdefault(run_type, {}) or {}
    dataset.data[run_type] = section
    given = GraphCacheConfig.parse(section.get("graph_cache", "disk"), dataset.where(run_type + ".graph_cache"))
    options = given.as_dict()
    options.update(mode="disk", workers=workers, progress=progress)
    if cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    section["graph_cache"] = options
    section["num_workers"] = 0  # the cache is built here, not by loader workers
    datamodule = build.build_datamodule(dataset, model, run_type, spec.task.targets, spec.seed)
    datamodule.setup("fit")
    out: dict[str, Path] = {}
    for name, data in datamodule.datasets.items():
        base = getattr(data, "dataset", data)
        cache = getattr(base, "graph_cache", None)
        if cache is not None and cache.disk is not None:
            out[name] = cache.disk.path
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``matsciml-preprocess``; returns the exit status (0, or 2 after a mistake)."""
    args = build_parser().parse_args(argv)
    try:
        files = preprocess(
            args.experiment_config,
            args.model_config,
            args.dataset_config,
            debug=args.debug,
            workers=args.workers,
            cache_dir=args.cache_dir,
            progress=False if args.no_progress else None,
        )
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
