"""Small trained runs shared by the inference tests: a force model on the devset, a band-gap model on OQMD."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="session")
def config_root(tmp_path_factory) -> Path:
    """models/{forces,bandgap}.yaml, datasets/{devset,oqmd}.yaml, trainer.yaml, experiments/."""
    root = tmp_path_factory.mktemp("inference_configs")
    # the envelope at the graph's cutoff keeps energies smooth as neighbours come and go (MD)
    write(
        root / "models" / "forces.yaml",
        ENCODER.replace("ENVELOPE", "  cutoff: 3.3")
        .replace("CUTOFF", "3.3")
        .replace("ADAPTIVE", "false"),
    )
    write(
        root / "models" / "bandgap.yaml",
        ENCODER.replace("ENVELOPE\n", "").replace("CUTOFF", "5.0").replace("ADAPTIVE", "true"),
    )
    write(
        root / "datasets" / "devset.yaml",
        """\
        dataset: EMTAlloyDataset
        debug:
          batch_size: 8
          val_split: 0.25
          dset_kwargs: {n: 48}
        target_keys: [energy, energy_per_atom, forces]
        task_args:
          normalize_kwargs: {energy_mean: 0.0, energy_std: 0.3, energy_per_atom_mean: 0.03, energy_per_atom_std: 0.05}
        """,
    )
    write(
        root / "datasets" / "oqmd.yaml",
        f"""\
        dataset: StructureDataset
        debug:
          train_path: {REAL_DATA / "oqmd_devset.extxyz"}
          dset_kwargs: {{on_invalid: drop}}
          batch_size: 16
          val_split: 0.2
        target_keys: [band_gap]
        task_args:
          normalize_kwargs: {{band_gap_mean: 0.265, band_gap_std: 0.777}}
        """,
    )
    write(root / "trainer.yaml", TRAINER.replace("EPOCHS", "4").replace("DECAY", "0.9"))
    write(root / "trainer_short.yaml", TRAINER.replace("EPOCHS", "1").replace("DECAY", "0.9"))
    return root


def experiment(root: Path, name: str, model: str, dataset: str, task: str, targets: list[str], extra: str = "") -> Path:
    body = f"model: {model}\ndataset:\n  {dataset}:\n    - task: {task}\n      targets: {targets}\nseed: 0\n"
    return write(root / "experiments" / f"{name}.yaml", body + textwrap.dedent(extra))


def run(root: Path, exp: Path, run_dir: Path, trainer: str = "trainer.yaml", *more: str):
    args = ["-e", str(exp), "-t", str(root / trainer), "-m", str(root / "models"), "-d", str(root / "datasets")]
    return main([*args, "--debug", "--run_dir", str(run_dir), *more])


@pytest.fixture(scope="session")
def force_run(config_root, tmp_path_factory):
    """A ForceRegressionTask (energy, forces) trained 4 epochs on 36 devset structures with EMA."""
    torch.set_num_threads(1)
    exp = experiment(config_root, "forces", "forces", "devset", "ForceRegressionTask", ["energy", "forces"])
    return run(config_root, exp, tmp_path_factory.mktemp("runs") / "forces")


@pytest.fixture(scope="session")
def band_gap_run(config_root, tmp_path_factory):
    """A ScalarRegressionTask on OQMD band gaps (the NaN record dropped for training), one epoch."""
    torch.set_num_threads(1)
    exp = experiment(config_root, "bandgap", "bandgap", "oqmd", "ScalarRegressionTask", ["band_gap"])
    return run(config_root, exp, tmp_path_factory.mktemp("runs") / "bandgap", "trainer_short.yaml")
