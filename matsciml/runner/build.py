"""Build the data module, the task, the callbacks, the loggers and the trainer from loaded configs.

Every builder checks its config against the signature of what it builds before building
it, so a misspelled key fails with a :class:`~matsciml.common.errors.ConfigError` naming the
YAML file, the key path and the closest valid names, before any training starts.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

from matsciml.common.cli import one_line as _one_line
from matsciml.common.config import check_init_args, instantiate, is_spec, resolve_class
from matsciml.common.errors import ConfigError, closest
from matsciml.registry import lookup
from matsciml.runner.configs import TRAINER_KEYS, ConfigFile, check_keys, merge_sections

__all__ = [
    "trainer_arguments",
    "check_trainer_config",
    "build_callbacks",
    "runtime_callbacks",
    "runtime_plugins",
    "build_loggers",
    "build_trainer",
    "build_transforms",
    "datamodule_arguments",
    "build_datamodule",
    "task_class",
    "task_arguments",
    "build_task",
]

#: Trainer arguments given by the runner itself, not by a section of the trainer config.
_RUNNER_TRAINER_ARGS = ("callbacks", "logger")
#: Steps between two redraws of the terminal progress bar the runner adds.
BAR_REFRESH_STEPS = 10
#: Trainer arguments the runner adds, left out of the message when Lightning refuses the arguments.
_NOT_SHOWN = ("default_root_dir", "plugins")
#: Keys of a run-type section of a dataset config that the runner consumes itself.
_TASK_KEYS_IN_DATA_SECTION = ("normalize_kwargs", "task_loss_scaling")


# --------------------------------------------------------------------------- trainer


def trainer_arguments() -> list[str]:
    """Names of the keyword arguments of ``lightning.pytorch.Trainer``."""
    from lightning.pytorch import Trainer

    params = inspect.signature(Trainer).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_trainer_config(file: ConfigFile) -> None:
    """Check the top-level keys and every section's Trainer arguments of a trainer config.

    Raises
    ------
    ConfigError
        An unknown top-level key (a Trainer argument placed at the top level is told to
        move under ``generic``), an unknown Trainer argument in a section, ``callbacks``
        or ``loggers`` that is not a list of ``class_path`` specs.
    """
    valid = trainer_arguments()
    for key in file.data:
        if key not in TRAINER_KEYS:
            if key in valid:
                raise ConfigError(
                    f"{file.where(key)}: Trainer argument {key!r} at the top level; put it under 'generic' "
                    "(or 'debug'/'experiment')"
                )
            check_keys({key: None}, TRAINER_KEYS, file.where())
    allowed = [n for n in valid if n not in _RUNNER_TRAINER_ARGS]
    for section in ("generic", "debug", "experiment"):
        args = file.data.get(section)
        if args is None:
            continue
        if not isinstance(args, dict):
            raise ConfigError(f"{file.where(section)}: expected a mapping of Trainer arguments")
        for key in args:
            if key in _RUNNER_TRAINER_ARGS:
                raise ConfigError(
                    f"{file.where(section + '.' + key)}: give {key} as the top-level "
                    f"'{'loggers' if key == 'logger' else 'callbacks'}' list of class_path specs"
                )
            if key not in allowed:
                raise ConfigError(
                    f"{file.where(section + '.' + key)}: unknown Trainer argument {key!r}; {closest(key, allowed)}"
                )
    for key in ("callbacks", "loggers"):
        specs = file.data.get(key)
        if specs is None:
            continue
        if not isinstance(specs, list):
            raise ConfigError(f"{file.where(key)}: expected a list of {{class_path: ..., init_args: {{...}}}}")
        for i, spec in enumerate(specs):
            if key == "callbacks" and (isinstance(spec, str) or (isinstance(spec, dict) and "kind" in spec)):
                continue  # the ``kind`` style of matsciml.lightning.callbacks.builder
            if not (isinstance(spec, dict) and "class_path" in spec):
                hint = " or 'kind' (and arguments)" if key == "callbacks" else ""
                raise ConfigError(
                    f"{file.where(f'{key}[{i}]')}: expected a mapping with 'class_path' (and 'init_args'){hint}"
                )


def _spec_class(spec: dict, where: str) -> type:
    return resolve_class(spec["class_path"], where)


def _with_defaults(spec: dict, defaults: dict[str, Any]) -> dict:
    spec = copy.deepcopy(spec)
    init_args = dict(spec.get("init_args") or {})
    for key, value in defaults.items():
        if init_args.get(key) is None:
            init_args[key] = value
    spec["init_args"] = init_args
    return spec


def build_callbacks(file: ConfigFile, run_dir: str | Path) -> list:
    """Instantiate the trainer config's ``callbacks`` (in list order).

    Entries use the ``class_path``/``init_args`` style or the ``kind`` style of
    :func:`matsciml.lightning.callbacks.build_callbacks`.

    A ``ModelCheckpoint`` without ``dirpath`` writes to ``<run_dir>/checkpoints``; when the
    list has no ``ModelCheckpoint``, one is appended (``save_last=True``) so that every run
    leaves a checkpoint.

    Raises
    ------
    ConfigError
        A wrong ``class_path`` or an ``init_args`` key the class does not take (the message
        names ``<file>: callbacks[i]``).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from matsciml.lightning.callbacks.builder import build_callback

    ckpt_dir = str(Path(run_dir) / "checkpoints")
    callbacks = []
    for i, spec in enumerate(file.data.get("callbacks") or []):
        where = file.where(f"callbacks[{i}]")
        if isinstance(spec, dict) and "class_path" in spec:
            cls = _spec_class(spec, where)
            if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
                spec = _with_defaults(spec, {"dirpath": ckpt_dir})
        callback = build_callback(spec, where)
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = ckpt_dir
        callbacks.append(callback)
    if not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
    return callbacks


