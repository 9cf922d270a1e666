"""MatSciMLCalculator on a force model trained on the devset: derivatives, MD, agreement with trainer.predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from matsciml.common.errors import ConfigError
from matsciml.datasets.devset import generate_structures
from matsciml.interfaces.ase import MatSciMLCalculator


@pytest.fixture(scope="module")
def checkpoint(force_run) -> str:
    return force_run.last_checkpoint


@pytest.fixture(scope="module")
def cell32():
    """The first 32-atom cell of the devset (its generator is deterministic)."""
    return next(a for a in generate_structures(60) if len(a) == 32)


def test_forces_and_stress_equal_central_differences_float64(checkpoint, cell32):
    calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64")
    atoms = cell32.copy()
    atoms.calc = calc
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False)
    assert np.abs(forces).max() > 1e-5  # not a flat model
    h = 1e-4
    rng = np.random.default_rng(0)
    for i in rng.choice(len(atoms), size=6, replace=False):
        for d in range(3):
            moved = atoms.copy()
            moved.calc = calc
            moved.positions[i, d] += h
            e_plus = moved.get_potential_energy()
            moved.positions[i, d] -= 2 * h
            e_minus = moved.get_potential_energy()
            # well inside 1e-4 eV/A: float64 central differences are good to ~1e-9 here
            assert forces[i, d] == pytest.approx(-(e_plus - e_minus) / (2 * h), rel=1e-4, abs=1e-8)
    # stress = (1/V) dE/d(strain), ASE's sign
    volume = atoms.get_volume()
    for a, b in [(0, 0), (1, 2), (0, 1)]:
        values = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.calc = calc
            eps = np.zeros((3, 3))
            eps[a, b] += 0.5 * sign * h
            eps[b, a] += 0.5 * sign * h
            strained.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            values.append(strained.get_potential_energy())
        assert stress[a, b] == pytest.approx((values[0] - values[1]) / (2 * h) / volume, rel=1e-4, abs=1e-9)


def _validation_energy_mae_per_atom(force_run) -> float:
    """The model's MAE of energy per atom on its own validation split (EMA weights, task forward)."""
    task = force_run.task
    dm = force_run.datamodule
    errors = []
    with torch.no_grad():
        for batch in dm.eval_dataloader("val"):
            pred = task(batch)["energy"]
            errors.append(((pred - batch["targets"]["energy"]).abs() / batch["natoms"]).detach())
    return float(torch.cat(errors).mean())


@pytest.mark.slow
def test_nve_energy_drift_below_validation_mae_per_atom(force_run, checkpoint, cell32):
    mae_per_atom = _validation_energy_mae_per_atom(force_run)
    atoms = cell32.copy()
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    totals = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dyn.run(200)
    totals = np.array(totals)
    drift = float(np.abs(totals - totals[0]).max())
    moved = float(np.abs(atoms.get_kinetic_energy() - 1.5 * len(atoms) * units.kB * 300))
    assert len(totals) == 201
    assert moved < 10.0  # the run stayed physical
    assert drift < mae_per_atom, (drift, mae_per_atom)


def test_calculator_energies_equal_trainer_predict(force_run, checkpoint, tmp_path):
    import lightning.pytorch as pl

    from matsciml.inference import load_task
    from matsciml.lightning.writers import InferenceWriter

    dm = force_run.datamodule
    val = dm.datasets["val"]
    loaded = load_task(checkpoint)
    writer = InferenceWriter(tmp_path / "pred")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(loaded.task, dataloaders=dm.eval_dataloader("val", batch_size=5), return_predictions=False)
    merged = torch.load(writer.merged_path, weights_only=True)
    calc = MatSciMLCalculator.from_checkpoint(checkpoint)
    import ase.io

    base = val.dataset
    frames = ase.io.read(base.path, ":")
    offsets = np.concatenate([[0], np.cumsum(merged["natoms"].numpy())])
    for row, index in enumerate(merged["index"].tolist()):
        atoms = frames[val.indices[index]]
        atoms.calc = calc
        assert merged["ids"][row] == atoms.info["structure_id"]
        assert atoms.get_potential_energy() == pytest.approx(float(merged["predictions"]["energy"][row]), abs=2e-5)
        np.testing.assert_allclose(
            atoms.get_forces(), merged["predictions"]["forces"][offsets[row] : offsets[row + 1]].numpy(), atol=2e-5
        )


def test_checkpoint_weights_are_the_ema_weights(force_run, checkpoint):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    raw = ckpt["callbacks"]["ExponentialMovingAverageCallback"]["raw"]
    calc = MatSciMLCalculator.from_pretrained_force_regression(checkpoint)
    own = calc.task_module.state_dict()
    name = next(k for k in ckpt["state_dict"] if k.startswith("encoder.") and ckpt["state_dict"][k].is_floating_point())
    assert torch.equal(own[name], ckpt["state_dict"][name])
    assert not torch.equal(ckpt["state_dict"][name], raw[name])  # EMA and raw weights differ after training


def test_scalar_properties_and_errors(force_run, checkpoint, cell32, tmp_path):
    from matsciml.inference import load_task

    task = load_task(checkpoint).task
    with pytest.raises(ConfigError, match="no data transforms"):
        MatSciMLCalculator(task, transforms=[])
    with pytest.raises(ConfigError, match="float64"):
        MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float16")
    with pytest.raises(ConfigError, match="does not exist"):
        MatSciMLCalculator.from_checkpoint(tmp_path / "missing.ckpt")
    calc = MatSciMLCalculator(task)  # the transforms the checkpoint recorded
    atoms = cell32.copy()
    atoms.calc = calc
    assert set(calc.implemented_properties) >= {"energy", "forces", "stress"}
    assert atoms.get_potential_energy() == pytest.approx(calc.results["free_energy"])
