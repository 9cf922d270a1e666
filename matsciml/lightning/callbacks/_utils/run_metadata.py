"""What a run was, as plain data: hyperparameters, chosen config keys, code and library versions, host, seed.

:func:`collect_metadata` gathers it; the metadata and archive stages of the train-end
pipeline both write it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from matsciml.common.errors import ConfigError, closest
from matsciml.common.plain import to_plain
from matsciml.lightning.callbacks._utils.reporting import run_folder
from matsciml.lightning.checkpointing import atomic_write_text

if TYPE_CHECKING:  # the context's type only: helpers never import the base layer
    from matsciml.lightning.callbacks._base.train_end import TrainEndContext

__all__ = [
    "collect_metadata",
    "find_config",
    "git_commit",
    "library_versions",
    "lookup",
    "flatten",
    "resolve_keys",
    "write_json",
    "read_config",
    "key_sources",
]

#: Distributions whose versions are recorded (name in the metadata: distribution name).
_LIBRARIES = {
    "torch": "torch",
    "lightning": "lightning",
    "torch_geometric": "torch_geometric",
    "e3nn": "e3nn",
    "matsciml": "matsciml",
    "numpy": "numpy",
}
#: Trainer settings readable as ``trainer.<name>`` keys when the config file does not hold them.
_TRAINER_KEYS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "precision",
    "num_devices",
    "num_nodes",
    "check_val_every_n_epoch",
    "log_every_n_steps",
)
_MISSING = object()


# ----------------------------------------------------------------------------- pure helpers
def git_commit(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit of the git checkout holding ``path`` (default: the matsciml package folder).

    Returns
    -------
    dict
        ``{"commit": sha or None, "dirty": bool or None, "path": str}``; ``None`` values
        outside a git checkout or without a ``git`` executable.
    """
    if path is None:
        import matsciml

        path = Path(matsciml.__file__).resolve().parent
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    out: dict[str, Any] = {"commit": None, "dirty": None, "path": str(folder)}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return out
    if head.returncode != 0:
        return out
    out["commit"] = head.stdout.strip() or None
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        out["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def library_versions() -> dict[str, str | None]:
    """Versions of Python and of the main libraries (``None`` for one not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, dist in _LIBRARIES.items():
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            versions[name] = getattr(module, "__version__", None) if module is not None else None
    versions["torch"] = str(torch.__version__)
    versions["cuda"] = torch.version.cuda
    return versions


def lookup(data: Any, key: str) -> Any:
    """``data["a"]["b"][0]`` for ``key = "a.b.0"``; raises ``KeyError(key)`` when absent."""
    node = data
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, Sequence) and not isinstance(node, str) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(node) <= index < len(node):
                raise KeyError(key)
            node = node[index]
        else:
            raise KeyError(key)
    return node


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": 1, "c.0": 2}`` for ``{"a": {"b": 1}, "c": [2]}`` (the dot notation of :func:`lookup`)."""
    out: dict[str, Any] = {}
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (list, tuple)) and data:
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{index}" if prefix else str(index)))
    else:
        out[prefix] = data
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file, then rename)."""
    return atomic_write_text(path, json.dumps(to_plain(data), indent=2) + "\n")


def find_config(trainer: pl.Trainer) -> Path | None:
    """``config.yaml`` of the run: in the run folder, else in ``trainer.default_root_dir`` (``None`` if absent)."""
    for folder in (run_folder(trainer), Path(getattr(trainer, "default_root_dir", None) or ".")):
        path = folder / "config.yaml"
        if path.is_file():
            return path
    return None


def read_config(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return data if isinstance(data, dict) else {}


def _hparams(obj: Any) -> dict[str, Any]:
    hparams = getattr(obj, "hparams", None)
    return to_plain(dict(hparams)) if isinstance(hparams, Mapping) else {}


def _seed(config: dict[str, Any], datamodule: Any) -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    if value is not None:
        try:
            return int(value)
        except ValueError:
            pass
    for key in ("run.seed", "experiment.seed", "seed"):
        try:
            found = lookup(config, key)
        except KeyError:
            continue
        if isinstance(found, int) and not isinstance(found, bool):
            return found
    seed = getattr(datamodule, "seed", None)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def key_sources(trainer: pl.Trainer, pl_module: Any, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a chosen key is looked up, in order: the config file, then the run's objects."""
    datamodule = getattr(trainer, "datamodule", None)
    trainer_values = {}
    for name in _TRAINER_KEYS:
        try:
            value = getattr(trainer, name)
        except Exception:  # noqa: BLE001, S112 - a property that needs a running loop
            continue
        trainer_values[name] = to_plain(value)
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is not None:
        trainer_values.setdefault("max_epochs", getattr(fit_loop, "max_epochs", None))
        trainer_values.setdefault("min_epochs", getattr(fit_loop, "min_epochs", None))
    hparams = _hparams(pl_module)
    objects = {
        **hparams,
        "model": hparams,
        "datamodule": _hparams(datamodule),
        "data": _hparams(datamodule),
        "trainer": trainer_values,
    }
    return [config, objects]


