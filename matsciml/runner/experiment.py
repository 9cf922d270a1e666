"""Run one experiment: load the configs, build and check everything, train, summarise.

:func:`prepare_experiment` does all the work that can fail on a configuration mistake
(loading, ``-c`` overrides, building the data module and reading the data, building the
task, loading weights, building the trainer, checking the monitored metric names) before
any training; :func:`run_prepared` then writes ``config.yaml``, calls ``trainer.fit``
and summarises the run; :func:`run_experiment` does both.

A run can continue an earlier one: ``resume="auto"`` (``--resume auto``, or ``resume:
auto`` in the experiment config) starts from the newest usable checkpoint of the run
folder and starts fresh when there is none; a path resumes that checkpoint. Inside a
SLURM job the run folder is ``<log_dir>/<experiment>/slurm-<job id>`` and ``auto`` is the
default, so a requeued job started again with the same command continues by itself.

Example::

    from matsciml.runner.experiment import run_experiment

    result = run_experiment("experiments/configs/experiments/devset_energy.yaml", debug=True)
    print(result.summary_text)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from matsciml.common.atomic import atomic_write_text
from matsciml.common.errors import ConfigError, closest
from matsciml.runner import build
from matsciml.runner.configs import (
    ConfigFile,
    ExperimentSpec,
    apply_overrides,
    default_config_path,
    load_registry,
    load_trainer_config,
    load_yaml,
    merge_sections,
    parse_experiment,
)
from matsciml.runner.multitask import (
    build_multitask,
    check_targets_listed,
    logged_metric_names,
    setup_data,
    summarize_pairs,
)
from matsciml.runner.run_dir import make_run_dir, to_plain, write_config
from matsciml.runner.summary import TargetSummary, format_summary, mean_predictor_mae, model_mae, raw_weights_mae

__all__ = ["PreparedRun", "RunResult", "prepare_experiment", "run_prepared", "run_experiment", "RUN_DIR_ENV"]

#: Environment variable through which a run's folder reaches the other ranks of a multi-process run.
RUN_DIR_ENV = "MATSCIML_RUN_DIR"


@dataclass
class PreparedRun:
    """Everything built and checked for one run, before training.

    Attributes
    ----------
    experiment
        The parsed experiment config.
    trainer_config, model_config, dataset_config
        The configs in use, after ``-c`` overrides (``dataset_config``: the first dataset's).
    dataset_configs
        ``{stem: dataset config}`` of every dataset of the run.
    run_type
        ``"debug"`` or ``"experiment"``.
    run_dir
        The run folder.
    datamodule, task, trainer
        The built objects (the data module is set up: its data were read and checked).
    seed
        The global seed (``None``: not seeded).
    overrides
        The ``-c`` overrides applied.
    loaded_weights
        What :func:`~matsciml.runner.weights.load_weights` loaded, or ``None``.
    resume
        ``"auto"``, a checkpoint path, or ``None`` (the resume setting in force).
    resume_checkpoint
        The checkpoint training continues from (``None``: a fresh start).
    """

    experiment: ExperimentSpec
    trainer_config: ConfigFile
    model_config: ConfigFile
    dataset_config: ConfigFile
    run_type: str
    run_dir: Path
    datamodule: Any
    task: Any
    trainer: Any
    seed: int | None = None
    overrides: list[str] = field(default_factory=list)
    loaded_weights: dict | None = None
    resume: str | None = None
    resume_checkpoint: Path | None = None
    dataset_configs: dict[str, ConfigFile] = field(default_factory=dict)

    def resolved_config(self) -> dict[str, Any]:
        """The merged configuration written to ``config.yaml``."""
        multi, tasks = self.experiment.is_multitask, self.experiment.tasks
        return {
            "experiment": copy.deepcopy(self.experiment.file.data),
            "trainer": copy.deepcopy(self.trainer_config.data),
            "model": copy.deepcopy(self.model_config.data),
            "dataset": copy.deepcopy(self.dataset_config.data),
            **({"datasets": {k: copy.deepcopy(v.data) for k, v in self.dataset_configs.items()}} if multi else {}),
            "run": {
                "run_type": self.run_type,
                "task": self.experiment.task.task,
                "targets": list(self.experiment.task.targets),
                **({"tasks": {k: [[t.task, list(t.targets)] for t in v] for k, v in tasks.items()}} if multi else {}),
                "seed": self.seed,
                "run_dir": str(self.run_dir),
                "files": {
                    "experiment": str(self.experiment.file.path),
                    "trainer": str(self.trainer_config.path),
                    "model": str(self.model_config.path),
                    "dataset": str(self.dataset_config.path),
                },
                "cli_args": list(self.overrides),
                "load_weights": self.loaded_weights,
                "resume": self.resume,
                "slurm_job_id": _slurm_job_id(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            },
        }


@dataclass
class RunResult:
    """What a finished run leaves (returned by :func:`run_experiment` and ``cli.main(argv)``).

    Attributes
    ----------
    run_dir
        The run folder.
    config_path, metrics_csv
        ``<run_dir>/config.yaml`` and the CSV logger's metrics file.
    best_checkpoint
        Best checkpoint of the first ``ModelCheckpoint`` (its last one when nothing is monitored).
    last_checkpoint
        ``last.ckpt`` when written.
    targets
        Validation MAE of each regression target next to the mean predictor's.
    summary_text
        The printed summary.
    trainer, task, datamodule
        The objects after training (the task holds the best checkpoint's weights when one exists).
    prepared
        The :class:`PreparedRun`.
    resumed_from
        The checkpoint the run continued from, or ``None``.
    preempted
        The :class:`~matsciml.lightning.hpc.TrainingPreempted` that stopped training early
        (requeue signal or ``SIGTERM``; its ``checkpoint`` resumes the run), or ``None``
        when training ran to its end.
    """

    run_dir: Path
    config_path: Path
    metrics_csv: Path | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    targets: list[TargetSummary]
    summary_text: str
    trainer: Any
    task: Any
    datamodule: Any
    prepared: PreparedRun
    resumed_from: str | None = None
    preempted: Any = None


def _resolve(path: str | Path | None, kind: str) -> Path:
    return Path(path) if path is not None else default_config_path(kind)


def _check_monitors(trainer: Any, trainer_config: ConfigFile, task: Any, datamodule: Any) -> None:
    """Every monitored metric must be one the task logs; ``val_*`` needs a validation split."""
    names = logged_metric_names(task)
    has_val = "val" in datamodule.datasets
    specs = trainer_config.data.get("callbacks") or []
    for i, callback in enumerate(trainer.callbacks):
        monitor = getattr(callback, "monitor", None)
        if not isinstance(monitor, str) or not monitor:
            continue
        where = (
            trainer_config.where(f"callbacks[{i}].init_args.monitor")
            if i < len(specs)
            else f"{type(callback).__name__}.monitor"
        )
        if names is not None and monitor not in names:
            val_names = [n for n in names if n.startswith("val_")] or names
            raise ConfigError(
                f"{where}: {type(callback).__name__} monitors {monitor!r}, which the task does not log; "
                f"{closest(monitor, val_names)}"
            )
        if monitor.startswith("val_") and not has_val:
            raise ConfigError(
                f"{where}: {type(callback).__name__} monitors {monitor!r} but the data have no validation split; "
                "set val_split in the dataset config's section"
            )


def prepare_experiment(
    experiment_config: str | Path,
    trainer_config: str | Path | None = None,
    model_config: str | Path | None = None,
    dataset_config: str | Path | None = None,
    debug: bool = False,
    overrides: list[str] | None = None,
    seed: int | None = None,
    run_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    resume: str | Path | None = None,
) -> PreparedRun:
    """Load every config, apply overrides, build and check the data module, task and trainer.

    Parameters
    ----------
    experiment_config
        Experiment YAML (``-e``).
    trainer_config, model_config, dataset_config
        File or folder (``-t``, ``-m``, ``-d``); default ``experiments/configs/<kind>``.
    debug
        Use the ``debug`` sections and the bundled devset.
    overrides
        ``-c`` overrides (``dataset.debug.batch_size.16``).
    seed
        Global seed; wins over the experiment config's ``seed``.
    run_dir, log_dir
        Exact run folder, or the parent of ``<experiment stem>/<time>`` folders
        (``<experiment stem>/slurm-<job id>`` inside a SLURM job).
    resume
        ``"auto"``: continue from the newest usable checkpoint of the run folder
        (:func:`~matsciml.lightning.checkpointing.find_resume_checkpoint`), or start fresh
        when there is none; a path: continue from that checkpoint. Wins over the
        experiment config's ``resume``; default (neither given): ``"auto"`` inside a
        SLURM job, else a fresh start. With a resume setting an existing ``run_dir`` is
        accepted.

    Raises
    ------
    ConfigError
        Any configuration mistake (one line naming the YAML file, the key path and the
        closest valid names); a resume checkpoint that is missing or unusable.
    DataError
        The data do not fit the configuration (prefixed with the dataset config).
    """
    import lightning.pytorch as pl

    from matsciml.runner.weights import load_weights

    exp_path = Path(experiment_config)
    experiment = ConfigFile(exp_path.stem, exp_path, load_yaml(exp_path))
    trainer_file = load_trainer_config(_resolve(trainer_config, "trainer")).copy()
    models = load_registry(_resolve(model_config, "models"), "model")
    datasets = load_registry(_resolve(dataset_config, "datasets"), "dataset")
    spec = parse_experiment(experiment, models, datasets)
    model = models[spec.model].copy()
    dataset_files = {name: datasets[name].copy() for name in spec.tasks or [spec.dataset]}
    dataset = dataset_files[spec.dataset]
    overrides = list(overrides or [])
    apply_overrides(overrides, {"trainer": trainer_file, "model": model, "dataset": dataset})
    for other in dataset_files.values():  # a dataset override applies to every dataset of a multi-task run
        if other is not dataset:
            apply_overrides([o for o in overrides if o.startswith("dataset.")], {"dataset": other})
    run_type = "debug" if debug else "experiment"
    seed = spec.seed if seed is None else seed

    build.check_trainer_config(trainer_file)
    trainer_args = merge_sections(trainer_file, run_type)
    if spec.is_multitask:
        if seed is not None:
            pl.seed_everything(seed, workers=True, verbose=False)
        datamodule, task = build_multitask(spec, model, dataset_files, run_type, seed)
    else:
        check_targets_listed(spec.task, dataset)
        task_cls = build.task_class(spec.task.task, spec.task.where)
        task_kwargs = build.task_arguments(task_cls, model, dataset, run_type, spec.task.targets)
        if seed is not None:
            pl.seed_everything(seed, workers=True, verbose=False)
        datamodule = build.build_datamodule(dataset, model, run_type, spec.task.targets, seed, trainer_args)
        setup_data(datamodule, dataset, run_type, spec.task.targets)
        task = build.build_task(task_cls, task_kwargs, model)
    task.data_transforms = copy.deepcopy(model.data.get("transforms"))
    loaded = None
    if spec.load_weights is not None:
        loaded = load_weights(task, spec.load_weights, experiment.where("load_weights"))

    resume_setting = _resume_setting(resume, spec)
    folder = _run_folder(spec, run_dir, log_dir, exist_ok=resume_setting is not None)
    checkpoint = _resume_checkpoint(resume_setting, folder, spec)
    trainer = build.build_trainer(trainer_file, run_type, folder)
    _check_monitors(trainer, trainer_file, task, datamodule)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(folder)
    return PreparedRun(
        experiment=spec,
        trainer_config=trainer_file,
        model_config=model,
        dataset_config=dataset,
        run_type=run_type,
        run_dir=folder,
        datamodule=datamodule,
        task=task,
        trainer=trainer,
        seed=seed,
        overrides=overrides,
        loaded_weights=loaded,
        resume=resume_setting,
        resume_checkpoint=checkpoint,
        dataset_configs=dataset_files,
    )


def _slurm_job_id() -> str | None:
    """The SLURM job id (see :func:`matsciml.lightning.hpc.slurm_job_id`)."""
    from matsciml.lightning.hpc import slurm_job_id as job_id

    return job_id()


def _resume_setting(resume: str | Path | None, spec: ExperimentSpec) -> str | None:
    """``--resume`` / ``resume=``, else the config's ``resume``, else ``"auto"`` inside a SLURM job."""
    if resume is not None:
        text = str(resume)
        return "auto" if text.strip().lower() == "auto" else text
    if spec.resume is not None:
        return spec.resume
    return "auto" if _slurm_job_id() is not None else None


def _resume_checkpoint(setting: str | None, folder: Path, spec: ExperimentSpec) -> Path | None:
    """The checkpoint to continue from (``None``: fresh start)."""
    from matsciml.lightning.checkpointing import find_resume_checkpoint, read_checkpoint_info

    if setting is None:
        return None
    if setting == "auto":
        return find_resume_checkpoint(folder)
    where = spec.file.where("resume") if spec.resume == setting else "--resume"
    if not Path(setting).is_file():
        raise ConfigError(f"{where}: checkpoint {setting} does not exist; give a file or 'auto'")
    info = read_checkpoint_info(setting)
    if not info.usable:
        raise ConfigError(f"{where}: checkpoint {setting} cannot resume a run: it {info.problem}")
    return Path(setting)


def _run_folder(
    spec: ExperimentSpec, run_dir: str | Path | None, log_dir: str | Path | None, exist_ok: bool = False
) -> Path:
    """The run folder; ranks > 0 of a multi-process run reuse rank 0's (passed through the environment).

    Inside a SLURM job (and without ``run_dir``) the folder is named from the job id, the
    same for every rank and every restart of the job; an existing ``run_dir`` is accepted
    there too, as every rank and every restart names it.
    """
    from matsciml.lightning.hpc import slurm_run_name

    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        return Path(inherited)
    job_name = slurm_run_name()
    return make_run_dir(
        spec.file.name,
        run_dir=run_dir,
        log_dir=log_dir or spec.log_dir,
        create=False,
        name=job_name if run_dir is None else None,
        exist_ok=exist_ok or job_name is not None,
    )


def _checkpoint_callback(trainer: Any) -> Any:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _metrics_csv(trainer: Any) -> Path | None:
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


def summarize(prepared: PreparedRun) -> tuple[list[TargetSummary], str | None, str | None, str]:
    """Load the best checkpoint into the task and compare its validation MAE with the mean predictor's.

    Returns
    -------
    tuple
        ``(target summaries, best checkpoint, last checkpoint, summary text)``.
    """
    from matsciml.runner.weights import read_state_dict

    trainer, task, dm = prepared.trainer, prepared.task, prepared.datamodule
    callback = _checkpoint_callback(trainer)
    best = (callback.best_model_path or callback.last_model_path) if callback is not None else None
    last = callback.last_model_path if callback is not None and callback.last_model_path else None
    best = best or None
    score = None
    if callback is not None and callback.best_model_score is not None:
        score = float(callback.best_model_score)
    notes = []
    if best and Path(best).is_file():
        task.load_state_dict(read_state_dict(best, "best checkpoint"), strict=True)
    targets: list[TargetSummary] = []
    regression = getattr(task, "metric_kind", "regression") == "regression"
    if prepared.experiment.is_multitask:
        targets, pair_notes = summarize_pairs(task, dm)
        notes += pair_notes
    elif "val" not in dm.datasets:
        notes.append("No validation split: no validation MAE (set val_split in the dataset config).")
    elif not regression:
        notes.append("Classification task: see val_<target>_accuracy in metrics.csv.")
    else:
        keys = list(getattr(task, "task_keys", prepared.experiment.task.targets))
        maes = model_mae(task, dm.eval_dataloader("val"), keys)
        raw_maes = raw_weights_mae(task, dm.eval_dataloader("val"), keys, best)  # EMA runs: the raw weights too
        for key in keys:
            base, count = mean_predictor_mae(dm.datasets["train"], dm.datasets["val"], key)
            mae, n = maes[key]
            if n:
                targets.append(TargetSummary(key, mae, base, n, raw_maes[key][0] if key in raw_maes else None))
    text = format_summary(prepared.run_dir, best, score, getattr(callback, "monitor", None), targets, "\n".join(notes))
    return targets, best, last, text


def run_prepared(prepared: PreparedRun) -> RunResult:
    """Write ``config.yaml``, train and summarise a run built by :func:`prepare_experiment`.

    When the requeue signal or ``SIGTERM`` stops training
    (:class:`~matsciml.lightning.hpc.PreemptionCheckpoint`), the result carries it in
    ``preempted`` and there is no summary.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from matsciml.lightning.callbacks.stop_training import StopTrainingError
    from matsciml.lightning.hpc import PreemptionCheckpoint, TrainingPreempted
    from matsciml.lightning.progress import show_warnings_on_rank_zero_only

    show_warnings_on_rank_zero_only()
    trainer = prepared.trainer
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionCheckpoint):
            callback.install()  # a signal from now on is kept for the first step boundary
    config_path = prepared.run_dir / "config.yaml"
    checkpoint = prepared.resume_checkpoint
    preempted = None
    with warnings.catch_warnings():
        if checkpoint is not None or config_path.exists():
            # the run folder of a resumed run is not empty, by design
            warnings.filterwarnings(
                "ignore", message=r".*(Experiment logs|Checkpoint) directory .* exists and is not empty"
            )
        if trainer.is_global_zero:
            with _csv_history_kept(trainer):
                for logger in trainer.loggers:
                    _ = logger.experiment  # loggers set up their folder while it is still empty
            config_path = _write_or_extend_config(prepared, config_path)
        if checkpoint is not None:
            rank_zero_info(f"Resuming from {checkpoint}")
        try:
            trainer.fit(prepared.task, datamodule=prepared.datamodule, ckpt_path=checkpoint)
        except StopTrainingError as stop:  # a deliberate end of training: summarised as a finished run
            rank_zero_info(str(stop))
        except TrainingPreempted as stop:
            preempted = stop
    if not trainer.is_global_zero:
        targets, best, last, text = [], None, None, ""
    elif preempted is not None:
        targets, best, last, text = [], None, None, f"Run folder: {prepared.run_dir}\n{preempted}"
    else:
        targets, best, last, text = summarize(prepared)
    return RunResult(
        run_dir=prepared.run_dir,
        config_path=config_path,
        metrics_csv=_metrics_csv(trainer),
        best_checkpoint=best,
        last_checkpoint=last,
        targets=targets,
        summary_text=text,
        trainer=trainer,
        task=prepared.task,
        datamodule=prepared.datamodule,
        prepared=prepared,
        resumed_from=None if checkpoint is None else str(checkpoint),
        preempted=preempted,
    )


def run_experiment(*args: Any, **kwargs: Any) -> RunResult:
    """Prepare (:func:`prepare_experiment`, whose arguments it takes), then :func:`run_prepared`.

    Raises
    ------
    ConfigError, DataError
        As :func:`prepare_experiment`; nothing has been trained when they are raised.
    """
    return run_prepared(prepare_experiment(*args, **kwargs))


# one argument list, documented once: run_experiment shows prepare_experiment's
run_experiment.__signature__ = inspect.signature(prepare_experiment).replace(  # type: ignore[attr-defined]
    return_annotation=RunResult.__name__
)


@contextlib.contextmanager
def _csv_history_kept(trainer: Any):
    """Keep the rows of an existing ``metrics.csv`` when a resumed run's CSV logger starts.

    Lightning's CSV writer deletes the metrics file of a non-empty folder when it starts;
    the file is moved aside meanwhile, put back, and the writer learns its columns so that
    the rows it appends (and a rewrite of the header) keep every earlier column.
    """
    from lightning.pytorch.loggers import CSVLogger

    kept: list[tuple[Any, Path, Path, list[str]]] = []
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            aside = path.with_name(f".{path.name}.resumed")
            os.replace(path, aside)
            kept.append((logger, path, aside, header))
    try:
        yield
    finally:
        for logger, path, aside, header in kept:
            os.replace(aside, path)
            writer = logger.experiment
            if hasattr(writer, "metrics_keys"):
                writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _write_or_extend_config(prepared: PreparedRun, path: Path) -> Path:
    """Write ``config.yaml``; when the folder already has one (a resumed run), keep it and add the restart."""
    if not path.is_file():
        return write_config(prepared.run_dir, prepared.resolved_config())
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    run = data.setdefault("run", {})
    run.setdefault("restarts", []).append(
        {
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "resumed_from": None if prepared.resume_checkpoint is None else str(prepared.resume_checkpoint),
            "slurm_job_id": _slurm_job_id(),
            "cli_args": list(prepared.overrides),
        }
    )
    return atomic_write_text(path, yaml.safe_dump(to_plain(data), sort_keys=False, default_flow_style=False))
