"""Configs and helpers of the small runs the inference tests train (see conftest.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from helpers import write_dedented

from matsciml.runner.cli import main

REAL_DATA = Path(__file__).resolve().parents[1] / "data"

ENCODER = """\
encoder_class: {class_path: matsciml.models.PLEGNNBackbone}
encoder_kwargs:
  embed_in_dim: 16
  embed_hidden_dim: 16
  embed_out_dim: 16
  embed_depth: 2
  embed_feat_dims: [16]
  embed_message_dims: [16]
  embed_position_dims: []
  embed_edge_attributes_dim: 0
  embed_activation: silu
  embed_residual: true
  embed_normalize: true
  embed_tanh: true
  embed_activate_last: false
  embed_k_linears: 1
  embed_use_attention: false
  embed_attention_norm: sigmoid
  readout: mean
  node_projection_depth: 1
  node_projection_hidden_dim: 16
  node_projection_activation: silu
  prediction_depth: 1
  prediction_hidden_dim: 16
  prediction_out_dim: 16
  prediction_activation: silu
ENVELOPE
output_kwargs: {hidden_dim: 16, num_hidden: 1}
lr: 0.01
transforms:
  - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
    init_args: {cutoff_radius: CUTOFF, adaptive_cutoff: ADAPTIVE}
  - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
    init_args: {backend: pyg}
"""

TRAINER = """\
generic: {max_epochs: EPOCHS, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
debug: {accelerator: cpu}
callbacks:
  - class_path: matsciml.lightning.callbacks.ExponentialMovingAverageCallback
    init_args: {decay: DECAY}
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {save_last: true}
"""


def experiment(root: Path, name: str, model: str, dataset: str, task: str, targets: list[str], extra: str = "") -> Path:
    body = f"model: {model}\ndataset:\n  {dataset}:\n    - task: {task}\n      targets: {targets}\nseed: 0\n"
    return write_dedented(root / "experiments" / f"{name}.yaml", body + textwrap.dedent(extra))


def run(root: Path, exp: Path, run_dir: Path, trainer: str = "trainer.yaml", *more: str):
    args = ["-e", str(exp), "-t", str(root / trainer), "-m", str(root / "models"), "-d", str(root / "datasets")]
    return main([*args, "--debug", "--run_dir", str(run_dir), *more])
