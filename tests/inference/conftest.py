"""Small trained runs shared by the inference tests: a force model on the devset, a band-gap model on OQMD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_dedented
from inference_runs import ENCODER, REAL_DATA, TRAINER, experiment, run


@pytest.fixture(scope="session")
def config_root(tmp_path_factory) -> Path:
    """models/{forces,bandgap}.yaml, datasets/{devset,oqmd}.yaml, trainer.yaml, experiments/."""
    root = tmp_path_factory.mktemp("inference_configs")
    # the envelope at the graph's cutoff keeps energies smooth as neighbours come and go (MD)
    write_dedented(
        root / "models" / "forces.yaml",
        ENCODER.replace("ENVELOPE", "  cutoff: 3.3").replace("CUTOFF", "3.3").replace("ADAPTIVE", "false"),
    )
    write_dedented(
        root / "models" / "bandgap.yaml",
        ENCODER.replace("ENVELOPE\n", "").replace("CUTOFF", "5.0").replace("ADAPTIVE", "true"),
    )
    write_dedented(
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
    write_dedented(
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
    write_dedented(root / "trainer.yaml", TRAINER.replace("EPOCHS", "2").replace("DECAY", "0.9"))
    write_dedented(root / "trainer_short.yaml", TRAINER.replace("EPOCHS", "1").replace("DECAY", "0.9"))
    return root


@pytest.fixture(scope="session")
def force_run(config_root, tmp_path_factory):
    """A ForceRegressionTask (energy, forces) trained 2 epochs on 36 devset structures with EMA."""
    torch.set_num_threads(1)
    exp = experiment(config_root, "forces", "forces", "devset", "ForceRegressionTask", ["energy", "forces"])
    return run(config_root, exp, tmp_path_factory.mktemp("runs") / "forces")


@pytest.fixture(scope="session")
def band_gap_run(config_root, tmp_path_factory):
    """A ScalarRegressionTask on OQMD band gaps (the NaN record dropped for training), one epoch."""
    torch.set_num_threads(1)
    exp = experiment(config_root, "bandgap", "bandgap", "oqmd", "ScalarRegressionTask", ["band_gap"])
    return run(config_root, exp, tmp_path_factory.mktemp("runs") / "bandgap", "trainer_short.yaml")
