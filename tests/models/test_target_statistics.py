"""Automatic target statistics: per-element reference energies, scales, checkpoints, learning."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from matsciml.lightning import MatSciMLDataModule
from matsciml.models.base import ForceRegressionTask, ScalarRegressionTask
from matsciml.models.tasks.energy_scale import energy_settings
from matsciml.models.tasks.statistics import StatisticsAccumulator, fit_element_energies, target_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIPS = Path(__file__).resolve().parents[1] / "data" / "lips_devset.extxyz"
#: Steps of the learning test and the factor its force loss must fall by.
STEPS = 80
FORCE_LOSS_FACTOR = 2.0
#: Untrained force RMS over the data's (normalised) that the magnitude test accepts.
UNTRAINED_FORCE_FLOOR = 0.1


def _toy(seed: int = 0, rank_deficient: bool = False) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Structures of H, C, O with energies = composition @ E0 + noise, as samples and arrays."""
    rng = np.random.default_rng(seed)
    elements = np.array([1, 6, 8])
    e0 = np.array([-3.4, -9.1, -5.2])
    samples, counts, energies = [], [], []
    for _ in range(40):
        n = rng.integers(1, 6, size=3) if not rank_deficient else np.array([2, 1, 3])
        numbers = np.repeat(elements, n)
        energy = float(n @ e0 + rng.normal(scale=0.3))
        samples.append({"atomic_numbers": torch.tensor(numbers), "targets": {"energy": energy}})
        counts.append(n)
        energies.append(energy)
    return samples, np.array(counts, dtype=float), np.array(energies)


def test_element_energies_equal_a_hand_least_squares_solution():
    samples, counts, energies = _toy()
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    np.testing.assert_allclose(fit_element_energies(counts, energies), solution, rtol=1e-10, atol=1e-10)

    acc = StatisticsAccumulator(["energy"], extensive=["energy"])
    for sample in samples:
        acc.add(sample)
    stats = acc.result()["energy"]
    fitted = np.array([stats["element_energies"][z] for z in ("1", "6", "8")])
    np.testing.assert_allclose(fitted, solution, rtol=1e-9, atol=1e-9)
    assert abs(fitted - np.array([-3.4, -9.1, -5.2])).max() < 0.2  # close to the generating E0s
    residual = energies - counts @ solution
    np.testing.assert_allclose(stats["residual_std"], np.sqrt(np.mean(residual**2)), rtol=1e-8)
    np.testing.assert_allclose(stats["residual_per_atom_std"], np.sqrt(np.mean(residual**2 / counts.sum(1))), rtol=1e-8)
    np.testing.assert_allclose(stats["mean"], energies.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], energies.std(), rtol=1e-10)


def test_one_composition_gives_the_minimum_norm_solution():
    samples, counts, energies = _toy(rank_deficient=True)
    acc = StatisticsAccumulator(["energy"], extensive=["energy"])
    for sample in samples:
        acc.add(sample)
    stats = acc.result()["energy"]
    fitted = np.array([stats["element_energies"][z] for z in ("1", "6", "8")])
    np.testing.assert_allclose(fitted, np.linalg.pinv(counts) @ energies, rtol=1e-8)
    np.testing.assert_allclose(stats["residual_std"], energies.std(), rtol=1e-6)  # only the mean is explained


def test_lips_statistics_match_ase_and_skip_transforms():
    dm = MatSciMLDataModule(
        "StructureDataset", train_path=LIPS, batch_size=4, val_split=0.2, seed=0, target_keys=["energy", "forces"]
    )
    dm.setup()
    train = dm.datasets["train"]
    stats = target_statistics(train, ["energy", "forces"], extensive=["energy"], progress=False)
    frames = ase.io.read(LIPS, index=":")
    chosen = [frames[i] for i in train.indices]
    energies = np.array([a.get_potential_energy() for a in chosen])
    forces = np.concatenate([a.get_forces().ravel() for a in chosen])
    np.testing.assert_allclose(stats["energy"]["mean"], energies.mean(), rtol=1e-9)
    np.testing.assert_allclose(stats["energy"]["std"], energies.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["forces"]["rms"], np.sqrt(np.mean(forces**2)), rtol=1e-6)
    np.testing.assert_allclose(stats["energy"]["residual_std"], energies.std(), rtol=1e-4)
    assert target_statistics(train, ["energy", "forces"], extensive=["energy"], progress=False) == stats  # cached


