"""Catch a non-finite loss or prediction, write the offending batch, then stop or skip the step."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from matsciml.common import graph as graphs
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.task_hooks import TaskHooksCallback
from matsciml.lightning.callbacks._utils.grads import TrainingFaultError, batch_ids, skip_optimizer_step
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars, run_folder
from matsciml.lightning.checkpointing import atomic_path, atomic_write_text

__all__ = ["ForwardNaNDetection", "write_batch_dump", "locate_nonfinite"]

_ACTIONS = ("stop", "skip")


# ----------------------------------------------------------------------------- plain functions
def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside ``obj`` (tensors, mappings, sequences, dataclasses such as ``Embeddings``)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name))


def _nonfinite(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def locate_nonfinite(module: torch.nn.Module, run: Callable[[], Any]) -> str | None:
    """Run ``run()`` with a forward hook on every submodule; name the first whose output is not finite.

    Forward hooks fire when a module returns, children before their parent, so the first
    module reported is the innermost one where a non-finite value appeared in execution
    order. Returns ``"<qualified name> (<class>)"`` or ``None`` when every output is finite.
    Exceptions raised by ``run`` are swallowed (this is a diagnostic).
    """
    found: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not found and any(_nonfinite(t) for t in _tensors(output)):
                found.append(f"{name} ({type(mod).__name__})")

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in module.named_modules() if n]
    try:
        with torch.enable_grad():
            run()
    except Exception:  # noqa: BLE001 - a diagnostic pass must not hide the original fault
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _json_array(values: Any) -> Any:
    """``values`` with every non-finite float replaced by its string (strict JSON has no NaN)."""
    if isinstance(values, Mapping):
        return {str(k): _json_array(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [_json_array(v) for v in values]
    if isinstance(values, float):
        return _json_number(values)
    return values


def _readable_json(record: dict[str, Any]) -> str:
    """Strict JSON, one top-level key per line and one structure per line."""
    lines = []
    for key, value in record.items():
        if key == "structures" and isinstance(value, list) and value:
            inner = ",\n".join("  " + json.dumps(v, allow_nan=False) for v in value)
            text = f"[\n{inner}\n ]"
        else:
            text = json.dumps(value, allow_nan=False)
        lines.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _graph_of(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.get("graph")
    return batch if hasattr(batch, "pos") else None


def _structures(batch: Any) -> list[dict[str, Any]] | None:
    """The structures of a batch as plain data (``None`` when the batch holds no structure graph)."""
    graph = _graph_of(batch)
    if graph is None:
        return None
    try:
        pos = graphs.positions(graph).detach().double().cpu()
        numbers = graphs.atomic_numbers(graph).detach().cpu()
        index = graphs.graph_index(graph).detach().cpu()
        cell = graphs.cells(graph).detach().double().cpu()
    except (AttributeError, KeyError):
        return None
    ids = batch_ids(batch)
    out = []
    for g in range(cell.shape[0]):
        mask = index == g
        periodic = bool(cell[g].abs().sum() > 0)
        out.append(
            {
                "id": ids[g] if g < len(ids) else f"structure {g} of the batch",
                "natoms": int(mask.sum()),
                "atomic_numbers": numbers[mask].tolist(),
                "positions": pos[mask].tolist(),
                "cell": cell[g].tolist(),
                "pbc": [periodic] * 3,
                "finite_positions": bool(torch.isfinite(pos[mask]).all()),
            }
        )
    return out


def _write_extxyz(path: Path, structures: list[dict[str, Any]]) -> None:
    from ase import Atoms
    from ase.io import write

    frames = []
    for s in structures:
        atoms = Atoms(numbers=s["atomic_numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
        atoms.info["id"] = s["id"]
        frames.append(atoms)
    with atomic_path(path) as tmp:
        write(tmp, frames, format="extxyz")


def _other_tensors(batch: Any, prefix: str = "") -> dict[str, Any]:
    """Tensors of a batch that is not a structure batch, as lists (for the JSON record)."""
    out: dict[str, Any] = {}
    if isinstance(batch, Tensor):
        out[prefix or "batch"] = batch.detach().cpu().tolist()
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            out.update(_other_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            out.update(_other_tensors(value, f"{prefix}[{i}]"))
    return out


def write_batch_dump(folder: str | Path, stem: str, batch: Any, record: dict[str, Any]) -> list[Path]:
    """Write a batch and a record about it, atomically, in a form a person can read.

    Files written in ``folder`` (created if needed):

    * ``<stem>.extxyz``: the structures of the batch (positions in Å, atomic numbers,
      cell, pbc; ``id`` in each frame's comment line), readable with
      ``ase.io.read(path, ":")``; only for a batch with a structure graph;
    * ``<stem>.json``: ``record`` plus ``"structures"`` (the same data as lists, with a
      ``finite_positions`` flag per structure) or, for another batch, ``"tensors"``.
      Non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Each file is written to a temporary name and moved into place, so a crash leaves no
    half-written file. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    structures = _structures(batch)
    record = dict(record)
    if structures is not None:
        xyz = folder / f"{stem}.extxyz"
        _write_extxyz(xyz, structures)
        written.append(xyz)
        record["extxyz"] = xyz.name
        record["structures"] = structures
    else:
        record["tensors"] = _other_tensors(batch)
    path = folder / f"{stem}.json"
    atomic_write_text(path, _readable_json(_json_array(record)))
    written.insert(0, path)
    return written


@dataclasses.dataclass
class _Pending:
    flags: Tensor  # bool [1 + number of keys]: finite loss, finite prediction of each key
    keys: list[str]
    loss: Tensor
    outputs: dict[str, Tensor]
    batch: Any
    batch_idx: int
    step: int


# ----------------------------------------------------------------------------- the callback
class ForwardNaNDetection(TaskHooksCallback):
    """Catch a non-finite training loss or prediction, write the batch, then stop or skip the step.

    For every training micro-batch the callback checks that the loss and, for a task
    (:mod:`matsciml.models.tasks.protocol`), the output of every output head are finite.
    The check adds no host-device synchronisation of its own in the forward pass: the
    flags are computed on the device and read once, just before the optimizer step. When
    something is not finite it

    1. writes the offending batch to ``output_path`` as
       ``nonfinite_step<step>_batch<batch_idx>_rank<rank>.extxyz`` (the structures: ids,
       positions, atomic numbers, cell) and ``....json`` (the step, epoch, batch index,
       rank, the ids, the keys that were not finite, ``offending_ids`` -- the structures
       whose prediction was not finite --, the non-finite target and position keys, the
       loss, the first module whose output was not finite, and the structures as lists),
       each written atomically (see :func:`write_batch_dump`);
    2. with ``locate_module``, runs the task's ``compute_losses`` on the batch again with
       forward hooks on every submodule and names the first module whose output is not
       finite (only on the faulty batch, so it costs nothing otherwise);
    3. ``action="stop"``: raises :class:`~matsciml.lightning.callbacks.gradients.TrainingFaultError`
       before the optimizer step, so ``trainer.fit`` ends with that error,
       ``trainer.global_step`` is the step of the bad batch and the weights are those
       that produced it (``OnExceptionCheckpoint`` can save them);
       ``action="skip"``: skips the optimizer step (every gradient set to ``None``: the
       weights stay bitwise unchanged, weight decay and momentum included), warns with a
       :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning`, counts it
       (scalar ``nonfinite_batches``) and goes on. Layers with running statistics (batch
       norm) have seen the bad batch in both cases.

    Under DDP the decision is reduced over the ranks (a non-finite loss on one rank
    poisons every rank's all-reduced gradient), so every rank stops or skips together;
    each rank writes its own bad batches.

    A ``LightningModule`` without the task protocol gets the loss check only: the callback
    says once that it cannot check per-key predictions or locate the module.

    Hooks it acts in:

    * ``on_fit_start`` / ``on_fit_end``: add / remove forward hooks on the output heads;
    * ``on_train_batch_start``: keeps a reference to the batch;
    * ``on_before_backward``: computes the finiteness flags of the loss and predictions;
    * ``on_before_optimizer_step``: reads the flags (one synchronisation), writes, stops
      or skips.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ForwardNaNDetection
              init_args:
                output_path: nonfinite_batches
                action: skip

    Parameters
    ----------
    output_path
        Folder of the dumps; default ``None``: ``<run folder>/nonfinite_batches`` (the
        first logger's ``log_dir``, else the trainer's ``default_root_dir``).
    action
        ``"stop"`` (default) or ``"skip"``.
    check_predictions
        Also check the output of every output head (tasks only). Default ``True``.
    locate_module
        Name the first module with a non-finite output (tasks only). Default ``True``.
    max_dumps
        Batches written at most (later bad batches are only counted), default ``20``.

    Raises
    ------
    ConfigError
        Unknown ``action`` or ``max_dumps`` < 0.
    TrainingFaultError
        With ``action="stop"``, when a non-finite loss or prediction is found.
    """

    def __init__(
        self,
        output_path: str | Path | None = None,
        action: Literal["stop", "skip"] = "stop",
        check_predictions: bool = True,
        locate_module: bool = True,
        max_dumps: int = 20,
    ) -> None:
        super().__init__()
        if action not in _ACTIONS:
            raise ConfigError(f"ForwardNaNDetection: action={action!r} must be one of {_ACTIONS}")
        if int(max_dumps) < 0:
            raise ConfigError(f"ForwardNaNDetection: max_dumps={max_dumps!r} must be >= 0")
        self.output_path = None if output_path is None else Path(output_path)
        self.action = action
        self.check_predictions = bool(check_predictions)
        self.locate_module = bool(locate_module)
        self.max_dumps = int(max_dumps)
        self.nonfinite_batches = 0
        #: one record per bad batch (what the JSON file holds, without the structures)
        self.events: list[dict[str, Any]] = []
        self._dumps = 0
        self._captured: dict[str, Tensor] = {}
        self._capture = False
        self._pending: list[_Pending] = []
        self._current: tuple[Any, int, int] | None = None
        self._warner = RateLimitedWarner(min_interval_steps=0, max_per_key=20)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        needs = "encoder, output_heads, compute_losses"
        otherwise = (
            "only the loss is checked; per-key predictions are not checked and the module that produced a "
            "non-finite value is not located."
        )
        if self.check_task(pl_module, needs, otherwise) and self.check_predictions:
            for key, head in pl_module.output_heads.items():
                self.add_forward_hook(head, self._make_hook(str(key)))

    def _make_hook(self, key: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if self._capture and isinstance(output, Tensor):
                self._captured[key] = output.detach()

        return hook

    @override
    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._capture = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._current = (batch, batch_idx, trainer.global_step)
        self._captured = {}
        self._capture = True

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._current is None:
            return
        batch, batch_idx, step = self._current
        outputs = dict(self._captured)
        self._captured = {}
        keys = ["loss", *outputs]
        tensors = [loss.detach(), *outputs.values()]
        flags = torch.stack([torch.isfinite(t).all() for t in tensors])
        self._pending.append(_Pending(flags, keys, loss.detach(), outputs, batch, batch_idx, step))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._capture = False
        if self._current is not None and trainer.global_step != self._current[2]:
            self._pending = []  # the step happened: nothing left to resolve
        self._current = None

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.cat([p.flags for p in pending]).tolist()  # the one synchronisation of the step
        bad_here = not all(finite)
        bad = bad_here
        if trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad_here, all=False))
        if not bad:
            return
        messages = []
        offset = 0
        for item in pending:
            flags = finite[offset : offset + len(item.keys)]
            offset += len(item.keys)
            if all(flags):
                continue
            messages.append(self._report(trainer, pl_module, item, [k for k, ok in zip(item.keys, flags) if not ok]))
        if not messages:
            messages.append(f"rank {trainer.global_rank} saw finite values; another rank did not")
        self.nonfinite_batches += 1
        log_scalars(trainer, {"nonfinite_batches": self.nonfinite_batches}, step=trainer.global_step)
        text = "; ".join(messages)
        if self.action == "stop":
            self.remove_hooks()
            raise TrainingFaultError(
                f"ForwardNaNDetection: {text}. Training stopped before the optimizer step (weights unchanged). "
                "Inspect the written structures (atoms too close, non-finite positions or targets), lower the "
                "learning rate or clip gradients; action='skip' steps over such batches instead."
            )
        skip_optimizer_step(optimizer)
        self._warner.warn(
            "skip",
            f"ForwardNaNDetection: {text}. The optimizer step was skipped (weights unchanged, "
            f"{self.nonfinite_batches} so far, logged as nonfinite_batches). Inspect the written structures (atoms "
            "too close, non-finite positions or targets), lower the learning rate or clip gradients.",
            trainer.global_step,
            rank=trainer.global_rank,
        )

    # ------------------------------------------------------------------ reporting
    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, item: _Pending, keys: list[str]) -> str:
        ids = batch_ids(item.batch)
        offending = self._offending_ids(item, keys, ids)
        record: dict[str, Any] = {
            "step": item.step,
            "epoch": trainer.current_epoch,
            "batch_idx": item.batch_idx,
            "rank": trainer.global_rank,
            "action": self.action,
            "nonfinite": keys,
            "loss": _json_number(float(item.loss.float().reshape(-1)[0])) if item.loss.numel() else None,
            "ids": ids,
            "offending_ids": offending,
            "nonfinite_inputs": self._bad_inputs(item.batch),
            "first_nonfinite_module": None,
        }
        if self.locate_module and self._protocol:
            self._capture = False
            record["first_nonfinite_module"] = locate_nonfinite(pl_module, lambda: pl_module.compute_losses(item.batch))
        where = ""
        if self._dumps < self.max_dumps:
            folder = self.output_path or (run_folder(trainer) / "nonfinite_batches")
            stem = f"nonfinite_step{item.step}_batch{item.batch_idx}_rank{trainer.global_rank}"
            paths = write_batch_dump(folder, stem, item.batch, record)
            self._dumps += 1
            where = f"; batch written to {', '.join(str(p) for p in paths)}"
        self.events.append(record)
        shown = ", ".join(offending[:10]) + (f" and {len(offending) - 10} more" if len(offending) > 10 else "")
        module = record["first_nonfinite_module"]
        return (
            f"step {item.step} (epoch {trainer.current_epoch}, batch {item.batch_idx}): non-finite {', '.join(keys)}"
            f" (structures: {shown or 'unknown ids'})"
            + (f", non-finite inputs: {', '.join(record['nonfinite_inputs'])}" if record["nonfinite_inputs"] else "")
            + (f", first non-finite module output: {module}" if module else "")
            + where
        )

    @staticmethod
    def _offending_ids(item: _Pending, keys: list[str], ids: list[str]) -> list[str]:
        """Ids of the structures whose prediction (or positions) is not finite; all ids when unknown."""
        graph = _graph_of(item.batch)
        bad = torch.zeros(len(ids), dtype=torch.bool)
        index = None
        if graph is not None:
            try:
                index = graphs.graph_index(graph).detach().cpu()
                pos = graphs.positions(graph).detach().cpu()
                rows = ~torch.isfinite(pos).all(dim=-1)
                if rows.any() and len(ids):
                    bad[index[rows].unique()] = True
            except (AttributeError, KeyError):
                index = None
        for key in keys:
            out = item.outputs.get(key)
            if out is None or out.dim() == 0:
                continue
            rows = ~torch.isfinite(out.detach().cpu().reshape(out.shape[0], -1)).all(dim=-1)
            if out.shape[0] == len(ids):
                bad |= rows
            elif index is not None and out.shape[0] == index.shape[0] and len(ids):
                bad[index[rows].unique()] = True
        chosen = [i for i, b in zip(ids, bad.tolist()) if b]
        return chosen or list(ids)

    @staticmethod
    def _bad_inputs(batch: Any) -> list[str]:
        """Names of the non-finite inputs of a batch: ``positions``, ``cell``, ``targets.<key>``."""
        found = []
        graph = _graph_of(batch)
        if graph is not None:
            for name, getter in (("positions", graphs.positions), ("cell", graphs.cells)):
                try:
                    if _nonfinite(getter(graph)):
                        found.append(name)
                except (AttributeError, KeyError):
                    pass
        targets = batch.get("targets") if isinstance(batch, Mapping) else None
        if isinstance(targets, Mapping):
            for key, value in targets.items():
                if isinstance(value, Tensor) and _nonfinite(value):
                    found.append(f"targets.{key}")
        return found

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_batches": self.nonfinite_batches, "dumps": self._dumps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.nonfinite_batches = int(state_dict.get("nonfinite_batches", 0))
        self._dumps = int(state_dict.get("dumps", 0))
