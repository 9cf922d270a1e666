"""Rebuild a trained task and its data transforms from a checkpoint file.

Everything comes from the file, read with ``torch.load(..., weights_only=True)``:

* the task class: ``checkpoint["matsciml"]["task_class"]`` (written by every task, see
  :mod:`matsciml.models.tasks.transfer`), else ``run.task`` of the run folder's
  ``config.yaml`` (the checkpoint's folder or the one above it), else
  :class:`~matsciml.models.tasks.forces.ForceRegressionTask` when the task keys are
  energies, forces and stresses;
* the weights: ``state_dict``, which holds the EMA weights of a checkpoint written with
  :class:`~matsciml.lightning.callbacks.ExponentialMovingAverageCallback`;
* the transforms: ``checkpoint["matsciml"]["transforms"]``, else ``model.transforms`` of
  the run folder's ``config.yaml``.

Example::

    from matsciml.inference import load_task

    loaded = load_task("runs/devset_forces/checkpoints/last.ckpt")
    loaded.task          # a ForceRegressionTask in eval mode, EMA weights
    loaded.transforms    # [PeriodicPropertiesTransform(...), PointCloudToGraphTransform(...)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from matsciml.common.config import instantiate, is_spec
from matsciml.common.errors import ConfigError
from matsciml.models.tasks.transfer import CHECKPOINT_KEY

__all__ = ["LoadedTask", "load_task", "build_transforms", "run_config"]

_FORCE_KEYS = {"energy", "forces", "stress"}


@dataclass
class LoadedTask:
    """A task rebuilt from a checkpoint.

    Attributes
    ----------
    task
        The task (eval mode, on ``map_location``), holding the checkpoint's ``state_dict``.
    transforms
        The data transforms, instantiated (empty when neither the checkpoint nor a
        ``config.yaml`` names them).
    transform_specs
        The same as plain specs, or ``None``.
    path
        The checkpoint file.
    config
        The run folder's ``config.yaml`` when one was found, else ``None``.
    hyper_parameters
        The checkpoint's saved hyperparameters.
    """

    task: Any
    transforms: list
    transform_specs: list | None
    path: Path
    config: dict | None = None
    hyper_parameters: dict = field(default_factory=dict)


def run_config(checkpoint: str | Path) -> dict | None:
    """The ``config.yaml`` of the run that wrote ``checkpoint`` (its folder or the one above), or ``None``."""
    path = Path(checkpoint).resolve()
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise ConfigError(f"{candidate}: not valid YAML ({' '.join(str(err).split())})") from None
            return data if isinstance(data, dict) else None
    return None


def build_transforms(specs: Any, where: str = "transforms") -> list:
    """Instantiate a list of transforms (``class_path``/``init_args`` specs or callables)."""
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    out = []
    for i, spec in enumerate(specs):
        obj = instantiate(spec, f"{where}[{i}]") if is_spec(spec) else spec
        if not callable(obj):
            raise ConfigError(f"{where}[{i}]: {obj!r} is not callable; a transform maps a sample to a sample")
        out.append(obj)
    return out


def _task_class(ckpt: dict, config: dict | None, path: Path, where: str) -> type:
    from matsciml.models.tasks import get_task_class

    info = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt.get(CHECKPOINT_KEY), dict) else {}
    name = info.get("task_class")
    source = f"{path} (matsciml.task_class)"
    if not name and config is not None:
        name = (config.get("run") or {}).get("task")
        source = "run.task of its config.yaml"
    if not name:
        keys = set((ckpt.get("hyper_parameters") or {}).get("task_keys") or [])
        if keys and keys <= _FORCE_KEYS and keys & {"forces", "stress"}:
            name, source = "ForceRegressionTask", "its task keys"
    if not name:
        raise ConfigError(
            f"{where}: {path} does not say which task wrote it (no task class recorded, no config.yaml beside it); "
            "pass task_class (e.g. ScalarRegressionTask)"
        )
    return get_task_class(str(name), f"{where}: task class from {source}")


def load_task(
    checkpoint: str | Path,
    task_class: str | type | None = None,
    transforms: Any = None,
    map_location: str | torch.device = "cpu",
    where: str = "checkpoint",
) -> LoadedTask:
    """Rebuild the task of ``checkpoint`` with its weights, and its data transforms.

    Parameters
    ----------
    checkpoint
        A Lightning checkpoint written by a matsciml task.
    task_class
        The task class (class, registered name or import path); default: from the file
        (see the module docs).
    transforms
        Transforms to use instead of the recorded ones (instances or specs).
    map_location
        Where the weights go (``"cpu"``, ``"cuda"``, ...).
    where
        What names the checkpoint in messages (``"--checkpoint"``, an argument name).

    Returns
    -------
    LoadedTask

    Raises
    ------
    ConfigError
        A missing, truncated or unsafe file (one line naming it), no way to tell the task
        class, or weights that do not fit the rebuilt task.
    """
    from matsciml.models.tasks import get_task_class
    from matsciml.runner.weights import read_checkpoint

    path = Path(checkpoint)
    ckpt = read_checkpoint(path, where)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(
            f"{where}: {path} is not a task checkpoint (it needs 'state_dict' and 'hyper_parameters'; "
            "a bare state dict loads with load_weights into a task built from its config)"
        )
    config = run_config(path)
    cls = get_task_class(task_class, where) if isinstance(task_class, str) else task_class
    cls = cls or _task_class(ckpt, config, path, where)
    try:
        task = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except ConfigError as err:
        raise ConfigError(f"{where}: {path}: {' '.join(str(err).split())}") from None
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = " ".join(str(err).split())[:300]
        raise ConfigError(f"{where}: {path} does not load into {cls.__name__}: {first}") from None
    task.eval()
    specs = None
    info = ckpt.get(CHECKPOINT_KEY)
    if isinstance(info, dict) and info.get("transforms") is not None:
        specs = info["transforms"]
    elif config is not None:
        specs = (config.get("model") or {}).get("transforms")
    if transforms is not None:
        built = build_transforms(transforms, "transforms")
    else:
        built = build_transforms(specs, f"{path}: transforms")
    return LoadedTask(task, built, specs, path, config, dict(ckpt.get("hyper_parameters") or {}))