def test_settings_hand_set_values_win():
    stats = {
        "energy": {"mean": -10.0, "std": 2.0, "element_energies": {"1": -1.0}, "residual_std": 0.5},
        "forces": {"rms": 0.3},
    }
    auto = energy_settings(None, stats)
    assert auto["scale"] == 0.3 and auto["element_energies"] == {1: -1.0}
    assert auto["loss_scales"] == {"energy": 0.5, "forces": 0.3, "stress": 0.3}
    hand = energy_settings({"mean": -7.0, "std": 4.0}, stats)
    assert hand == {
        "scale": 4.0,
        "energy_mean": -7.0,
        "element_energies": {},
        "loss_scales": dict.fromkeys(("energy", "forces", "stress"), 4.0),
    }


def _lips_module(n: int = 12) -> MatSciMLDataModule:
    from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

    transforms = [
        PeriodicPropertiesTransform(cutoff_radius=4.0, adaptive_cutoff=True),
        PointCloudToGraphTransform("pyg"),
    ]
    dm = MatSciMLDataModule(
        "StructureDataset",
        train_path=LIPS,
        batch_size=2,
        val_split=0.25,
        seed=0,
        dset_kwargs={"transforms": transforms},
        target_keys=["energy", "forces"],
    )
    dm.setup()
    train = dm.datasets["train"]
    dm._datasets = {"train": torch.utils.data.Subset(train, list(range(n))), "val": dm.datasets["val"]}
    return dm


def _egnn(**kwargs) -> ForceRegressionTask:
    encoder = {
        "embed_in_dim": 16, "embed_hidden_dim": 16, "embed_out_dim": 16, "embed_depth": 2, "embed_feat_dims": [16],
        "embed_message_dims": [16, 16], "embed_position_dims": [], "embed_edge_attributes_dim": 0,
        "embed_activation": "silu", "embed_residual": True, "embed_normalize": True, "embed_tanh": True,
        "embed_activate_last": False, "embed_k_linears": 1, "embed_use_attention": False,
        "embed_attention_norm": "sigmoid", "readout": "sum", "node_projection_depth": 1,
        "node_projection_hidden_dim": 16, "node_projection_activation": "silu", "prediction_depth": 1,
        "prediction_hidden_dim": 16, "prediction_out_dim": 1, "prediction_activation": "silu",
        "cutoff": 4.0, "num_radial_basis": 8,
    }  # fmt: skip
    return ForceRegressionTask(
        encoder_class="PLEGNNBackbone", encoder_kwargs=encoder, output_kwargs={"hidden_dim": 16}, **kwargs
    )


def test_statistics_are_stored_in_the_checkpoint_and_predictions_stay_in_data_units(tmp_path):
    torch.manual_seed(0)
    dm = _lips_module(n=6)
    task = _egnn(lr=1e-3)
    trainer = Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    stats = task.hparams["target_stats"]
    assert set(stats) == {"energy", "forces"} and set(stats["energy"]["element_energies"]) == {"3", "15", "16"}
    assert float(task.energy_scale.scale) == pytest.approx(stats["forces"]["rms"])
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["target_stats"] == stats
    reloaded = ForceRegressionTask.load_from_checkpoint(path)
    batch = next(iter(dm.val_dataloader()))
    task.eval()
    expected, got = task(batch), reloaded(batch)
    torch.testing.assert_close(got["energy"], expected["energy"])
    torch.testing.assert_close(got["forces"], expected["forces"])
    # data units: the energy is of the order of the DFT energies, not of normalised residuals
    assert abs(float(got["energy"].mean()) - float(batch["targets"]["energy"].mean())) < 50.0