def runtime_callbacks(callbacks: list, trainer_kwargs: dict[str, Any], stdout_is_terminal: bool | None = None) -> list:
    """The config's callbacks plus those every runner trainer has (unless the config lists its own).

    They are appended after the config's callbacks (whose positions error messages name):

    * :class:`~matsciml.lightning.seeding.RNGStateCallback` (random generator states in
      checkpoints, restored on resume);
    * :class:`~matsciml.lightning.hpc.PreemptionCheckpoint` (resume checkpoint at the next
      step boundary after the requeue signal or ``SIGTERM``; requeue under SLURM);
    * :class:`~matsciml.lightning.callbacks.StopTrainingCheckpoint` (a checkpoint when a
      hook or the task raises :class:`~matsciml.lightning.callbacks.StopTrainingError`);
    * :class:`~matsciml.lightning.progress.LogProgressBar` when standard output is not a
      terminal (batch logs), else Lightning's ``TQDMProgressBar`` redrawn every
      :data:`BAR_REFRESH_STEPS` steps (Lightning's default redraws it, with the logged
      values, at every step), unless the config turns the progress bar off or lists a
      progress bar.
    """
    import sys

    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from matsciml.lightning.callbacks.stop_training import StopTrainingCheckpoint
    from matsciml.lightning.hpc import PreemptionCheckpoint
    from matsciml.lightning.progress import LogProgressBar
    from matsciml.lightning.seeding import RNGStateCallback

    out = list(callbacks)
    if not any(isinstance(cb, RNGStateCallback) for cb in out):
        out.append(RNGStateCallback())
    if not any(isinstance(cb, PreemptionCheckpoint) for cb in out):
        out.append(PreemptionCheckpoint())
    if not any(isinstance(cb, StopTrainingCheckpoint) for cb in out):
        out.append(StopTrainingCheckpoint())
    if stdout_is_terminal is None:
        stdout_is_terminal = bool(getattr(sys.stdout, "isatty", lambda: False)())
    wants_bar = trainer_kwargs.get("enable_progress_bar", True) is not False
    if wants_bar and not any(isinstance(cb, ProgressBar) for cb in out):
        out.append(TQDMProgressBar(refresh_rate=BAR_REFRESH_STEPS) if stdout_is_terminal else LogProgressBar())
    return out


def runtime_plugins(trainer_kwargs: dict[str, Any]) -> list:
    """The config's ``plugins`` plus atomic checkpoint writes and, under ``srun``, the SLURM environment.

    :class:`~matsciml.lightning.checkpointing.AtomicCheckpointIO` is added unless a
    ``CheckpointIO`` is given; inside an ``srun`` step, Lightning's ``SLURMEnvironment``
    with ``auto_requeue=False`` (its requeue handler saves from inside the signal handler;
    :class:`~matsciml.lightning.hpc.PreemptionCheckpoint` does it at a step boundary).
    """
    from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from matsciml.lightning.checkpointing import AtomicCheckpointIO
    from matsciml.lightning.hpc import is_srun_launched

    given = trainer_kwargs.get("plugins")
    plugins = list(given) if isinstance(given, (list, tuple)) else ([] if given is None else [given])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if is_srun_launched() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_loggers(file: ConfigFile, run_dir: str | Path) -> list:
    """Instantiate the trainer config's ``loggers``.

    A logger whose class takes ``save_dir`` gets the run folder when none is given; a
    ``CSVLogger`` also defaults to ``name: ''`` and ``version: ''`` so that its file is
    ``<run_dir>/metrics.csv``. When no ``CSVLogger`` is configured one is added, so the
    metrics CSV always exists.

    Raises
    ------
    ConfigError
        A wrong ``class_path`` or ``init_args`` key (naming ``<file>: loggers[i]``).
    """
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    for i, spec in enumerate(file.data.get("loggers") or []):
        where = file.where(f"loggers[{i}]")
        cls = _spec_class(spec, where)
        defaults: dict[str, Any] = {}
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins
            params = {}
        if "save_dir" in params:
            defaults["save_dir"] = str(run_dir)
        if isinstance(cls, type) and issubclass(cls, CSVLogger):
            init_args = spec.get("init_args") or {}
            if "name" not in init_args:
                defaults["name"] = ""
            if "version" not in init_args:
                defaults["version"] = ""
        loggers.append(_instantiate(_with_defaults(spec, defaults) if defaults else spec, where))
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
    return loggers


