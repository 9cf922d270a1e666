"""Load the runner's YAML configs: files and folders, registries by file stem, ``-c`` overrides, sections.

The runner reads four kinds of YAML file (see ``docs/runner.rst``):

* an **experiment** config (``-e``) naming a model config and a dataset config by file stem,
  the task and its targets, and optionally ``load_weights`` and ``seed``;
* a **trainer** config (``-t``) with ``generic``/``debug``/``experiment`` sections of
  ``lightning.pytorch.Trainer`` arguments plus ``callbacks`` and ``loggers``;
* **model** configs (``-m``), registered under their file stem;
* **dataset** configs (``-d``), registered under their file stem.

Every value read from a file keeps its origin (:class:`ConfigFile`), so errors can name
the file and the key path at fault.

Example experiment YAML::

    model: egnn
    dataset:
      devset:
        - task: ScalarRegressionTask
          targets: [energy_per_atom]
    seed: 0
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from matsciml.common.errors import ConfigError, closest
from matsciml.runner.overrides import apply_override, apply_overrides, lookup, parse_value

__all__ = [
    "ConfigFile",
    "TaskSpec",
    "ExperimentSpec",
    "EXPERIMENT_KEYS",
    "TRAINER_KEYS",
    "DATASET_KEYS",
    "RUN_TYPES",
    "load_yaml",
    "find_yaml_files",
    "load_registry",
    "load_trainer_config",
    "default_config_path",
    "lookup",
    "parse_value",
    "apply_override",
    "apply_overrides",
    "merge_sections",
    "check_keys",
    "parse_experiment",
]

#: Top-level keys of an experiment config.
EXPERIMENT_KEYS = ("model", "dataset", "load_weights", "seed", "log_dir", "resume", "sampling", "task_scaling")
#: Top-level keys of a trainer config.
TRAINER_KEYS = ("generic", "debug", "experiment", "callbacks", "loggers")
#: Top-level keys of a dataset config.
DATASET_KEYS = ("dataset", "debug", "experiment", "target_keys", "task_args")
#: Keys of ``load_weights`` in an experiment config.
LOAD_WEIGHTS_KEYS = ("method", "type", "path", "freeze", "encoder_lr")
#: The two run types; each names a section of the trainer and dataset configs.
RUN_TYPES = ("debug", "experiment")


@dataclass
class ConfigFile:
    """One loaded YAML file.

    Attributes
    ----------
    name
        Registry name: the file stem (``models/egnn_dgl.yaml`` -> ``egnn_dgl``).
    path
        Where the file was read from.
    data
        The parsed mapping (``{}`` for an empty file).
    """

    name: str
    path: Path
    data: dict = field(default_factory=dict)

    def where(self, key: str = "") -> str:
        """``"<path>: <key>"`` (or just the path), for error messages."""
        return f"{self.path}: {key}" if key else str(self.path)

    def copy(self) -> ConfigFile:
        """A deep copy, so overrides never touch the registry's version."""
        return ConfigFile(self.name, self.path, copy.deepcopy(self.data))


@dataclass
class TaskSpec:
    """One task of an experiment: the task class name and its targets."""

    task: str
    targets: list[str]
    where: str = ""
    targets_where: str = ""


