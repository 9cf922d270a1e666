"""Start a run from saved weights (the experiment config's ``load_weights``).

Two methods:

* ``checkpoint``: the whole task (encoder and output heads) is loaded, strictly, into the
  task built from the configs; the configs must therefore describe the same model.
* ``pretrained``: only the encoder (the ``encoder.`` entries of the checkpoint's
  ``state_dict``) is loaded; the output heads start fresh, so the targets may differ.

Files are read with ``torch.load(..., weights_only=True)``: no code from a checkpoint runs.
A Lightning checkpoint (with a ``state_dict`` entry) or a bare state dict is accepted. The
``state_dict`` of a checkpoint written with
:class:`~matsciml.lightning.callbacks.ExponentialMovingAverageCallback` holds the EMA
weights, so those are what is loaded.

Fine-tuning options (both methods):

* ``freeze``: ``true`` (or ``all``) freezes every encoder parameter; an integer ``k``
  freezes the encoder's input stage (the modules registered before its ``layers`` list:
  atom embedding, input projection) and its first ``k`` layers. Frozen parameters get
  ``requires_grad=False`` and are left out of the optimizer.
* ``encoder_lr``: learning rate of the (unfrozen) encoder parameters; the heads keep the
  task's ``lr`` (two AdamW parameter groups).

An :class:`~matsciml.lightning.callbacks.ExponentialMovingAverageCallback` in the trainer
config starts its average from the loaded weights (it copies the module's weights when
``fit`` starts), so the EMA of a fine-tuning run restarts from the checkpoint.

Example experiment YAML::

    load_weights:
      method: pretrained        # new heads for the new targets
      type: local
      path: experiments/logs/devset_energy/20250101-120000/checkpoints/last.ckpt
      freeze: 1                 # input stage and first interaction layer stay fixed
      encoder_lr: 0.0001        # the rest of the encoder learns 10x slower than the heads
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from matsciml.common.errors import ConfigError

__all__ = ["freeze_encoder", "load_weights", "read_checkpoint", "read_raw_weights", "read_state_dict"]


def read_checkpoint(path: str | Path, where: str = "load_weights.path") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Parameters
    ----------
    path
        The checkpoint file.
    where
        What names the file, for messages (a config key, a command-line argument).

    Raises
    ------
    ConfigError
        The file is missing, unreadable or truncated, or holds pickled objects that a
        ``weights_only`` load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{where}: {path} holds pickled objects that a safe load refuses ({first}); if you trust the file, "
            "save its weights alone with torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pt') "
            "and point path at weights.pt"
        ) from None
    except Exception as err:  # noqa: BLE001 - any read failure becomes one clear line
        raise ConfigError(
            f"{where}: cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None


def read_state_dict(path: str | Path, where: str = "load_weights.path") -> dict[str, torch.Tensor]:
    """Read the model ``state_dict`` of a Lightning checkpoint (or a bare state-dict file).

    Raises
    ------
    ConfigError
        The file is missing, is not a checkpoint, or holds pickled objects that a
        ``weights_only`` load refuses.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, where)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{where}: {path} holds no state dict (expected a Lightning checkpoint or a saved state_dict)"
        )
    return state


def read_raw_weights(path: str | Path, where: str = "checkpoint") -> dict[str, torch.Tensor] | None:
    """The raw (trained, not averaged) weights saved in a checkpoint of an EMA run, or ``None``.

    A checkpoint written with
    :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback` holds the
    EMA weights in ``state_dict`` and the raw ones in its callback state (``"raw"``: name
    -> tensor, the first name of each distinct tensor). ``None`` when the checkpoint has
    no such state (a run without EMA).

    Raises
    ------
    ConfigError
        As :func:`read_state_dict`.
    """
    ckpt = read_checkpoint(path, where)
    callbacks = ckpt.get("callbacks") if isinstance(ckpt, dict) else None
    for state in (callbacks or {}).values():
        if isinstance(state, dict) and state.get("format") == "matsciml.ema" and isinstance(state.get("raw"), dict):
            return dict(state["raw"])
    return None


def _mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    return "; ".join(parts)


def _shape_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = module.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and not isinstance(own[k], torch.nn.parameter.UninitializedParameter) and own[k].shape != v.shape
    ]
    return f"{len(bad)} with another shape (e.g. {', '.join(bad[:2])})" if bad else ""


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    own = set(module.state_dict())
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    problem = _mismatch(missing, unexpected) or _shape_mismatch(module, state)
    if problem:
        raise ConfigError(
            f"{where}: the checkpoint does not match the {what} built from the model config: {problem}; "
            "use the model config the checkpoint was trained with"
            + (", or method: pretrained to load the encoder only" if what == "task" else "")
        )
    module.load_state_dict(state, strict=True)


