"""Prediction writers for ``trainer.predict``: every structure's predictions (and targets), in dataset order.

Both writers are Lightning ``BasePredictionWriter`` callbacks that work under DDP: each
rank keeps, per structure, its dataset index, id, number of atoms, predictions and the
targets its batch carries; when the prediction epoch ends each rank writes its part
(atomically), the ranks meet at a barrier, and rank 0 merges the parts in dataset order
(a structure seen twice, as a padding sampler repeats some, is kept once).

* :class:`InferenceWriter` (``output_dir``): the parts as ``results_rank<r>.pt`` and the
  merged ``predictions.pt``;
* :class:`LeaderboardWriter` (``output_path``): predictions only, as
  ``<output_path>/<Task>/<Encoder>/<YYYYmmdd_HHMMSS>.npz``.

The merged layout (``torch.load(path, weights_only=True)``)::

    {"index": LongTensor [M],           # dataset index of each structure
     "ids": [str] * M,
     "natoms": LongTensor [M],
     "predictions": {key: Tensor},      # per structure [M, ...], per atom [sum natoms, ...]
     "targets": {key: Tensor}}          # same layout; NaN where a structure has no value

One prediction dataloader per ``trainer.predict`` call (dataset indices of several would
collide: a clear error says so).

Hooks they act in: ``on_predict_batch_end`` (through ``write_on_batch_end``: split the
batch per structure) and ``on_predict_epoch_end`` (write the part, barrier, merge on rank 0).

Example YAML (trainer config)::

    callbacks:
      - class_path: matsciml.lightning.callbacks.InferenceWriter
        init_args: {output_dir: predictions}

and in Python::

    writer = InferenceWriter("predictions")
    trainer = pl.Trainer(callbacks=[writer])
    trainer.predict(task, datamodule=dm, return_predictions=False)
    merged = torch.load("predictions/predictions.pt", weights_only=True)
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from matsciml.datasets.collate import STACKED_TARGETS, is_per_atom
from matsciml.datasets.schema import PER_ATOM_TARGETS
from matsciml.lightning.checkpointing import atomic_path, atomic_torch_save
from matsciml.registry import register_callback

__all__ = ["InferenceWriter", "LeaderboardWriter", "merge_records", "split_batch"]

_META = ("ids", "natoms", "index")


def _natoms(batch: Any, prediction: Mapping[str, Any], size: int) -> list[int]:
    for source in (batch if isinstance(batch, Mapping) else {}, prediction):
        value = source.get("natoms")
        if value is not None:
            return [int(n) for n in torch.as_tensor(value).reshape(-1).tolist()]
    return [0] * size


def _split(key: str, value: Any, natoms: list[int]) -> list[torch.Tensor] | None:
    """One tensor per structure from a batched value: per atom (sliced by ``natoms``) or per structure."""
    tensor = torch.as_tensor(value).detach().cpu()
    size, total = len(natoms), sum(natoms)
    if key in PER_ATOM_TARGETS:
        per_atom = True
    elif key in STACKED_TARGETS:
        per_atom = False
    else:
        per_atom = tensor.dim() >= 1 and tensor.shape[0] == total and total != size
    if per_atom and tensor.dim() >= 1 and tensor.shape[0] == total:
        return list(torch.split(tensor, natoms, dim=0))
    if not per_atom and tensor.dim() >= 1 and tensor.shape[0] == size:
        return list(tensor.unbind(0))
    return None


def split_batch(
    prediction: Mapping[str, Any], batch: Any, batch_indices: Sequence[int] | None, start: int = 0
) -> list[dict[str, Any]]:
    """Per-structure records of one predicted batch.

    Parameters
    ----------
    prediction
        What ``predict_step`` returned (``{"ids", key: Tensor, ...}``).
    batch
        The collated batch (``natoms``, ``ids``, ``targets``).
    batch_indices
        Dataset index of each structure (Lightning's); ``None``: ``start, start + 1, ...``.
    start
        First index when ``batch_indices`` is ``None``.

    Returns
    -------
    list of dict
        ``{"index", "id", "natoms", "predictions": {key: Tensor}, "targets": {key: Tensor}}``.
    """
    mapping = batch if isinstance(batch, Mapping) else {}
    ids = list(prediction.get("ids") or mapping.get("ids") or [])
    size = len(batch_indices) if batch_indices is not None else len(ids) or int(mapping.get("batch_size") or 0)
    natoms = _natoms(mapping, prediction, size)
    indices = list(batch_indices) if batch_indices is not None else list(range(start, start + size))
    records = [
        {
            "index": int(indices[i]),
            "id": str(ids[i]) if i < len(ids) else str(indices[i]),
            "natoms": natoms[i],
            "predictions": {},
            "targets": {},
        }
        for i in range(size)
    ]
    for part, source in (("predictions", prediction), ("targets", mapping.get("targets") or {})):
        for key, value in source.items():
            if key in _META or not isinstance(value, (torch.Tensor, np.ndarray, float, int)):
                continue
            pieces = _split(key, value, natoms)
            if pieces is None:
                rank_zero_warn(
                    f"prediction writer: {part} {key!r} of shape {tuple(np.shape(value))} is not per "
                    f"structure or per atom of a batch of {size}; left out"
                )
                continue
            for record, piece in zip(records, pieces):
                record[part][key] = piece.clone()
    return records


def _stack(key: str, values: list[torch.Tensor | None], natoms: list[int]) -> torch.Tensor:
    template = next(v for v in values if v is not None)
    present = [v for v in values if v is not None]
    per_atom = is_per_atom(key, present, [n for v, n in zip(values, natoms) if v is not None])
    filled = []
    for value, n in zip(values, natoms):
        if value is None:
            shape = (n, *template.shape[1:]) if per_atom else tuple(template.shape)
            dtype = template.dtype if template.is_floating_point() else torch.float64
            value = torch.full(shape, float("nan"), dtype=dtype)
        filled.append(value.to(template.dtype) if template.is_floating_point() else value)
    return torch.cat(filled, dim=0) if per_atom else torch.stack(filled, dim=0)


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-structure records (from any ranks) into one result in dataset order (see the module docs)."""
    unique: dict[int, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(int(record["index"]), record)
    ordered = [unique[i] for i in sorted(unique)]
    natoms = [int(r["natoms"]) for r in ordered]
    out: dict[str, Any] = {
        "index": torch.tensor([r["index"] for r in ordered], dtype=torch.long),
        "ids": [r["id"] for r in ordered],
        "natoms": torch.tensor(natoms, dtype=torch.long),
        "predictions": {},
        "targets": {},
    }
    for part in ("predictions", "targets"):
        keys = list(dict.fromkeys(k for r in ordered for k in r[part]))
        for key in keys:
            out[part][key] = _stack(key, [r[part].get(key) for r in ordered], natoms)
    return out


class _GatheringWriter(BasePredictionWriter):
    """Keeps per-structure records per rank; writes the part and merges on rank 0 at the epoch's end."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._records: list[dict[str, Any]] = []
        self._seen = 0
        #: The merged result of the last ``predict`` (rank 0; ``None`` on other ranks).
        self.result: dict[str, Any] | None = None

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records, self._seen, self.result = [], 0, None

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"{type(self).__name__}: predict_step returned {type(prediction).__name__}; it must return a "
                "mapping {'ids': [...], key: Tensor} as the matsciml tasks do"
            )
        if dataloader_idx != 0:
            raise RuntimeError(
                f"{type(self).__name__} writes one prediction dataloader (dataset indices would collide); call "
                "trainer.predict once per dataset, each with its own writer folder"
            )
        if batch_indices is None and trainer.world_size > 1:
            raise RuntimeError(
                f"{type(self).__name__}: Lightning did not report the dataset indices of the batches; use a "
                "torch DataLoader (Lightning wraps its batch sampler) so the ranks' parts can be merged in order"
            )
        records = split_batch(prediction, batch, batch_indices, self._seen)
        self._seen += len(records)
        self._records.extend(records)

    def _part_path(self, rank: int) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def _write_merged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover - overridden

    def _cleanup(self, world_size: int) -> None:
        """Remove the parts after merging (default: keep them)."""

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        atomic_torch_save(self._records, self._part_path(trainer.global_rank), fsync=False)
        trainer.strategy.barrier("prediction_writer_parts")
        if trainer.is_global_zero:
            records: list[dict[str, Any]] = []
            for rank in range(trainer.world_size):
                records.extend(torch.load(self._part_path(rank), map_location="cpu", weights_only=True))
            self.result = merge_records(records)
            self._write_merged(trainer, pl_module, self.result)
            self._cleanup(trainer.world_size)
        trainer.strategy.barrier("prediction_writer_merged")
        self._records = []


@register_callback()
class InferenceWriter(_GatheringWriter):
    """Write every structure's predictions and targets of ``trainer.predict`` to ``output_dir``.

    See :mod:`matsciml.lightning.writers` for the layout, the hooks and a YAML example.
    Files: ``results_rank<r>.pt`` (each rank's records: a list of
    ``{"index", "id", "natoms", "predictions", "targets"}``) and ``predictions.pt`` (the
    merged result, in dataset order). Both load with ``torch.load(..., weights_only=True)``.

    Parameters
    ----------
    output_dir
        Folder for the files (created when missing).
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)

    @property
    def merged_path(self) -> Path:
        """``<output_dir>/predictions.pt``."""
        return self.output_dir / "predictions.pt"

    def _part_path(self, rank: int) -> Path:
        return self.output_dir / f"results_rank{rank}.pt"

    def _write_merged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: dict[str, Any]) -> None:
        atomic_torch_save(merged, self.merged_path, fsync=False)