def test_scalar_task_normalises_a_target_without_normalize_kwargs():
    dm = MatSciMLDataModule(
        "StructureDataset", train_path=LIPS, batch_size=4, val_split=0.2, seed=0, target_keys=["energy"]
    )
    dm.setup()
    task = ScalarRegressionTask(encoder_class="PLEGNNBackbone", encoder_kwargs=_egnn().hparams["encoder_kwargs"],
                                task_keys=["energy"])  # fmt: skip
    stats = target_statistics(dm.datasets["train"], ["energy"], progress=False)
    task.set_target_stats(stats)
    assert task.normalizer.mean("energy") == pytest.approx(stats["energy"]["mean"])
    assert task.normalizer.std("energy") == pytest.approx(stats["energy"]["std"])
    hand = ScalarRegressionTask(encoder_class="PLEGNNBackbone", encoder_kwargs=_egnn().hparams["encoder_kwargs"],
                                task_keys=["energy"], normalize_kwargs={"energy_mean": 1.0, "energy_std": 2.0})  # fmt: skip
    hand.set_target_stats(stats)
    assert (hand.normalizer.mean("energy"), hand.normalizer.std("energy")) == (1.0, 2.0)


@pytest.mark.xfail(
    strict=True,
    reason="known gap: untrained encoders see geometry weakly; this EGNN's force RMS is about 3e-4 of the "
    "data's on LiPS (the E3NN encoder's about 1e-2): the output scale is not yet initialised from the data",
)
def test_untrained_forces_are_of_the_order_of_the_normalised_data():
    """After normalisation the data's forces have RMS 1; an untrained model's should be within 10x of it."""
    torch.manual_seed(0)
    dm = _lips_module(n=4)
    task = _egnn()
    task.set_target_stats(target_statistics(dm.datasets["train"], task._statistics_keys(), ["energy"], progress=False))
    batch = next(iter(dm.train_dataloader()))
    _, normalised, _, _ = task._predict(batch)
    data_rms = float((batch["targets"]["forces"] / task.energy_scale.loss_scales["forces"]).pow(2).mean().sqrt())
    model_rms = float(normalised["forces"].pow(2).mean().sqrt())
    assert data_rms == pytest.approx(1.0, rel=0.3)
    assert UNTRAINED_FORCE_FLOOR * data_rms < model_rms < 10 * data_rms


@pytest.mark.slow
def test_force_loss_falls_within_a_fixed_number_of_steps():
    """Seeded: a small EGNN on 32 devset alloys cuts its normalised force loss by FORCE_LOSS_FACTOR in STEPS steps."""
    from matsciml.datasets.collate import collate_samples
    from matsciml.datasets.structure_dataset import StructureDataset
    from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

    torch.manual_seed(0)
    transforms = [
        PeriodicPropertiesTransform(cutoff_radius=3.3, adaptive_cutoff=True),
        PointCloudToGraphTransform("pyg"),
    ]
    dataset = StructureDataset.from_devset(n=32, transforms=transforms, target_keys=["energy", "forces"])
    task = _egnn(lr=5e-3, task_loss_scaling={"energy": 1.0, "forces": 100.0})
    task.encoder = _egnn().encoder.__class__(**{**task.hparams["encoder_kwargs"], "cutoff": 3.3})
    task.set_target_stats(target_statistics(dataset, ["energy", "forces"], ["energy"], progress=False))
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_samples))
    optimizer = torch.optim.AdamW(task.parameters(), lr=task.lr)
    history = []
    for step in range(STEPS):
        result = task.compute_losses(batches[step % len(batches)])
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        history.append(float(result["per_key"]["forces"]))
    start, end = np.mean(history[:4]), np.mean(history[-4:])
    assert start > 0.5  # the untrained force loss is of order one (normalised by the force RMS)
    assert end < start / FORCE_LOSS_FACTOR, (start, end, history)


def test_force_yardstick_uses_the_data_module_split():
    """benchmarks/force_yardstick.py recomputes the LiPS split without matsciml; it must be the data module's."""
    import importlib.util

    from matsciml.lightning.datamodule import fractional_split

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "force_yardstick.py"
    spec = importlib.util.spec_from_file_location("force_yardstick", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = fractional_split(200, 0.2, 0.0, 0)
    got = module.lips_split(200, 0.2, 0)
    assert got == {"train": expected["train"], "val": expected["val"]}