def resolve_keys(keys: Sequence[str], sources: list[dict[str, Any]], where: str = "MetadataLogger") -> dict[str, Any]:
    """``{key: value}`` of ``keys`` from the first source holding each.

    Raises
    ------
    ConfigError
        A key is in no source; the message names the closest keys that exist.
    """
    out: dict[str, Any] = {}
    for key in keys:
        value = _MISSING
        for source in sources:
            try:
                value = lookup(source, key)
                break
            except KeyError:
                continue
        if value is _MISSING:
            known = sorted({k for source in sources for k in flatten(source)} | _prefixes(sources))
            raise ConfigError(f"{where}: key {key!r} is neither in the config file nor in the run's hyperparameters; "
                              f"{closest(key, known)}")  # fmt: skip
        out[key] = to_plain(value)
    return out


def _prefixes(sources: list[dict[str, Any]]) -> set[str]:
    out = set()
    for source in sources:
        for key in flatten(source):
            parts = key.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return out


def collect_metadata(
    trainer: pl.Trainer,
    pl_module: Any,
    keys: Sequence[str] = (),
    config_path: str | os.PathLike | None = None,
    context: TrainEndContext | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """The metadata of a run as JSON-ready data (see the module docstring for the layout).

    Parameters
    ----------
    trainer, pl_module
        The run.
    keys
        Config keys in dot notation (``"model.lr"``, ``"trainer.max_epochs"``), read from
        the config file, else from the module's hyperparameters (``model.<name>`` or
        ``<name>``), the data module's (``datamodule.<name>``) and the trainer's settings
        (``trainer.max_epochs``, ``trainer.precision``, ...).
    config_path
        The run's resolved config (default: :func:`find_config`).
    context
        The train-end context; adds its checkpoints, test metrics, export and archive.
    strict
        Raise for a key that is found nowhere; otherwise record ``None`` and warn.

    Raises
    ------
    ConfigError
        With ``strict``, a key found nowhere (naming the closest keys).
    """
    path = Path(config_path) if config_path is not None else find_config(trainer)
    config = read_config(path)
    datamodule = getattr(trainer, "datamodule", None)
    chosen: dict[str, Any] = {}
    sources = key_sources(trainer, pl_module, config)
    for key in keys:
        try:
            chosen.update(resolve_keys([key], sources))
        except ConfigError as err:
            if strict:
                raise
            rank_zero_warn(str(err))
            chosen[key] = None
    data: dict[str, Any] = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "hyperparameters": _hparams(pl_module),
        "module_class": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "datamodule_hyperparameters": _hparams(datamodule),
        "config": chosen,
        "config_path": None if path is None else str(path),
        "git": git_commit(),
        "versions": library_versions(),
        "host": {"hostname": socket.gethostname(), "platform": platform.platform()},
        "seed": _seed(config, datamodule),
        "run_dir": str(run_folder(trainer)),
        "trainer": {
            "global_step": int(getattr(trainer, "global_step", 0)),
            "current_epoch": int(getattr(trainer, "current_epoch", 0)),
        },
    }
    if context is not None:
        data["train_end"] = context.as_dict()
    return to_plain(data)


# ----------------------------------------------------------------------------- callback
