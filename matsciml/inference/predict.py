"""Run a checkpoint on a structure file or dataset: predictions, metrics and parity plots.

:func:`predict` (and the command ``matsciml-predict CHECKPOINT DATA [-o OUT]``) rebuilds
the task and its data transforms from the checkpoint (:func:`~matsciml.inference.load_task`;
EMA weights when the run used the EMA callback), reads ``DATA`` with
:class:`~matsciml.datasets.StructureDataset` (extended XYZ, ASE database or trajectory,
pymatgen JSON, CIF file or folder, LMDB), predicts every record in batches with
``trainer.predict`` and :class:`~matsciml.lightning.writers.InferenceWriter` (progress
bar), and writes to the output folder:

``predictions.csv``
    one row per structure in file order: ``index, id, natoms``, ``<key>_pred`` and, where
    the file has the target, ``<key>_target`` (empty when missing or not finite).
``predictions.extxyz``
    every structure with ``info["<key>_pred"]``/``["<key>_target"]`` and, for force
    models, ``arrays["forces_pred"]`` (and ``["forces_target"]``) per atom.
``metrics.json``
    per target key: count, MAE, RMSE, R², the mean predictor's MAE and their ratio.
``parity_<key>.png``
    prediction against target for each key with targets.
``inference_data.json``
    targets and predictions per key, in the layout of the Open MatSciML Toolkit's
    ``ParityInferenceTask`` (``null`` for a missing target).
``predictions.pt``, ``results_rank0.pt``
    the raw merged predictions (see :mod:`matsciml.lightning.writers`).

Records whose target is missing or NaN are predicted all the same; only the metrics and
plots leave them out.

Example::

    from matsciml.inference import predict

    out = predict("runs/oqmd/checkpoints/last.ckpt", "tests/data/oqmd_devset.extxyz", "oqmd_predictions")
    print(out.metrics["band_gap"]["mae"], out.plots["band_gap"])
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matsciml.common.errors import ConfigError, DataError

__all__ = ["PredictResult", "predict"]


@dataclass
class PredictResult:
    """What :func:`predict` wrote.

    Attributes
    ----------
    output_dir
        The output folder.
    csv, extxyz, metrics_json
        The files.
    metrics
        ``{key: {"count", "mae", "rmse", "r2", "mean_predictor_mae", "ratio", "skipped"}}``.
    plots
        ``{key: parity plot path}``.
    predictions
        The merged result (``index``, ``ids``, ``natoms``, ``predictions``, ``targets``).
    """

    output_dir: Path
    csv: Path
    extxyz: Path
    metrics_json: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)


def _atoms_of(dataset: Any):
    from ase import Atoms

    def structure(index: int) -> Atoms:
        sample = dataset.raw(index)
        return Atoms(
            numbers=sample["atomic_numbers"].numpy(),
            positions=sample["pos"].double().numpy(),
            cell=sample["cell"].double().reshape(3, 3).numpy(),
            pbc=sample["pbc"].numpy(),
        )

    return structure


def _keep_task_keys(result: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Targets of the predicted keys only (a file may carry many more)."""
    result = dict(result)
    result["targets"] = {k: v for k, v in result["targets"].items() if k in keys}
    return result


def predict(
    checkpoint: str | Path,
    data: str | Path,
    output_dir: str | Path | None = None,
    batch_size: int = 16,
    accelerator: str = "auto",
    num_workers: int = 0,
    task_class: str | type | None = None,
    transforms: Any = None,
    progress: bool = True,
    plots: bool = True,
) -> PredictResult:
    """Predict every structure of ``data`` with the task of ``checkpoint`` and write the files above.

    Parameters
    ----------
    checkpoint
        A task checkpoint (read with ``weights_only=True``).
    data
        A file or folder :class:`~matsciml.datasets.StructureDataset` reads.
    output_dir
        Output folder (created); default ``<data stem>_predictions`` in the working folder.
    batch_size
        Structures per batch (default 16).
    accelerator
        Lightning accelerator: ``"auto"`` (default), ``"cpu"``, ``"gpu"``.
    num_workers
        Data loader workers (default 0).
    task_class, transforms
        Instead of what the checkpoint records (see :func:`~matsciml.inference.load_task`).
    progress
        Show Lightning's progress bar (default ``True``).
    plots
        Write the parity plots (default ``True``).

    Returns
    -------
    PredictResult

    Raises
    ------
    ConfigError
        A missing, truncated or unsafe checkpoint, no recorded transforms, a bad argument.
    DataError
        ``data`` is missing or unreadable (the message names the file and record).
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from matsciml.datasets.collate import collate_samples
    from matsciml.datasets.structure_dataset import StructureDataset
    from matsciml.inference.checkpoint import load_task
    from matsciml.inference.outputs import (
        parity_metrics,
        plot_all,
        write_csv,
        write_extxyz,
        write_inference_data,
        write_metrics,
    )
    from matsciml.lightning.writers import InferenceWriter

    if int(batch_size) < 1:
        raise ConfigError(f"batch_size: {batch_size} must be at least 1")
    loaded = load_task(checkpoint, task_class=task_class, transforms=transforms, where="checkpoint")
    if not loaded.transforms:
        raise ConfigError(
            f"checkpoint: {checkpoint} records no data transforms and no config.yaml is beside it; pass transforms"
        )
    data = Path(data)
    if not data.exists():
        raise DataError(f"data: {data} does not exist; give a structure file (extxyz, db, json, cif, lmdb) or folder")
    dataset = StructureDataset(data, transforms=loaded.transforms)
    if len(dataset) == 0:
        raise DataError(f"data: {data} holds no structures")
    out = Path(output_dir) if output_dir is not None else Path.cwd() / f"{data.stem}_predictions"
    out.mkdir(parents=True, exist_ok=True)

    loader = DataLoader(
        dataset, batch_size=int(batch_size), shuffle=False, num_workers=int(num_workers), collate_fn=collate_samples
    )
    writer = InferenceWriter(out)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[writer],
        default_root_dir=str(out),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        trainer.predict(loaded.task, dataloaders=loader, return_predictions=False)
    result = writer.result
    keys = list(result["predictions"])
    result = _keep_task_keys(result, keys)
    metrics = parity_metrics(result)
    csv_path = write_csv(result, out / "predictions.csv")
    xyz_path = write_extxyz(result, _atoms_of(dataset), out / "predictions.extxyz")
    extra = {"checkpoint": str(checkpoint), "data": str(data), "structures": len(result["ids"])}
    metrics_path = write_metrics(metrics, out / "metrics.json", extra)
    write_inference_data(result, out / "inference_data.json")
    plot_paths = plot_all(result, metrics, out) if plots else {}
    return PredictResult(out, csv_path, xyz_path, metrics_path, metrics, plot_paths, result)