@register_callback()
class LeaderboardWriter(_GatheringWriter):
    """Write the predictions of ``trainer.predict`` as one NumPy ``.npz`` file for a leaderboard submission.

    The file is ``<output_path>/<task class>/<encoder class>/<YYYYmmdd_HHMMSS>.npz`` with
    arrays ``ids`` (strings), ``index``, ``natoms`` and one per predicted key (per-atom
    keys concatenated in dataset order); it loads with ``np.load(path)`` (no pickle). See
    :mod:`matsciml.lightning.writers` for the hooks and the DDP behaviour.

    Example YAML::

        callbacks:
          - class_path: matsciml.lightning.callbacks.LeaderboardWriter
            init_args: {output_path: leaderboard}

    Parameters
    ----------
    output_path
        Parent folder of the submissions (created when missing).
    """

    def __init__(self, output_path: str | Path) -> None:
        super().__init__()
        self.output_path = Path(output_path)
        self.output_path.mkdir(parents=True, exist_ok=True)
        #: The last file written (rank 0).
        self.written: Path | None = None

    def _part_path(self, rank: int) -> Path:
        return self.output_path / ".parts" / f"rank{rank}.pt"

    def _cleanup(self, world_size: int) -> None:
        for rank in range(world_size):
            self._part_path(rank).unlink(missing_ok=True)
        try:
            (self.output_path / ".parts").rmdir()
        except OSError:
            pass

    def _write_merged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: dict[str, Any]) -> None:
        encoder = getattr(pl_module, "encoder", None)
        folder = self.output_path / type(pl_module).__name__ / type(encoder).__name__
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        arrays = {
            "ids": np.asarray(merged["ids"], dtype=str),
            "index": merged["index"].numpy(),
            "natoms": merged["natoms"].numpy(),
        }
        for key, value in merged["predictions"].items():
            arrays[key] = value.numpy()
        target = folder / f"{stamp}.npz"
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
        self.written = target
