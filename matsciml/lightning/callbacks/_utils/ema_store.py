"""The EMA weights of a module: storage, update and swap, apart from any Lightning hook.

:class:`EMAWeights` keeps one averaged (or copied) tensor per unique tensor of a
module's ``state_dict``, grouped in buckets of one kind, device and dtype so that each
update is a few fused ``torch._foreach_*`` calls (:mod:`.ema_math`). It knows which
weights the module holds, as one value (:class:`Holding`), and every swap checks it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.ema_math import copy_, ema_update_, is_averaged

__all__ = [
    "EMAWeights",
    "Holding",
    "collect_tensors",
    "lazy_names",
    "owner_modules",
    "broadcast_from_rank_zero",
    "read_torch_ema_state",
]


class Holding(str, enum.Enum):
    """Which weights the module holds: its own (``RAW``) or the averages (``EMA``, raw ones in the stash)."""

    RAW = "raw"
    EMA = "ema"


@dataclass
class _Bucket:
    """Tensors of one kind (averaged or copied), one module device and one dtype."""

    averaged: bool
    model: list[Tensor]  # the module's parameters / buffers
    ema: list[Tensor]  # the moving averages (on the EMA device)
    stash: list[Tensor]  # raw weights while the EMA weights are swapped in (on the EMA device)
    staging: list[Tensor] | None  # copy of ``model`` on the EMA device, when it differs from the module's


def collect_tensors(module: nn.Module) -> tuple[list[str], list[Tensor], dict[str, int]]:
    """Unique tensors of ``module.state_dict()``: first name of each, the tensors, and every key -> index."""
    names: list[str] = []
    tensors: list[Tensor] = []
    keys: dict[str, int] = {}
    seen: dict[int, int] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, Tensor):
            continue
        index = seen.get(id(tensor))
        if index is None:
            index = seen[id(tensor)] = len(tensors)
            names.append(key)
            tensors.append(tensor)
        keys[key] = index
    return names, tensors, keys


def lazy_names(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that lazy modules have not materialised yet."""
    found = [n for n, p in module.named_parameters() if nn.parameter.is_lazy(p)]
    found += [n for n, b in module.named_buffers() if nn.parameter.is_lazy(b)]
    return found


def owner_modules(module: nn.Module, names: list[str]) -> list[str]:
    """``'encoder.head (LazyLinear)'`` for each distinct owner module of ``names``."""
    owners: list[str] = []
    for name in names:
        path = name.rpartition(".")[0]
        sub = module.get_submodule(path) if path else module
        label = f"{path or '<root>'} ({type(sub).__name__})"
        if label not in owners:
            owners.append(label)
    return owners


def broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values when a process group with several ranks is running."""
    dist = torch.distributed
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    nccl = dist.get_backend() == "nccl"
    with torch.no_grad():
        for tensor in tensors:
            if nccl and tensor.device.type != "cuda":
                on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                dist.broadcast(on_device, src=0)
                tensor.copy_(on_device)
            else:
                dist.broadcast(tensor, src=0)


def read_torch_ema_state(state: Mapping[str, Any]) -> tuple[list[Tensor], int | None]:
    """``(shadow_params, num_updates)`` of a ``torch_ema.ExponentialMovingAverage.state_dict()``.

    Raises
    ------
    ConfigError
        A key is missing or ``shadow_params`` is not a list of tensors.
    """
    missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state]
    if missing:
        raise ConfigError(
            f"torch-ema state lacks {missing}: expected the dict returned by "
            f"ExponentialMovingAverage.state_dict() (keys decay, num_updates, shadow_params, collected_params)"
        )
    shadow = state["shadow_params"]
    if not isinstance(shadow, list | tuple) or not all(isinstance(t, Tensor) for t in shadow):
        raise ConfigError("torch-ema state: 'shadow_params' must be a list of tensors")
    return list(shadow), state["num_updates"]


class EMAWeights:
    """Averaged copies of a module's tensors, with the raw weights kept aside while they are swapped in.

    Parameters
    ----------
    device
        Where the averages live (``None``: beside each tensor).

    Attributes
    ----------
    holding
        :class:`Holding`: what the module holds now; ``since`` says from which event.
    ready
        ``False`` until :meth:`attach` has read a module.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.names: list[str] = []  # first state_dict key of each tracked tensor
        self.keys: dict[str, int] = {}  # every state_dict key (tied weights) -> index
        self.ema: list[Tensor] = []
        self.stash: list[Tensor] | None = None
        self.buckets: list[_Bucket] = []
        self.order: list[int] = []  # tracked-tensor index of each bucket entry, bucket by bucket
        self.buffer_indices: list[int] = []  # averaged tensors that are buffers (may differ across ranks)
        self.ready = False
        self.holding = Holding.RAW
        self.since = "the start"

    def set_holding(self, holding: Holding, since: str) -> None:
        """Declare what the module holds without copying (after loading weights into it)."""
        self.holding, self.since = Holding(holding), since

    def averaged_buffers(self) -> list[Tensor]:
        """The averages of buffers (made equal across ranks before an evaluation)."""
        return [self.ema[i] for i in self.buffer_indices]

    def model_tensors(self) -> list[Tensor]:
        out: list[Tensor] = [None] * len(self.names)  # type: ignore[list-item]
        position = 0
        for bucket in self.buckets:
            for tensor in bucket.model:
                out[self.order[position]] = tensor
                position += 1
        return out

    def _target_device(self, tensor: Tensor) -> torch.device:
        return self.device if self.device is not None else tensor.device

    def attach(self, pl_module: nn.Module, init: bool) -> None:
        """Read the module's tensors; with ``init`` create the EMA as their copy, else check and re-bucket it."""
        names, tensors, keys = collect_tensors(pl_module)
        lazy = [n for n, t in zip(names, tensors) if nn.parameter.is_lazy(t)]
        if lazy:
            raise ConfigError(
                f"{type(pl_module).__name__}: tensors {lazy[:5]} of lazy modules "
                f"{owner_modules(pl_module, lazy)} are still uninitialised; the EMA needs materialised "
                f"weights. Give these layers their input sizes, or run one forward pass on a batch before fit."
            )
        with torch.inference_mode(False), torch.no_grad():
            if init:
                self.ema = [t.detach().to(self._target_device(t), copy=True) for t in tensors]
                self.stash = None
            else:
                if names != self.names:
                    added = sorted(set(names) - set(self.names))[:5]
                    removed = sorted(set(self.names) - set(names))[:5]
                    raise RuntimeError(
                        f"{type(pl_module).__name__}'s parameters and buffers changed since the EMA was created "
                        f"(new: {added}, gone: {removed}); the EMA copy no longer matches the module. Create the "
                        f"EMA callback after building the model, or start a new fit."
                    )
                for i, tensor in enumerate(tensors):
                    target = self._target_device(tensor)
                    if self.ema[i].shape != tensor.shape:
                        raise RuntimeError(
                            f"{names[i]}: shape {tuple(tensor.shape)} in the module but {tuple(self.ema[i].shape)} "
                            f"in the EMA copy; the module was changed after the EMA was created"
                        )
                    if self.ema[i].device != target:
                        self.ema[i] = self.ema[i].to(target)
                        if self.stash is not None:
                            self.stash[i] = self.stash[i].to(target)
            self.names, self.keys = names, keys
            self.buffer_indices = [
                i for i, t in enumerate(tensors) if not isinstance(t, nn.Parameter) and is_averaged(t)
            ]
            groups: dict[tuple[bool, torch.device, torch.dtype], list[int]] = {}
            for i, tensor in enumerate(tensors):
                groups.setdefault((is_averaged(tensor), tensor.device, tensor.dtype), []).append(i)
            self.buckets, self.order = [], []
            for (averaged, device, _), indices in groups.items():
                ema = [self.ema[i] for i in indices]
                stash = [self.stash[i] for i in indices] if self.stash is not None else []
                staging = None
                if averaged and any(e.device != device for e in ema):
                    staging = [torch.empty_like(e) for e in ema]
                self.buckets.append(_Bucket(averaged, [tensors[i] for i in indices], ema, stash, staging))
                self.order.extend(indices)
        self.ready = True

    def ensure_stash(self) -> None:
        if self.stash is not None:
            return
        with torch.inference_mode(False):
            self.stash = [torch.empty_like(e) for e in self.ema]
        position = 0
        for bucket in self.buckets:
            n = len(bucket.model)
            bucket.stash = [self.stash[i] for i in self.order[position : position + n]]
            position += n

    def update(self, decay: float) -> None:
        for bucket in self.buckets:
            if not bucket.averaged:
                copy_(bucket.ema, bucket.model)
            elif bucket.staging is not None:
                copy_(bucket.staging, bucket.model)
                ema_update_(bucket.ema, bucket.staging, decay)
            else:
                ema_update_(bucket.ema, bucket.model, decay)

    def swap_in(self, where: str) -> None:
        if self.holding is not Holding.RAW:
            raise RuntimeError(
                f"EMA swap-in at {where}: the module already holds the EMA weights (swapped in at "
                f"{self.since}); the matching swap-out never ran. Was an evaluation interrupted, or a "
                f"validation/test/predict end hook skipped?"
            )
        self.ensure_stash()
        with torch.no_grad():
            for bucket in self.buckets:
                copy_(bucket.stash, bucket.model)
            # from here on a checkpoint takes the raw weights from the stash, whatever the module holds
            self.holding, self.since = Holding.EMA, where
            for bucket in self.buckets:
                copy_(bucket.model, bucket.ema)

    def swap_out(self, where: str) -> None:
        if self.holding is not Holding.EMA:
            raise RuntimeError(
                f"EMA swap-out at {where}: the module holds the raw weights already (since {self.since}); "
                f"a swap-in was skipped or a swap-out ran twice."
            )
        with torch.no_grad():
            for bucket in self.buckets:
                copy_(bucket.model, bucket.stash)
        self.holding, self.since = Holding.RAW, where

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA tensors by state-dict name (references, not copies); empty before ``fit``."""
        return {name: self.ema[i] for name, i in self.keys.items()} if self.ready else {}

    def raw_state_dict(self) -> dict[str, Tensor]:
        """The raw (trained) tensors by state-dict name, wherever they are now (references)."""
        if not self.ready:
            return {}
        source = self.stash if self.holding is Holding.EMA else [t.detach() for t in self.model_tensors()]
        assert source is not None
        return {name: source[i] for name, i in self.keys.items()}

    def import_shadow(self, module: nn.Module, shadow: list[Tensor], submodule: str = "") -> int:
        """Take torch-ema's ``shadow_params`` as the averages of ``module.get_submodule(submodule)``'s parameters.

        Returns the number of parameters imported.

        Raises
        ------
        ConfigError
            ``submodule`` does not exist, or the number or shapes of the shadow parameters differ.
        """
        pl_module = module
        try:
            owner = pl_module.get_submodule(submodule) if submodule else pl_module
        except AttributeError as err:
            raise ConfigError(f"from_torch_ema_state(submodule={submodule!r}): {err}") from None
        prefix = f"{submodule}." if submodule else ""
        names = [prefix + n for n, _ in owner.named_parameters()]
        if len(shadow) != len(names):
            raise ConfigError(
                f"torch-ema state has {len(shadow)} shadow parameters but "
                f"{submodule or type(pl_module).__name__} has {len(names)} parameters; pass "
                f"submodule=<the part of the task torch-ema tracked> (e.g. 'encoder')"
            )
        with torch.no_grad():
            for name, tensor in zip(names, shadow):
                ema = self.ema[self.keys[name]]
                if ema.shape != tensor.shape:
                    raise ConfigError(
                        f"torch-ema shadow parameter for {name!r} has shape {tuple(tensor.shape)}, the module's "
                        f"has {tuple(ema.shape)}: the parameter order differs, or submodule= is wrong"
                    )
                ema.copy_(tensor)
        return len(names)

    def restore(self, module: nn.Module, raw: Mapping[str, Tensor], saved: Mapping[str, Tensor] | None) -> None:
        """Averages from ``saved`` (a checkpoint's ``state_dict``) and the raw weights ``raw`` into ``module``.

        Raises
        ------
        ConfigError
            A tensor of the module is missing from ``raw`` or ``saved``, or its shape differs.
        """
        names, _, _ = collect_tensors(module)
        missing = [n for n in names if n not in raw or saved is None or n not in saved]
        if missing:
            raise ConfigError(
                f"the checkpoint's EMA state does not match {type(module).__name__}: no saved raw/EMA tensors "
                f"for {missing[:5]}. To start a new EMA run from the checkpoint's weights, load them into the "
                f"module (Task.load_from_checkpoint) and call fit without ckpt_path."
            )
        self.attach(module, init=True)
        assert saved is not None
        tensors = self.model_tensors()
        with torch.inference_mode(False), torch.no_grad():
            for i, name in enumerate(self.names):
                if tuple(raw[name].shape) != tuple(tensors[i].shape):
                    raise ConfigError(
                        f"checkpoint tensor {name!r} has shape {tuple(raw[name].shape)} but the module's has "
                        f"{tuple(tensors[i].shape)}"
                    )
                self.ema[i].copy_(saved[name])
                tensors[i].copy_(raw[name])
        self.set_holding(Holding.RAW, self.since)