def _input_stage(encoder: torch.nn.Module, layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """Direct submodules of ``encoder`` registered before its ``layers`` list."""
    out = []
    for _, child in encoder.named_children():
        if child is layers:
            break
        out.append(child)
    return out


def freeze_encoder(task: torch.nn.Module, freeze: Any, where: str = "load_weights.freeze") -> int:
    """Freeze the whole encoder of ``task`` (``True``/``"all"``) or its input stage and first ``k`` layers.

    Parameters
    ----------
    task
        A task with an ``encoder`` module.
    freeze
        ``True``, ``"all"`` or ``"encoder"``: every encoder parameter. An integer ``k >= 0``:
        the modules registered before ``encoder.layers`` (atom embedding, input
        projection) and ``encoder.layers[:k]``. ``False``/``None``/``0`` with no input
        stage: nothing.
    where
        Location of the setting, for messages.

    Returns
    -------
    int
        Number of parameter tensors frozen (``requires_grad=False``).

    Raises
    ------
    ConfigError
        No encoder, a value that is neither ``all`` nor an integer, ``k`` larger than the
        number of layers, or an integer for an encoder without a ``layers`` list.
    """
    encoder = getattr(task, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ConfigError(f"{where}: freezing needs a task with an 'encoder' module")
    if freeze is None or freeze is False:
        return 0
    if freeze is True or (isinstance(freeze, str) and freeze.lower() in ("all", "encoder")):
        modules = [encoder]
    elif isinstance(freeze, int) and not isinstance(freeze, bool) and freeze >= 0:
        layers = getattr(encoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ConfigError(
                f"{where}: {type(encoder).__name__} has no 'layers' list to freeze the first {freeze} of; "
                "use freeze: all"
            )
        if freeze > len(layers):
            raise ConfigError(
                f"{where}: {freeze} layers asked, but {type(encoder).__name__} has {len(layers)}; "
                f"use 0..{len(layers)} or all"
            )
        modules = [*_input_stage(encoder, layers), *list(layers)[:freeze]]
    else:
        raise ConfigError(f"{where}: {freeze!r} is not valid; use all (the whole encoder) or a number of layers")
    count = 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                count += 1
    return count


def load_weights(task: torch.nn.Module, spec: dict[str, Any], where: str = "load_weights") -> dict[str, Any]:
    """Load weights into ``task`` as the experiment config's ``load_weights`` asks.

    Parameters
    ----------
    task
        The task built from the configs. For ``pretrained`` it must have an ``encoder`` attribute.
    spec
        ``{"method": "checkpoint"|"pretrained", "type": "local"|"wandb", "path": str}``,
        optionally ``freeze`` (see :func:`freeze_encoder`) and ``encoder_lr`` (a
        learning rate for the encoder's parameter group; the task must support
        ``encoder_lr``).
    where
        Location of the spec (``"<experiment file>: load_weights"``) for error messages.

    Returns
    -------
    dict
        ``{"method", "path", "num_tensors", "frozen", "encoder_lr"}``: what was loaded,
        how many parameter tensors were frozen, and the encoder learning rate set (or ``None``).

    Raises
    ------
    ConfigError
        ``type: wandb`` (no network access here), a missing or unreadable file, no
        encoder weights in the file (``pretrained``), or weights that do not fit the task.
    """
    method = spec.get("method", "checkpoint")
    kind = spec.get("type", "local")
    path = spec.get("path")
    if kind == "wandb":
        raise ConfigError(
            f"{where}.type: wandb artifacts are not available offline; download the artifact "
            "(wandb artifact get <name>) and use type: local with path: <file>.ckpt"
        )
    if kind != "local":
        raise ConfigError(f"{where}.type: unknown type {kind!r}; use 'local' (or 'wandb')")
    state = read_state_dict(path, f"{where}.path")
    if method == "checkpoint":
        _load_into(task, state, where, "task")
        loaded = len(state)
    elif method == "pretrained":
        encoder = getattr(task, "encoder", None)
        if not isinstance(encoder, torch.nn.Module):
            raise ConfigError(f"{where}.method: pretrained needs a task with an 'encoder' module")
        enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        if not enc_state:
            raise ConfigError(f"{where}.path: {path} has no 'encoder.' weights to load (method: pretrained)")
        _load_into(encoder, enc_state, where, "encoder")
        loaded = len(enc_state)
    else:
        raise ConfigError(f"{where}.method: unknown method {method!r}; use 'checkpoint' or 'pretrained'")
    frozen = freeze_encoder(task, spec.get("freeze"), f"{where}.freeze") if spec.get("freeze") is not None else 0
    encoder_lr = spec.get("encoder_lr")
    if encoder_lr is not None:
        if not hasattr(task, "encoder_lr"):
            raise ConfigError(f"{where}.encoder_lr: {type(task).__name__} has no encoder parameter group to set")
        try:
            encoder_lr = float(encoder_lr)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.encoder_lr: expected a number, got {encoder_lr!r}") from None
        if not encoder_lr >= 0:
            raise ConfigError(f"{where}.encoder_lr: must be >= 0, got {encoder_lr}")
        task.encoder_lr = encoder_lr
    return {"method": method, "path": str(path), "num_tensors": loaded, "frozen": frozen, "encoder_lr": encoder_lr}
