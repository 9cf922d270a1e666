"""Two-process DDP prediction (gloo, CPU) with both prediction writers, started by ``test_writers.py``.

Usage: ``python writers_ddp_worker.py DATA OUT_DIR``. Lightning's ``ddp`` strategy starts the second
process by running this script again. Rank 0 also saves the task's weights (``weights.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from matsciml.datasets.collate import collate_samples
from matsciml.datasets.structure_dataset import StructureDataset
from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform
from matsciml.lightning.writers import InferenceWriter, LeaderboardWriter
from matsciml.models.tasks import ForceRegressionTask

ENCODER = {
    "class_path": "matsciml.models.PLEGNNBackbone",
    "init_args": {
        "embed_in_dim": 8, "embed_hidden_dim": 8, "embed_out_dim": 8, "embed_depth": 1, "embed_feat_dims": [8],
        "embed_message_dims": [8], "embed_position_dims": [], "embed_edge_attributes_dim": 0,
        "embed_activation": "silu", "embed_residual": True, "embed_normalize": True, "embed_tanh": True,
        "embed_activate_last": False, "embed_k_linears": 1, "embed_use_attention": False,
        "embed_attention_norm": "sigmoid", "readout": "mean", "node_projection_depth": 1,
        "node_projection_hidden_dim": 8, "node_projection_activation": "silu", "prediction_depth": 1,
        "prediction_hidden_dim": 8, "prediction_out_dim": 8, "prediction_activation": "silu",
    },
}  # fmt: skip


def make_task() -> ForceRegressionTask:
    torch.manual_seed(0)
    return ForceRegressionTask(encoder_class=ENCODER, output_kwargs={"hidden_dim": 8})


def make_dataset(path: str | Path) -> StructureDataset:
    transforms = [PeriodicPropertiesTransform(cutoff_radius=3.3, adaptive_cutoff=True), PointCloudToGraphTransform()]
    return StructureDataset(path, transforms=transforms)


def main(data: Path, out: Path) -> None:
    torch.set_num_threads(1)
    task = make_task()
    loader = DataLoader(make_dataset(data), batch_size=2, shuffle=False, collate_fn=collate_samples)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[InferenceWriter(out / "inference"), LeaderboardWriter(out / "leaderboard")],
    )
    trainer.predict(task, dataloaders=loader, return_predictions=False)
    if trainer.is_global_zero:
        torch.save(task.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
