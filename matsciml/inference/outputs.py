"""Files of a prediction run: per-structure CSV, extended XYZ with per-atom forces, metrics and parity plots.

All files are written atomically (:func:`~matsciml.lightning.checkpointing.atomic_path`).
They read the merged result of :class:`~matsciml.lightning.writers.InferenceWriter`
(``{"index", "ids", "natoms", "predictions", "targets"}``, dataset order).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matsciml.datasets.collate import STACKED_TARGETS
from matsciml.datasets.schema import PER_ATOM_TARGETS
from matsciml.lightning.checkpointing import atomic_path

__all__ = [
    "per_structure_keys",
    "parity_metrics",
    "write_csv",
    "write_extxyz",
    "write_metrics",
    "write_inference_data",
    "plot_parity",
    "plot_all",
]


def _per_atom(result: dict[str, Any], key: str, value: torch.Tensor) -> bool:
    """Whether ``value`` of ``key`` holds one row per atom (the rule of :func:`~matsciml.datasets.collate.collate_samples`)."""
    if key in PER_ATOM_TARGETS:
        return True
    if key in STACKED_TARGETS:
        return False
    size, total = len(result["ids"]), int(result["natoms"].sum())
    return value.dim() >= 1 and value.shape[0] == total and total != size


def per_structure_keys(result: dict[str, Any]) -> list[str]:
    """Predicted keys with one value (or array) per structure."""
    return [k for k, v in result["predictions"].items() if not _per_atom(result, k, v)]


def _flat_columns(key: str, value: torch.Tensor) -> list[str]:
    per = int(np.prod(value.shape[1:])) if value.dim() > 1 else 1
    return [key] if per == 1 else [f"{key}_{j}" for j in range(per)]


def _cell(value: float) -> str:
    return "" if not math.isfinite(value) else repr(float(value))


def write_csv(result: dict[str, Any], path: str | Path) -> Path:
    """One row per structure: ``index, id, natoms``, then ``<key>_pred`` and ``<key>_target`` per key.

    A target that is missing or not finite (e.g. a NaN band gap) is an empty cell;
    per-structure arrays (stress) get one column per component (``stress_0_pred`` ...).
    Per-atom values (forces) are in the extended XYZ file instead.
    """
    keys = per_structure_keys(result)
    preds = {k: result["predictions"][k].reshape(len(result["ids"]), -1).double().numpy() for k in keys}
    targets = {
        k: result["targets"][k].reshape(len(result["ids"]), -1).double().numpy() for k in keys if k in result["targets"]
    }
    header = ["index", "id", "natoms"]
    for key in keys:
        names = _flat_columns(key, result["predictions"][key])
        header += [f"{n}_pred" for n in names]
        if key in targets:
            header += [f"{n}_target" for n in names]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row, (index, sid, natoms) in enumerate(
            zip(result["index"].tolist(), result["ids"], result["natoms"].tolist())
        ):
            line: list[Any] = [index, sid, natoms]
            for key in keys:
                line += [repr(float(v)) for v in preds[key][row]]
                if key in targets:
                    line += [_cell(v) for v in targets[key][row]]
            writer.writerow(line)
    return path


def write_extxyz(result: dict[str, Any], structure: Callable[[int], Any], path: str | Path) -> Path:
    """Every structure with its predictions: ``info["<key>_pred"]``/``["<key>_target"]``, ``arrays["forces_pred"]``.

    Parameters
    ----------
    result
        The merged predictions.
    structure
        ``structure(dataset_index) -> ase.Atoms`` (positions, numbers, cell, pbc).
    path
        The ``.extxyz`` file.

    Non-finite targets are left out of ``info``; per-atom targets go to ``arrays["<key>_target"]``.
    """
    import ase.io

    offsets = np.concatenate([[0], np.cumsum(result["natoms"].numpy())])
    frames = []
    for row, (index, sid) in enumerate(zip(result["index"].tolist(), result["ids"])):
        atoms = structure(int(index))
        atoms.info = {"id": sid, "index": int(index)}
        for part, suffix in (("predictions", "pred"), ("targets", "target")):
            for key, value in result[part].items():
                if _per_atom(result, key, value):
                    atoms.arrays[f"{key}_{suffix}"] = value[offsets[row] : offsets[row + 1]].double().numpy()
                    continue
                item = value[row].double().numpy()
                if suffix == "target" and not np.all(np.isfinite(item)):
                    continue
                atoms.info[f"{key}_{suffix}"] = float(item) if item.size == 1 else item.reshape(-1)
        frames.append(atoms)
    path = Path(path)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")
    return path


def _pairs(result: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite (target, prediction) pairs of ``key``, flattened over components."""
    pred = result["predictions"][key].double().reshape(-1).numpy()
    target = result["targets"][key].double().reshape(-1).numpy()
    keep = np.isfinite(target) & np.isfinite(pred)
    return target[keep], pred[keep]