def _instantiate(spec: Any, where: str) -> Any:
    try:
        return instantiate(spec, where)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the class refused its arguments: one clear line
        raise ConfigError(f"{where}: {spec.get('class_path', '?')} could not be built: {_one_line(err)}") from None


def build_trainer(
    file: ConfigFile,
    run_type: str,
    run_dir: str | Path,
    extra: dict[str, Any] | None = None,
    callbacks: list | None = None,
    loggers: list | None = None,
):
    """Build ``lightning.pytorch.Trainer`` from a trainer config.

    Inside an ``srun`` step, ``devices`` and ``num_nodes`` left unset (or ``auto``) come
    from the allocation (:func:`~matsciml.lightning.hpc.slurm_trainer_arguments`);
    ``plugins`` get :func:`runtime_plugins`; without a ``profiler`` (and without
    ``barebones``) the trainer gets :class:`~matsciml.lightning.profilers.NullProfiler`.

    Parameters
    ----------
    file
        The trainer config (checked with :func:`check_trainer_config`).
    run_type
        ``"debug"`` or ``"experiment"``: the section merged over ``generic``.
    run_dir
        The run folder (``default_root_dir``, checkpoints, CSV metrics).
    extra
        Arguments the runner sets (e.g. ``inference_mode=False`` for force tasks); they
        win over the config.
    callbacks, loggers
        Already built lists (default: :func:`build_callbacks` followed by
        :func:`runtime_callbacks`, and :func:`build_loggers`).

    Raises
    ------
    ConfigError
        Any trainer config problem, or Lightning refusing the merged arguments (e.g.
        ``accelerator: gpu`` without a GPU), naming the file and the section.
    """
    from lightning.pytorch import Trainer

    from matsciml.lightning.hpc import is_srun_launched, slurm_trainer_arguments
    from matsciml.lightning.profilers import NullProfiler

    check_trainer_config(file)
    kwargs = merge_sections(file, run_type)
    kwargs.setdefault("default_root_dir", str(run_dir))
    kwargs.update(extra or {})
    if is_srun_launched():
        kwargs = slurm_trainer_arguments(kwargs)
    kwargs["plugins"] = runtime_plugins(kwargs)
    if kwargs.get("profiler") is None and not kwargs.get("barebones"):
        kwargs["profiler"] = NullProfiler()  # Lightning's default pass-through profiler costs per hook call
    if callbacks is None:
        callbacks = runtime_callbacks(build_callbacks(file, run_dir), kwargs)
    loggers = build_loggers(file, run_dir) if loggers is None else loggers
    try:
        return Trainer(**kwargs, callbacks=callbacks, logger=loggers)
    except Exception as err:  # noqa: BLE001 - Lightning's own refusal, as one line with its origin
        raise ConfigError(
            f"{file.where(f'generic + {run_type}')}: lightning.pytorch.Trainer refused the arguments "
            f"{ {k: v for k, v in kwargs.items() if k not in _NOT_SHOWN and not isinstance(v, NullProfiler)} }: "
            f"{_one_line(err)}"
        ) from None


# --------------------------------------------------------------------------- data


def build_transforms(model: ConfigFile) -> list:
    """Instantiate the model config's ``transforms`` list (dataset transforms, in order).

    Raises
    ------
    ConfigError
        ``transforms`` is not a list of specs, or a spec is wrong (``<file>: transforms[i]``).
    """
    specs = model.data.get("transforms")
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ConfigError(f"{model.where('transforms')}: expected a list of {{class_path: ..., init_args: {{...}}}}")
    out = []
    for i, spec in enumerate(specs):
        where = model.where(f"transforms[{i}]")
        if not is_spec(spec):
            raise ConfigError(f"{where}: expected a mapping with 'class_path' (and 'init_args')")
        out.append(_instantiate(spec, where))
    return out