@dataclass
class ExperimentSpec:
    """The parsed experiment config (``-e``).

    Attributes
    ----------
    file
        The experiment config itself.
    model
        The model config's stem.
    dataset
        The dataset config's stem (the first one of a multi-task run).
    task
        The task to train (the first one of a multi-task run).
    tasks
        ``{dataset config stem: [task, ...]}``: every (dataset, task) pair, in file order.
        More than one pair makes a multi-task run
        (:class:`~matsciml.models.tasks.multitask.MultiTaskLitModule`).
    sampling
        Multi-task runs: ``"proportional"`` (default) or ``"balanced"`` shares of the
        datasets in a training epoch.
    task_scaling
        Multi-task runs: weight of each pair's loss (a list in pair order, or a mapping
        from ``<dataset>_<TaskClass>`` or a dataset name), or ``None``.
    load_weights
        ``{"method": "checkpoint"|"pretrained", "type": "local"|"wandb", "path": str}`` or ``None``.
    seed
        Global seed, or ``None``.
    log_dir
        Parent folder of run folders from the config (``--log_dir`` wins), or ``None``.
    resume
        ``"auto"`` (the newest usable checkpoint of the run folder, if any) or a
        checkpoint path (relative paths: to the working directory, else beside the
        experiment file); ``None`` when not given (``--resume`` wins).
    """

    file: ConfigFile
    model: str
    dataset: str
    task: TaskSpec
    load_weights: dict | None = None
    seed: int | None = None
    log_dir: str | None = None
    resume: str | None = None
    tasks: dict[str, list[TaskSpec]] = field(default_factory=dict)
    sampling: str = "proportional"
    task_scaling: Any = None

    @property
    def is_multitask(self) -> bool:
        """More than one (dataset, task) pair."""
        return sum(len(specs) for specs in self.tasks.values()) > 1


def load_yaml(path: str | Path) -> dict:
    """Read one YAML file that must hold a mapping (an empty file gives ``{}``).

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML, or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, found {type(data).__name__}")
    return data


def find_yaml_files(path: str | Path, what: str = "config") -> list[Path]:
    """Return ``[path]`` for a file, or every ``*.yaml``/``*.yml`` below a folder (recursive, sorted).

    Raises
    ------
    ConfigError
        ``path`` does not exist, or a folder holds no YAML file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise ConfigError(f"{what} folder {path} holds no *.yaml file")
        return files
    raise ConfigError(f"{what} path {path} does not exist (give a YAML file or a folder of them)")


def load_registry(path: str | Path, what: str = "config") -> dict[str, ConfigFile]:
    """Load a file or a folder of YAML files into a registry keyed by file stem.

    Parameters
    ----------
    path
        A YAML file or a folder (all ``*.yaml`` below it, recursively).
    what
        ``"model"`` or ``"dataset"``, used in messages.

    Raises
    ------
    ConfigError
        A file is not valid YAML, or two files share a stem.
    """
    registry: dict[str, ConfigFile] = {}
    for file in find_yaml_files(path, what):
        name = file.stem
        if name in registry:
            raise ConfigError(
                f"two {what} configs are named {name!r}: {registry[name].path} and {file}; rename one "
                "(configs are registered by file stem)"
            )
        registry[name] = ConfigFile(name, file, load_yaml(file))
    return registry


def load_trainer_config(path: str | Path) -> ConfigFile:
    """Load the trainer config from a file, or from a folder.

    A folder must hold exactly one YAML file, or a ``trainer.yaml`` directly inside it
    (used when there are several).

    Raises
    ------
    ConfigError
        The path does not exist, or a folder holds several trainer configs and no ``trainer.yaml``.
    """
    files = find_yaml_files(path, "trainer")
    if len(files) > 1:
        preferred = Path(path) / "trainer.yaml"
        if not preferred.is_file():
            names = ", ".join(str(f.relative_to(path)) for f in files)
            raise ConfigError(f"trainer folder {path} holds several configs ({names}); pass one file with -t")
        files = [preferred]
    file = files[0]
    return ConfigFile(file.stem, file, load_yaml(file))


def default_config_path(kind: str, cwd: str | Path | None = None) -> Path:
    """Default location of a config folder (``kind`` in ``trainer``, ``models``, ``datasets``, ``experiments``).

    ``experiments/configs/<kind>`` relative to the working directory when it exists there,
    else relative to the repository holding the ``matsciml`` package.
    """
    import matsciml

    local = Path(cwd or Path.cwd()) / "experiments" / "configs" / kind
    if local.exists():
        return local
    return Path(matsciml.__file__).resolve().parents[1] / "experiments" / "configs" / kind