def parity_metrics(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per key with targets: ``count``, ``mae``, ``rmse``, ``r2``, ``mean_predictor_mae``, ``ratio``, ``skipped``.

    Over every finite component (forces: every component of every atom). The mean
    predictor predicts the mean of these targets (``ratio`` = its MAE / the model's).
    """
    out: dict[str, dict[str, float]] = {}
    for key in result["predictions"]:
        if key not in result["targets"]:
            continue
        total = result["targets"][key].numel()
        target, pred = _pairs(result, key)
        if target.size == 0:
            continue
        err = pred - target
        mae = float(np.abs(err).mean())
        base = float(np.abs(target - target.mean()).mean())
        ss = float(((target - target.mean()) ** 2).sum())
        out[key] = {
            "count": int(target.size),
            "skipped": int(total - target.size),
            "mae": mae,
            "rmse": float(np.sqrt((err**2).mean())),
            "r2": float(1.0 - (err**2).sum() / ss) if ss > 0 else float("nan"),
            "mean_predictor_mae": base,
            "ratio": base / mae if mae > 0 else float("inf"),
        }
    return out


def write_metrics(metrics: dict[str, Any], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """``{"metrics": {key: {...}}, ...extra}`` as JSON (non-finite numbers as ``null``)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean({"metrics": metrics, **(extra or {})}), indent=2) + "\n", encoding="utf-8")
    return path


def write_inference_data(result: dict[str, Any], path: str | Path) -> Path:
    """Targets and predictions per key in the layout of the Open MatSciML Toolkit's ``inference_data.json``.

    ``{key: {"name": key, "predictions": [...], "targets": [...]}}`` for each key with
    targets, in dataset order (per-atom keys: one ``[x, y, z]`` per atom); a missing or
    non-finite target is ``null``.
    """

    def plain(values: torch.Tensor) -> list:
        return [
            [None if not math.isfinite(x) else x for x in row] if isinstance(row, list) else
            (None if not math.isfinite(row) else row)
            for row in values.double().tolist()
        ]  # fmt: skip

    data = {
        key: {"name": key, "predictions": plain(result["predictions"][key]), "targets": plain(result["targets"][key])}
        for key in result["predictions"]
        if key in result["targets"]
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return path


def plot_parity(result: dict[str, Any], key: str, metrics: dict[str, float], path: str | Path, title: str = "") -> Path:
    """Parity plot of ``key``: prediction against target, the line ``y = x``, and the metrics in a box."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    target, pred = _pairs(result, key)
    fig, ax = plt.subplots(figsize=(5.0, 5.0), dpi=120)
    low = float(min(target.min(), pred.min()))
    high = float(max(target.max(), pred.max()))
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", lw=1.0, ls="--", label="y = x")
    ax.scatter(target, pred, s=10 if target.size < 2000 else 3, alpha=0.6, color="tab:blue", edgecolors="none")
    ax.axhline(float(target.mean()), color="tab:orange", lw=1.0, label="mean predictor")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"target {key}")
    ax.set_ylabel(f"predicted {key}")
    text = (
        f"n = {metrics['count']}\nMAE = {metrics['mae']:.4g}\nRMSE = {metrics['rmse']:.4g}\n"
        f"R$^2$ = {metrics['r2']:.3f}\nmean-predictor MAE = {metrics['mean_predictor_mae']:.4g}"
    )
    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=8, bbox={"fc": "white", "alpha": 0.8})
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"Parity: {key}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_all(
    result: dict[str, Any], metrics: dict[str, dict[str, float]], folder: str | Path, keys: Sequence[str] | None = None
) -> dict[str, Path]:
    """``parity_<key>.png`` in ``folder`` for each key with metrics."""
    folder = Path(folder)
    return {
        key: plot_parity(result, key, metrics[key], folder / f"parity_{key}.png")
        for key in (keys if keys is not None else metrics)
        if key in metrics
    }