def datamodule_arguments() -> list[str]:
    """Keyword arguments of :class:`matsciml.lightning.MatSciMLDataModule`."""
    from matsciml.lightning.datamodule import MatSciMLDataModule

    params = inspect.signature(MatSciMLDataModule).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _dataset_class(dataset: ConfigFile) -> Any:
    from matsciml.datasets import registry

    name = dataset.data.get("dataset")
    if not name or not isinstance(name, str):
        raise ConfigError(
            f"{dataset.where('dataset')}: missing; name the dataset class, e.g. dataset: StructureDataset"
        )
    try:
        return registry.get_dataset_class(name)
    except ConfigError as err:
        raise ConfigError(f"{dataset.where('dataset')}: {_one_line(err)}") from None
    except (KeyError, ValueError, AttributeError):
        names = list(getattr(registry, "available_datasets", lambda: [])())
        raise ConfigError(
            f"{dataset.where('dataset')}: unknown dataset class {name!r}; {closest(name, names)}"
        ) from None


def datamodule_arguments_from(dataset: ConfigFile, run_type: str) -> tuple[dict, dict, bool]:
    """Split the run-type section of a dataset config.

    Returns
    -------
    tuple
        ``(data module kwargs, task kwargs found in the section, use the bundled devset)``.
    """
    section = merge_sections(dataset, run_type, generic=None)
    task_kwargs = {k: section.pop(k) for k in _TASK_KEYS_IN_DATA_SECTION if k in section}
    use_devset = bool(section.pop("devset", False))
    # Upstream templates leave unused paths as '' ("not given").
    section = {k: v for k, v in section.items() if not (isinstance(v, str) and v == "")}
    for key in ("train_path", "val_split", "test_split"):
        value = section.get(key)
        if value is not None and not isinstance(value, (str, int, float)):
            raise ConfigError(
                f"{dataset.where(run_type + '.' + key)}: expected a path or a fraction, got a "
                f"{type(value).__name__} ({value!r}); with -c give it as dataset."
                f"{run_type}.{key}=/path/to/data"
            )
    if run_type == "debug" and "train_path" not in section:
        use_devset = True
    if not use_devset and "train_path" not in section:
        raise ConfigError(
            f"{dataset.where(run_type + '.train_path')}: missing or empty; set it to the training data, "
            "set 'devset: true' in that section to train on the bundled devset, or run with --debug"
        )
    return section, task_kwargs, use_devset


def build_datamodule(
    dataset: ConfigFile,
    model: ConfigFile,
    run_type: str,
    targets: list[str],
    seed: int | None = None,
    trainer_args: dict[str, Any] | None = None,
):
    """Build the :class:`~matsciml.lightning.MatSciMLDataModule` of a dataset and a model config.

    Loader settings the section leaves out (``num_workers``, also when ``"auto"``;
    ``persistent_workers``; ``pin_memory``) are chosen from the machine and the trainer
    arguments ``trainer_args`` (:mod:`matsciml.runner.loader_defaults`).

    The run-type section (``debug``/``experiment``) gives the data module's arguments
    (in debug mode a ``train_path`` without ``val_split`` validates on the training data,
    as the toolkit's devset mode does, and says so in the log);
    the model config's ``transforms`` become ``dset_kwargs['transforms']``. In debug mode
    the bundled devset is used (``MatSciMLDataModule.from_devset``) unless the section
    gives a ``train_path``; in experiment mode a section with ``devset: true`` does the same.

    Raises
    ------
    ConfigError
        Unknown top-level key or data module argument, an unknown dataset class, a
        missing ``train_path``.
    """
    from matsciml.lightning.datamodule import MatSciMLDataModule
    from matsciml.runner.configs import DATASET_KEYS

    check_keys(dataset.data, DATASET_KEYS, dataset.where())
    cls = _dataset_class(dataset)
    kwargs, _, use_devset = datamodule_arguments_from(dataset, run_type)
    if run_type == "debug" and not use_devset and "val_split" not in kwargs:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        # as the toolkit's devset mode: the debug data serve for training and validation
        kwargs["val_split"] = kwargs["train_path"]
        rank_zero_info(
            f"--debug: no val_split in {dataset.where(run_type)}; validating on the training data "
            f"({kwargs['train_path']}), as the Open MatSciML Toolkit's devset mode does"
        )
    valid = [n for n in datamodule_arguments() if n not in ("dataset", "target_keys")]
    if use_devset:
        valid = [n for n in valid if n != "train_path"]
    check_keys(kwargs, valid, dataset.where(run_type), "data module argument")
    dset_kwargs = dict(kwargs.pop("dset_kwargs", None) or {})
    transforms = build_transforms(model)
    if transforms:
        if dset_kwargs.get("transforms"):
            raise ConfigError(
                f"{dataset.where(run_type + '.dset_kwargs.transforms')}: transforms belong in the model config "
                f"({model.path}), which already lists them"
            )
        dset_kwargs["transforms"] = transforms
    if seed is not None:
        kwargs.setdefault("seed", seed)
    from matsciml.runner.loader_defaults import apply_loader_defaults

    apply_loader_defaults(kwargs, trainer_args or {})
    kwargs["target_keys"] = list(targets)
    try:
        if use_devset:
            return MatSciMLDataModule.from_devset(cls, dset_kwargs=dset_kwargs, **kwargs)
        return MatSciMLDataModule(dataset=cls, dset_kwargs=dset_kwargs, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{dataset.where(run_type)}: {_one_line(err)}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{dataset.where(run_type)}: the data module refused its arguments: {_one_line(err)}"
        ) from None


