"""The runner's multi-task runs: several datasets and/or several tasks in one experiment.

An experiment config whose ``dataset:`` mapping holds more than one (dataset, task) pair
trains a :class:`~matsciml.models.tasks.multitask.MultiTaskLitModule` on a
:class:`~matsciml.lightning.multi_datamodule.MultiDataModule`::

    model: egnn_small
    sampling: balanced                 # optional: proportional (default) or balanced
    task_scaling: [1.0, 0.5]           # optional: weight of each pair's loss, in file order
    dataset:
      oqmd_devset:
        - task: ScalarRegressionTask
          targets: [band_gap]
      lips_devset:
        - task: ForceRegressionTask
          targets: [energy, forces]

Each dataset config builds its own data module (its section's paths, splits, seed and
batch size, the model's transforms) and each task its own arguments (the model config
plus that dataset config's ``task_args``), exactly as for a single task. The joint batch
holds the sum of the datasets' batch sizes. Metrics are named
``<split>_<dataset>_<target>`` (``val_oqmd_devset_band_gap_mae``), and the summary prints
one line per (dataset, target) with its mean-predictor ratio.
"""

from __future__ import annotations

from typing import Any

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.runner import build
from matsciml.runner.configs import ConfigFile, ExperimentSpec, TaskSpec
from matsciml.runner.summary import TargetSummary, mean_predictor_mae, model_mae

__all__ = ["build_multitask", "check_targets_listed", "logged_metric_names", "setup_data", "summarize_pairs"]


def check_targets_listed(task: TaskSpec, dataset: ConfigFile) -> None:
    """The task's targets must be among the dataset config's ``target_keys`` (when it lists them)."""
    listed = dataset.data.get("target_keys")
    if listed is None:
        return
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list):
        raise ConfigError(f"{dataset.where('target_keys')}: expected a list of target names")
    from matsciml.datasets.schema import canonical_target

    canonical = {canonical_target(str(t)) for t in listed}
    for target in task.targets:
        if target not in listed and canonical_target(str(target)) not in canonical:
            raise ConfigError(
                f"{task.targets_where}: target {target!r} is not in target_keys of {dataset.path} "
                f"({', '.join(map(str, listed))}); {closest(target, [str(t) for t in listed])}"
            )


def setup_data(datamodule: Any, dataset: ConfigFile, run_type: str, targets: list[str]) -> None:
    """Read and validate the data now, so data problems surface before training, naming the dataset config."""
    try:
        datamodule.setup("fit")
    except (DataError, ConfigError) as err:
        message = " ".join(str(err).split())
        raise type(err)(
            f"{dataset.where('target_keys')}: reading the {run_type} data for targets {targets} failed: {message}"
        ) from None


def build_multitask(
    spec: ExperimentSpec, model: ConfigFile, datasets: dict[str, ConfigFile], run_type: str, seed: int | None
) -> tuple[Any, Any]:
    """Build and set up the :class:`MultiDataModule` and build the :class:`MultiTaskLitModule` of ``spec``.

    Returns
    -------
    tuple
        ``(datamodule, task)``; the data were read and checked.

    Raises
    ------
    ConfigError, DataError
        As for a single task, naming the dataset config or task at fault.
    """
    from matsciml.lightning.multi_datamodule import MultiDataModule
    from matsciml.models.tasks.multitask import MultiTaskLitModule

    modules, pairs, sizes, workers = {}, [], [], []
    for name, specs in spec.tasks.items():
        dataset = datasets[name]
        for task in specs:
            check_targets_listed(task, dataset)
        targets = list(dict.fromkeys(t for task in specs for t in task.targets))
        module = build.build_datamodule(dataset, model, run_type, targets, seed)
        setup_data(module, dataset, run_type, targets)
        modules[name] = module
        sizes.append(module.batch_size)
        workers.append(module.num_workers)
        for task in specs:
            cls = build.task_class(task.task, task.where)
            kwargs = build.task_arguments(cls, model, dataset, run_type, task.targets)
            pairs.append((name, build.build_task(cls, kwargs, model)))
    datamodule = MultiDataModule(
        datamodules=modules,
        batch_size=sum(sizes),
        num_workers=max(workers),
        sampling=spec.sampling,
        seed=seed,
    )
    datamodule.setup("fit")
    try:
        task = MultiTaskLitModule(*pairs, task_scaling=spec.task_scaling)
    except ConfigError as err:
        raise ConfigError(f"{spec.file.where('dataset')}: {' '.join(str(err).split())}") from None
    return datamodule, task


def logged_metric_names(task: Any) -> list[str] | None:
    """Names a task logs (see docs/tasks.rst and docs/multitask.rst), or ``None`` when the task does not say."""
    keys = getattr(task, "task_keys", None)
    if not keys:
        return None
    kinds = getattr(task, "metric_kinds", None) or dict.fromkeys(keys, getattr(task, "metric_kind", "regression"))
    names = []
    for split in ("train", "val"):
        stems = ["loss", "total"]
        for key in keys:
            stems += [key, f"{key}_mae" if kinds.get(key, "regression") == "regression" else f"{key}_accuracy"]
        names += [f"{split}_{s}" for s in stems]
        if split == "train":
            names += [f"train_{s}_{suffix}" for s in stems for suffix in ("step", "epoch")]
    return names


def summarize_pairs(task: Any, datamodule: Any) -> tuple[list[TargetSummary], list[str]]:
    """Validation MAE of every regression (dataset, target) pair next to its mean predictor's.

    Each pair's task (holding the shared encoder) predicts its own dataset's validation
    split; the mean predictor uses that dataset's training split.

    Returns
    -------
    tuple
        ``(summaries named "<dataset>_<target>", notes)``.
    """
    targets: list[TargetSummary] = []
    notes: list[str] = []
    for name, sub in task.iter_tasks():
        module = datamodule.datamodules[name]
        if "val" not in module.datasets:
            notes.append(f"{name}: no validation split (set val_split in its dataset config).")
            continue
        if getattr(sub, "metric_kind", "regression") != "regression":
            notes.append(f"{name}: {type(sub).__name__} is a classification: see val_{name}_<target>_accuracy.")
            continue
        keys = list(sub.task_keys)
        maes = model_mae(sub, module.eval_dataloader("val"), keys)
        for key in keys:
            base, _ = mean_predictor_mae(module.datasets["train"], module.datasets["val"], key)
            mae, n = maes[key]
            if n:
                targets.append(TargetSummary(f"{name}_{key}", mae, base, n))
    return targets, notes