def check_keys(data: dict, valid: tuple[str, ...] | list[str], where: str, what: str = "key") -> None:
    """Raise :class:`ConfigError` for the first key of ``data`` not in ``valid``.

    Parameters
    ----------
    data
        The mapping to check.
    valid
        The accepted names.
    where
        ``"<file>"`` or ``"<file>: <key path>"`` of ``data``; the bad key is appended.
    what
        How to call a key in the message (``"key"``, ``"Trainer argument"``).
    """
    for key in data:
        if key not in valid:
            sep = "." if ": " in where else ": "
            raise ConfigError(f"{where}{sep}{key}: unknown {what} {key!r}; {closest(str(key), valid)}")


def merge_sections(file: ConfigFile, run_type: str, generic: str | None = "generic") -> dict:
    """Return ``file.data[generic]`` updated with ``file.data[run_type]`` (shallow; either may be absent).

    Raises
    ------
    ConfigError
        A section is present but is not a mapping.
    """
    merged: dict = {}
    for section in (generic, run_type):
        if section is None:
            continue
        value = file.data.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{file.where(section)}: expected a mapping of arguments, found {type(value).__name__}")
        merged.update(value)
    return merged


def _task_spec(raw: Any, where: str) -> list[TaskSpec]:
    """Parse the value under ``dataset.<stem>`` of an experiment config into task specs."""
    if isinstance(raw, list):
        specs = []
        for i, item in enumerate(raw):
            at = f"{where}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{at}: expected a mapping like {{task: ScalarRegressionTask, targets: [energy]}}")
            check_keys(item, ("task", "targets"), at)
            if "task" not in item:
                raise ConfigError(f"{at}: missing 'task' (a task class name such as ScalarRegressionTask)")
            targets = _targets(item.get("targets"), f"{at}.targets")
            specs.append(TaskSpec(str(item["task"]), targets, f"{at}.task", f"{at}.targets"))
        return specs
    if isinstance(raw, dict):
        return [
            TaskSpec(str(name), _targets(targets, f"{where}.{name}"), f"{where}.{name}", f"{where}.{name}")
            for name, targets in raw.items()
        ]
    raise ConfigError(
        f"{where}: expected a list of tasks ([{{task: ScalarRegressionTask, targets: [energy]}}]) "
        f"or a mapping ({{scalar_regression: [energy]}}), found {type(raw).__name__}"
    )


def _targets(raw: Any, where: str) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise ConfigError(f"{where}: expected a non-empty list of target keys, e.g. [energy_per_atom]")
    return list(raw)


def _task_name(spec: TaskSpec) -> str:
    from matsciml.registry import lookup

    cls = lookup("task", spec.task, spec.where)
    return cls.__name__