# --------------------------------------------------------------------------- task


def task_class(name: str, where: str = "") -> type:
    """The task class registered as ``name`` (or at the import path ``name``)."""
    from matsciml.models.tasks import get_task_class

    try:
        return get_task_class(name, where)
    except ConfigError as err:
        raise ConfigError(f"{where}: {_one_line(err)}" if where else _one_line(err)) from None


def _task_parameters(cls: type) -> list[str]:
    params = inspect.signature(cls).parameters
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def task_arguments(
    cls: type, model: ConfigFile, dataset: ConfigFile, run_type: str, targets: list[str]
) -> dict[str, Any]:
    """Collect the task's keyword arguments (plain YAML data, nothing instantiated).

    Model config keys other than ``transforms`` are task arguments; the dataset config's
    ``task_args`` (and ``normalize_kwargs``/``task_loss_scaling`` in its run-type section)
    are merged over them; ``task_keys`` are the experiment's targets.

    Raises
    ------
    ConfigError
        A key the task does not take (naming the model or dataset file), or an
        ``encoder_kwargs`` key the encoder class does not take.
    """
    valid = _task_parameters(cls)
    kwargs = {k: copy.deepcopy(v) for k, v in model.data.items() if k != "transforms"}
    check_keys(kwargs, [*valid, "transforms"], model.where(), "model config key (task argument)")
    task_args = dataset.data.get("task_args") or {}
    if not isinstance(task_args, dict):
        raise ConfigError(f"{dataset.where('task_args')}: expected a mapping of task arguments")
    check_keys(task_args, valid, dataset.where("task_args"), "task argument")
    kwargs.update(copy.deepcopy(task_args))
    _, section_task_args, _ = datamodule_arguments_from(dataset, run_type)
    kwargs.update(section_task_args)
    kwargs["task_keys"] = list(targets)
    _check_encoder(kwargs, model)
    return kwargs


def _check_encoder(kwargs: dict[str, Any], model: ConfigFile) -> None:
    spec = kwargs.get("encoder_class")
    if spec is None:
        return
    path = spec.get("class_path") if isinstance(spec, dict) else spec
    if isinstance(spec, dict):
        check_keys(spec, ("class_path", "init_args"), model.where("encoder_class"))
    if not isinstance(path, str):
        raise ConfigError(f"{model.where('encoder_class')}: expected {{class_path: <module.Class>}} or a dotted path")
    cls = lookup("encoder", path, model.where("encoder_class.class_path"))
    enc_kwargs = kwargs.get("encoder_kwargs") or {}
    if not isinstance(enc_kwargs, dict):
        raise ConfigError(f"{model.where('encoder_kwargs')}: expected a mapping of encoder arguments")
    init_args = dict(spec.get("init_args") or {}) if isinstance(spec, dict) else {}
    init_args.update(enc_kwargs)
    check_init_args(cls, init_args, model.where("encoder_kwargs"))
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in init_args
    ]
    if missing:
        raise ConfigError(
            f"{model.where('encoder_kwargs')}: {cls.__name__} needs {len(missing)} more argument(s): "
            f"{', '.join(missing)}"
        )


def build_task(cls: type, kwargs: dict[str, Any], model: ConfigFile):
    """Instantiate the task; a refusal by the task or its encoder becomes a :class:`ConfigError`."""
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{model.where()}: {_one_line(err)}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{model.where()}: {cls.__name__} could not be built: {_one_line(err)}") from None