def parse_experiment(
    file: ConfigFile,
    models: dict[str, ConfigFile] | None = None,
    datasets: dict[str, ConfigFile] | None = None,
) -> ExperimentSpec:
    """Check and parse an experiment config.

    Parameters
    ----------
    file
        The loaded experiment config.
    models, datasets
        Registries to check the model and dataset stems against (skipped when ``None``).

    Raises
    ------
    ConfigError
        Unknown top-level key, missing ``model``/``dataset``, unknown model or dataset stem,
        unknown task, two tasks of one class on one dataset, a bad ``sampling`` or
        ``task_scaling``, or a malformed ``load_weights``.
    """
    data = file.data
    check_keys(data, EXPERIMENT_KEYS, file.where())
    for key in ("model", "dataset"):
        if key not in data:
            raise ConfigError(f"{file.where()}: missing {key!r} (see docs/runner.rst for the experiment config)")
    model = data["model"]
    if not isinstance(model, str):
        raise ConfigError(f"{file.where('model')}: expected a model config name (a file stem), found {model!r}")
    if models is not None and model not in models:
        raise ConfigError(f"{file.where('model')}: unknown model config {model!r}; {closest(model, models)}")
    dsets = data["dataset"]
    if isinstance(dsets, str):
        raise ConfigError(
            f"{file.where('dataset')}: expected a mapping from a dataset config name to its tasks, e.g. "
            f"{{{dsets}: [{{task: ScalarRegressionTask, targets: [energy]}}]}}"
        )
    if not isinstance(dsets, dict) or not dsets:
        raise ConfigError(f"{file.where('dataset')}: expected a mapping from a dataset config name to its tasks")
    for name in dsets:
        if datasets is not None and name not in datasets:
            raise ConfigError(
                f"{file.where('dataset.' + str(name))}: unknown dataset config {name!r}; {closest(str(name), datasets)}"
            )
    tasks = {name: _task_spec(raw, file.where(f"dataset.{name}")) for name, raw in dsets.items()}
    for specs in tasks.values():
        for spec in specs:
            spec.task = _task_name(spec)
    for name, specs in tasks.items():
        seen: dict[str, str] = {}
        for spec in specs:
            if spec.task in seen:
                raise ConfigError(
                    f"{spec.where}: {name} has two {spec.task}s (also at {seen[spec.task]}); list all their targets "
                    "in one"
                )
            seen[spec.task] = spec.where
    sampling = data.get("sampling", "proportional")
    if sampling not in ("proportional", "balanced"):
        raise ConfigError(
            f"{file.where('sampling')}: {sampling!r}; {closest(str(sampling), ['proportional', 'balanced'])}"
        )
    scaling = data.get("task_scaling")
    if scaling is not None and not isinstance(scaling, (list, dict)):
        raise ConfigError(f"{file.where('task_scaling')}: expected a list (one weight per task) or a mapping")
    dataset = next(iter(tasks))
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{file.where('seed')}: expected an integer, found {seed!r}")
    log_dir = data.get("log_dir")
    resume = _resume_spec(data.get("resume"), file)
    return ExperimentSpec(
        file=file,
        model=model,
        dataset=str(dataset),
        task=tasks[dataset][0],
        load_weights=_load_weights_spec(data.get("load_weights"), file),
        seed=seed,
        log_dir=None if log_dir is None else str(log_dir),
        resume=resume,
        tasks=tasks,
        sampling=sampling,
        task_scaling=scaling,
    )


def _resume_spec(raw: Any, file: ConfigFile) -> str | None:
    """``resume:`` of an experiment config: ``auto`` or a checkpoint path (found beside the file when relative)."""
    if raw is None or raw is False:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{file.where('resume')}: expected 'auto' or a checkpoint path, found {raw!r}")
    if raw.strip().lower() == "auto":
        return "auto"
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists() and (file.path.parent / path).exists():
        path = file.path.parent / path
    return str(path)


def _load_weights_spec(raw: Any, file: ConfigFile) -> dict | None:
    if raw is None:
        return None
    where = file.where("load_weights")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping {{method: checkpoint|pretrained, type: local|wandb, path: ...}}"
        )
    check_keys(raw, LOAD_WEIGHTS_KEYS, where)
    spec = {"method": raw.get("method", "checkpoint"), "type": raw.get("type", "local"), "path": raw.get("path")}
    for key in ("freeze", "encoder_lr"):
        if raw.get(key) is not None:
            spec[key] = raw[key]
    if spec["method"] not in ("checkpoint", "pretrained"):
        raise ConfigError(
            f"{where}.method: unknown method {spec['method']!r}; {closest(str(spec['method']), ['checkpoint', 'pretrained'])}"
            " ('checkpoint' loads the whole task, 'pretrained' the encoder only)"
        )
    if spec["type"] not in ("local", "wandb"):
        raise ConfigError(
            f"{where}.type: unknown type {spec['type']!r}; {closest(str(spec['type']), ['local', 'wandb'])}"
        )
    if not spec["path"]:
        raise ConfigError(f"{where}.path: missing; give the checkpoint file")
    if spec["type"] == "local":
        path = Path(str(spec["path"])).expanduser()
        if not path.is_absolute() and not path.exists():
            beside = file.path.parent / path
            if beside.exists():
                path = beside
        spec["path"] = str(path)
    return spec
