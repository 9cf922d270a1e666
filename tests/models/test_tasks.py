"""Tests of the task modules: losses, normalisation, forces, metrics, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.neighborlist import neighbor_list
from helpers import TinyEncoder
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch_geometric.data import Batch, Data

from matsciml.common.errors import ConfigError, DataError
from matsciml.common.graph import edge_index, edge_vectors, get_graph, graph_index, num_graphs
from matsciml.models.base import BinaryClassificationTask, ForceRegressionTask, ScalarRegressionTask
from matsciml.models.embeddings import Embeddings
from matsciml.models.tasks import get_task_class
from matsciml.models.tasks.forces import energy_and_derivatives

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUTOFF = 4.0


# ----------------------------------------------------------------------------- helpers
def emt_structures(n: int, seed: int = 0) -> list[Atoms]:
    """Small rattled Cu/Au/Ni cells with EMT energy, forces and stress in ``info``/``arrays``."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6 + 0.05 * (k % 3)).repeat((1 + k % 2, 1, 1))
        symbols = atoms.get_chemical_symbols()
        symbols[0] = ("Cu", "Au", "Ni")[k % 3]
        atoms.set_chemical_symbols(symbols)
        atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["energy"] = atoms.get_potential_energy()
        atoms.arrays["forces_ref"] = atoms.get_forces()
        atoms.info["stress"] = atoms.get_stress(voigt=False)
        out.append(atoms)
    return out


def make_batch(structures: list[Atoms], extra: dict[str, list] | None = None, dtype=torch.float32) -> dict:
    """A batch in the schema layout from ASE atoms (neighbours by ASE's neighbor_list)."""
    data = []
    for atoms in structures:
        i, j, shifts = neighbor_list("ijS", atoms, CUTOFF)
        data.append(
            Data(
                pos=torch.tensor(atoms.positions, dtype=dtype),
                atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.long),
                edge_index=torch.tensor(np.stack([i, j]), dtype=torch.long),
                cell_shifts=torch.tensor(shifts, dtype=dtype),
                cell=torch.tensor(np.asarray(atoms.cell), dtype=dtype)[None],
                natoms=len(atoms),
            )
        )
    targets = {}
    if all("energy" in a.info for a in structures):
        targets["energy"] = torch.tensor([a.info["energy"] for a in structures], dtype=dtype)
        targets["forces"] = torch.tensor(np.concatenate([a.arrays["forces_ref"] for a in structures]), dtype=dtype)
        targets["stress"] = torch.tensor(np.stack([a.info["stress"] for a in structures]), dtype=dtype)
    for key, values in (extra or {}).items():
        targets[key] = torch.tensor(values, dtype=dtype)
    return {
        "graph": Batch.from_data_list(data),
        "targets": targets,
        "natoms": torch.tensor([len(a) for a in structures]),
        "ids": [f"s{k}" for k in range(len(structures))],
        "batch_size": len(structures),
    }


def as_loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    """A DataLoader that yields the given prebuilt batches."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)


def quiet_trainer(**kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


def encoder_path() -> str:
    return f"{TinyEncoder.__module__}.TinyEncoder"


# ----------------------------------------------------------------------------- scalar regression
def test_scalar_loss_equals_hand_computation():
    torch.manual_seed(0)
    structures = emt_structures(4)
    batch = make_batch(structures, extra={"a": [1.0, 2.0, 3.0, 5.0], "b": [0.5, float("nan"), -1.0, 2.0]})
    task = ScalarRegressionTask(
        encoder=TinyEncoder(),
        task_keys=["a", "b"],
        loss_func={"a": nn.MSELoss, "b": "torch.nn.L1Loss"},
        normalize_kwargs={"a_mean": 2.5, "a_std": 2.0, "b_mean": -0.5, "b_std": 0.25, "energy_mean": 7.0},
        task_loss_scaling={"a": 0.3, "b": 2.0},
        output_kwargs={"hidden_dim": 8},
    )
    out = task.compute_losses(batch)

    system = task.encoder(batch).system_embedding
    raw_a = task.output_heads["a"](system).squeeze(-1)
    raw_b = task.output_heads["b"](system).squeeze(-1)
    target_a = (batch["targets"]["a"] - 2.5) / 2.0
    target_b = (batch["targets"]["b"] - -0.5) / 0.25
    loss_a = ((raw_a - target_a) ** 2).mean()
    keep = torch.tensor([True, False, True, True])  # the NaN label is left out
    loss_b = (raw_b[keep] - target_b[keep]).abs().mean()
    torch.testing.assert_close(out["per_key"]["a"], loss_a)
    torch.testing.assert_close(out["per_key"]["b"], loss_b)
    torch.testing.assert_close(out["loss"], 0.3 * loss_a + 2.0 * loss_b)
    assert out["counts"] == {"a": 4, "b": 3}
    assert out["batch_size"] == 4
    # predictions and forward are in data units
    torch.testing.assert_close(out["predictions"]["a"], raw_a * 2.0 + 2.5)
    torch.testing.assert_close(task(batch)["b"], raw_b * 0.25 - 0.5)


def test_task_loss_scaling_is_read_at_each_call():
    structures = emt_structures(3)
    batch = make_batch(structures, extra={"a": [1.0, 2.0, 3.0], "b": [0.0, 1.0, 0.0]})
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["a", "b"], output_kwargs={"hidden_dim": 8})
    first = task.compute_losses(batch)
    task.task_loss_scaling["b"] = 0.0
    second = task.compute_losses(batch)
    torch.testing.assert_close(second["loss"], first["per_key"]["a"])


def test_metric_reduction_over_uneven_batches_equals_global_values():
    torch.manual_seed(1)
    structures = emt_structures(8)
    y = [0.1, -0.4, 2.0, 1.5, 0.7, -1.2, 0.3, 0.9]
    batches = [make_batch(structures[:3], {"y": y[:3]}), make_batch(structures[3:], {"y": y[3:]})]
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], normalize_kwargs={"y_mean": 0.5, "y_std": 2.0})
    (metrics,) = quiet_trainer().validate(task, dataloaders=as_loader(batches), verbose=False)

    with torch.no_grad():
        pred = torch.cat([task(b)["y"] for b in batches])
        losses = [task.compute_losses(b)["loss"] for b in batches]
    target = torch.tensor(y)
    mae = (pred - target).abs().mean()
    mse_normalised = (((pred - 0.5) / 2.0 - (target - 0.5) / 2.0) ** 2).mean()
    assert metrics["val_y_mae"] == pytest.approx(mae.item(), rel=1e-5)
    assert metrics["val_y"] == pytest.approx(mse_normalised.item(), rel=1e-5)
    weighted = (3 * losses[0] + 5 * losses[1]) / 8
    assert metrics["val_loss"] == pytest.approx(weighted.item(), rel=1e-5)
    assert metrics["val_total"] == pytest.approx(weighted.item(), rel=1e-5)
    # the mean of the two per-batch MAEs differs: the check above is not vacuous
    batch_maes = [(task(b)["y"] - b["targets"]["y"]).abs().mean() for b in batches]
    assert abs((batch_maes[0] + batch_maes[1]).item() / 2 - mae.item()) > 1e-4


def test_scalar_task_requires_and_checks_targets():
    with pytest.raises(ConfigError, match="task_keys is required"):
        ScalarRegressionTask(encoder=TinyEncoder())
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["band_gap"])
    batch = make_batch(emt_structures(2), extra={"y": [1.0, 2.0]})
    with pytest.raises(DataError, match="no target 'band_gap'.*'energy'"):
        task.compute_losses(batch)
    batch["targets"]["band_gap"] = torch.zeros(2, 3)
    with pytest.raises(DataError, match=r"shape \(2, 3\)"):
        task.compute_losses(batch)


def test_constructor_errors_are_clear():
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], weight_decy=0.1)
    with pytest.raises(ConfigError, match="needs an encoder"):
        ScalarRegressionTask(task_keys=["y"])
    with pytest.raises(ConfigError, match="input_dim is 32 but the encoder's embedding_dim is 16"):
        ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], output_kwargs={"input_dim": 32})
    with pytest.raises(ConfigError, match="did you mean 'hidden_dim'"):
        ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], output_kwargs={"hiden_dim": 32})
    with pytest.raises(ConfigError, match="not supported"):
        ForceRegressionTask(encoder=TinyEncoder(), task_keys=["energy", "dipole"])
    with pytest.raises(ConfigError, match="did you mean 'StepLR'"):
        ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], scheduler_kwargs={"StepLr": {"step_size": 1}})
    with pytest.raises(ConfigError, match="embedding_reduction_type"):
        ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], embedding_reduction_type="median")
    assert get_task_class("scalar_regression") is ScalarRegressionTask
    with pytest.raises(ConfigError, match="did you mean 'ScalarRegressionTask'"):
        get_task_class("ScalarRegresionTask")


@pytest.mark.parametrize(
    "spec",
    [
        {"StepLR": {"step_size": 2, "gamma": 0.5}},
        {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2, "gamma": 0.5}},
    ],
)
def test_scheduler_forms(spec):
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], lr=0.01, scheduler_kwargs=spec)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "epoch"
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_plateau_scheduler_monitors_val_loss():
    task = ScalarRegressionTask(
        encoder=TinyEncoder(), task_keys=["y"], scheduler_kwargs={"ReduceLROnPlateau": {"patience": 1}}
    )
    assert task.configure_optimizers()["lr_scheduler"]["monitor"] == "val_loss"


def test_pooling_when_encoder_gives_no_system_embedding():
    class PointsOnly(TinyEncoder):
        def forward(self, batch):
            return Embeddings(system_embedding=None, point_embedding=super().forward(batch).point_embedding)

    batch = make_batch(emt_structures(3), extra={"y": [0.0, 1.0, 2.0]})
    for reduction, fn in (("sum", torch.sum), ("max", torch.amax), ("mean", torch.mean)):
        task = ScalarRegressionTask(encoder=PointsOnly(), task_keys=["y"], embedding_reduction_type=reduction)
        points = task.encoder(batch).point_embedding
        index = batch["graph"].batch
        expected = torch.stack([fn(points[index == g], dim=0) for g in range(3)])
        torch.testing.assert_close(task._system_embedding(task.encoder(batch), batch), expected)


# ----------------------------------------------------------------------------- binary classification
def test_binary_accuracy_equals_hand_count():
    torch.manual_seed(3)
    structures = emt_structures(8, seed=3)
    labels = [1, 0, 1, 1, 0, 0, 1, 0]
    batches = [make_batch(structures[:3], {"stable": labels[:3]}), make_batch(structures[3:], {"stable": labels[3:]})]
    task = BinaryClassificationTask(encoder=TinyEncoder(), task_keys=["stable"])
    with torch.no_grad():
        probs = torch.cat([task(b)["stable"] for b in batches])
        logits = torch.log(probs / (1 - probs))
    assert bool(((probs > 0) & (probs < 1)).all())
    correct = sum(int((p > 0.5) == bool(t)) for p, t in zip(probs.tolist(), labels))
    bce = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float32))
    (metrics,) = quiet_trainer().validate(task, dataloaders=as_loader(batches), verbose=False)
    assert metrics["val_stable_accuracy"] == pytest.approx(correct / 8)
    assert metrics["val_stable"] == pytest.approx(bce.item(), rel=1e-4)
    predicted = quiet_trainer().predict(task, dataloaders=as_loader(batches))
    assert predicted[0]["ids"] == ["s0", "s1", "s2"]
    torch.testing.assert_close(torch.cat([p["stable"] for p in predicted]), probs)


# ----------------------------------------------------------------------------- forces
class TorchLennardJones(nn.Module):
    """Lennard-Jones energy per structure from graph edges (the oracle is ASE's calculator)."""

    def __init__(self, sigma: float = 2.3, epsilon: float = 0.4, rc: float = CUTOFF) -> None:
        super().__init__()
        self.sigma, self.epsilon, self.rc = sigma, epsilon, rc

    def forward(self, graph) -> torch.Tensor:
        r = edge_vectors(graph).norm(dim=-1)
        s6 = (self.sigma / r) ** 6
        e0 = 4 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
        pair = (4 * self.epsilon * (s6**2 - s6) - e0) * (r < self.rc)
        edge_graph = graph_index(graph)[edge_index(graph)[0]]
        return 0.5 * pair.new_zeros(num_graphs(graph)).index_add(0, edge_graph, pair)


def test_energy_and_derivatives_reproduce_ase_lennard_jones():
    structures = emt_structures(3, seed=5)
    batch = make_batch(structures, dtype=torch.float64)
    out = energy_and_derivatives(TorchLennardJones(), batch["graph"], forces=True, stress=True)
    for k, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=CUTOFF, smooth=False)
        assert out["energy"][k].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(out["stress"][k].numpy(), atoms.get_stress(voigt=False), atol=1e-9)
    ase_forces = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=CUTOFF, smooth=False)
        ase_forces.append(atoms.get_forces())
    np.testing.assert_allclose(out["forces"].numpy(), np.concatenate(ase_forces), atol=1e-9)


def _energy(task: ForceRegressionTask, batch: dict) -> torch.Tensor:
    return task(batch)["energy"]


def fd_force(task: ForceRegressionTask, batch: dict, atom: int, axis: int, h: float = 1e-5) -> torch.Tensor:
    """``-dE/dx`` of one coordinate (``E``: the batch's total energy) by central differences."""
    energies = []
    for sign in (1, -1):
        moved = dict(batch, graph=batch["graph"].clone())
        moved["graph"].pos[atom, axis] += sign * h
        with torch.no_grad():
            energies.append(_energy(task, moved).sum())
    return -(energies[0] - energies[1]) / (2 * h)


def fd_stress(task: ForceRegressionTask, batch: dict, i: int, j: int, h: float = 1e-5) -> torch.Tensor:
    """Stress ``(i, j)`` of every structure ``[B]``: ``dE/d(strain_ij) / volume`` by central differences.

    The strain is symmetric and moves positions and cells together (float64 batches).
    """
    pos, cell = batch["graph"].pos, batch["graph"].cell
    energies = []
    for sign in (1, -1):
        d = torch.zeros(3, 3, dtype=torch.float64)
        d[i, j] = sign * h
        deform = torch.eye(3, dtype=torch.float64) + 0.5 * (d + d.T)
        moved = dict(batch, graph=batch["graph"].clone())
        moved["graph"].pos = pos @ deform
        moved["graph"].cell = cell @ deform
        with torch.no_grad():
            energies.append(_energy(task, moved))
    return (energies[0] - energies[1]) / (2 * h) / torch.linalg.det(cell).abs()


def test_forces_and_stress_equal_finite_differences_float64():
    torch.manual_seed(4)
    structures = emt_structures(2, seed=4)
    task = ForceRegressionTask(
        encoder=TinyEncoder(),
        task_keys=["energy", "forces", "stress"],
        normalize_kwargs={"energy_mean": -1.0, "energy_std": 3.0},
        output_kwargs={"hidden_dim": 16},
    ).double()
    batch = make_batch(structures, dtype=torch.float64)
    with torch.no_grad():
        pred = task(batch)
    pos = batch["graph"].pos
    fd_forces = torch.zeros_like(pos)
    for atom in range(pos.shape[0]):
        for axis in range(3):
            fd_forces[atom, axis] = fd_force(task, batch, atom, axis)
    torch.testing.assert_close(pred["forces"], fd_forces, atol=1e-6, rtol=0)
    assert pred["forces"].abs().max() > 1e-3
    fd = torch.zeros(2, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            fd[:, i, j] = fd_stress(task, batch, i, j)
    torch.testing.assert_close(pred["stress"], fd, atol=1e-6, rtol=0)


def test_force_loss_uses_energy_std():
    torch.manual_seed(6)
    batch = make_batch(emt_structures(3, seed=6))
    with pytest.warns(UserWarning, match="forces_mean/forces_std are ignored"):
        task = ForceRegressionTask(
            encoder=TinyEncoder(),
            normalize_kwargs={"energy_mean": -2.0, "energy_std": 4.0, "forces_std": 99.0},
            task_loss_scaling={"energy": 0.5, "forces": 3.0},
        )
    out = task.compute_losses(batch)
    e_pred, f_pred = out["predictions"]["energy"], out["predictions"]["forces"]
    t = batch["targets"]
    energy_loss = ((e_pred + 2.0) / 4.0 - (t["energy"] + 2.0) / 4.0).abs().mean()
    force_loss = (f_pred / 4.0 - t["forces"] / 4.0).abs().mean()
    torch.testing.assert_close(out["per_key"]["energy"], energy_loss)
    torch.testing.assert_close(out["per_key"]["forces"], force_loss)
    torch.testing.assert_close(out["loss"], 0.5 * energy_loss + 3.0 * force_loss)
    # extensive energy: the per-atom head output summed per structure
    atomic = task.output_heads["energy"](task.encoder(batch).point_embedding).squeeze(-1)
    per_structure = torch.zeros(3).index_add(0, batch["graph"].batch, atomic)
    torch.testing.assert_close(e_pred, per_structure * 4.0 - 2.0)


def test_compute_losses_is_pure():
    torch.manual_seed(7)
    batch = make_batch(emt_structures(3, seed=7))
    task = ForceRegressionTask(encoder=TinyEncoder(), task_keys=["energy", "forces", "stress"])
    task.train()
    logged = []
    task.log = lambda *args, **kwargs: logged.append(args)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    scaling = dict(task.task_loss_scaling)
    pos_before = batch["graph"].pos.clone()
    first = task.compute_losses(batch)
    second = task.compute_losses(batch)
    assert first["loss"].requires_grad
    torch.testing.assert_close(first["loss"], second["loss"], rtol=0, atol=0)
    for key in task.task_keys:
        torch.testing.assert_close(first["per_key"][key], second["per_key"][key], rtol=0, atol=0)
        torch.testing.assert_close(first["predictions"][key], second["predictions"][key], rtol=0, atol=0)
    after = task.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(p.grad is None for p in task.parameters())
    assert logged == []
    assert all(m.update_count == 0 for m in task.task_metrics.store.values())
    assert task.task_loss_scaling == scaling
    assert torch.equal(batch["graph"].pos, pos_before) and not batch["graph"].pos.requires_grad
    # the loss reaches the encoder through the force derivative (create_graph=True)
    first["loss"].backward()
    assert task.encoder.radial[0].weight.grad.abs().sum() > 0


def test_force_training_lowers_the_loss():
    torch.manual_seed(8)
    structures = emt_structures(6, seed=8)
    batch = make_batch(structures)
    energies = batch["targets"]["energy"]
    task = ForceRegressionTask(
        encoder=TinyEncoder(),
        lr=1e-2,
        normalize_kwargs={"energy_std": 1.0},
        output_kwargs={"hidden_dim": 32},
        task_loss_scaling={"forces": 10.0},
    )
    # start the head near the mean atomic energy so the force term dominates
    with torch.no_grad():
        task.output_heads["energy"].blocks[-1].linear.bias.fill_(float(energies.sum() / batch["natoms"].sum()))
    optimizer = task.configure_optimizers()
    with torch.no_grad():
        start = task.compute_losses(batch)
    for _ in range(200):
        optimizer.zero_grad()
        task.compute_losses(batch)["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        end = task.compute_losses(batch)
    assert end["per_key"]["forces"] < 0.3 * start["per_key"]["forces"]
    assert end["loss"] < 0.5 * start["loss"]


def test_validate_test_predict_under_inference_mode_give_exact_force_maes():
    torch.manual_seed(9)
    structures = emt_structures(8, seed=9)
    batches = [make_batch(structures[:3]), make_batch(structures[3:])]
    task = ForceRegressionTask(encoder=TinyEncoder(), task_keys=["energy", "forces", "stress"])
    preds = [task(b) for b in batches]
    forces = torch.cat([p["forces"] for p in preds]).detach()
    force_target = torch.cat([b["targets"]["forces"] for b in batches])
    energy = torch.cat([p["energy"] for p in preds]).detach()
    stress = torch.cat([p["stress"] for p in preds]).detach()
    force_mae = (forces - force_target).abs().mean().item()
    energy_mae = (energy - torch.cat([b["targets"]["energy"] for b in batches])).abs().mean().item()
    stress_mae = (stress - torch.cat([b["targets"]["stress"] for b in batches])).abs().mean().item()

    # batches collated inside the evaluation loop are inference tensors (Lightning's default inference_mode=True)
    made_in_inference_mode = []

    def collate(group):
        batch = make_batch(group)
        made_in_inference_mode.append(batch["graph"].pos.is_inference())
        return batch

    def loader():
        groups = [structures[:3], structures[3:]]
        return torch.utils.data.DataLoader(groups, batch_size=None, shuffle=False, collate_fn=collate)

    trainer = quiet_trainer()
    (val,) = trainer.validate(task, dataloaders=loader(), verbose=False)
    (test,) = trainer.test(task, dataloaders=loader(), verbose=False)
    assert made_in_inference_mode == [True] * 4
    for metrics, split in ((val, "val"), (test, "test")):
        assert metrics[f"{split}_forces_mae"] == pytest.approx(force_mae, rel=1e-5)
        assert metrics[f"{split}_energy_mae"] == pytest.approx(energy_mae, rel=1e-5)
        assert metrics[f"{split}_stress_mae"] == pytest.approx(stress_mae, rel=1e-4)
    predicted = trainer.predict(task, dataloaders=loader())
    torch.testing.assert_close(torch.cat([p["forces"] for p in predicted]), forces)
    assert predicted[1]["ids"] == ["s0", "s1", "s2", "s3", "s4"]
    assert predicted[1]["natoms"].tolist() == [len(a) for a in structures[3:]]


def test_batch_made_in_inference_mode():
    batch_structures = emt_structures(2, seed=10)
    task = ForceRegressionTask(encoder=TinyEncoder())
    reference = task.compute_losses(make_batch(batch_structures))
    with torch.inference_mode():
        batch = make_batch(batch_structures)
        out = task.compute_losses(batch)
    torch.testing.assert_close(out["predictions"]["forces"], reference["predictions"]["forces"].detach())
    assert not out["loss"].requires_grad


def test_stress_in_voigt_form_and_missing_cell():
    structures = emt_structures(2, seed=11)
    task = ForceRegressionTask(encoder=TinyEncoder(), task_keys=["energy", "forces", "stress"])
    batch = make_batch(structures)
    full = task.compute_losses(batch)["per_key"]["stress"]
    voigt = torch.tensor(np.stack([a.get_stress() for a in structures]), dtype=torch.float32)
    batch["targets"]["stress"] = voigt
    torch.testing.assert_close(task.compute_losses(batch)["per_key"]["stress"], full)
    batch["graph"].cell = torch.zeros_like(batch["graph"].cell)
    batch["graph"].cell_shifts = torch.zeros_like(batch["graph"].cell_shifts)
    with pytest.raises(DataError, match="no cell"):
        task.compute_losses(batch)


def test_encoder_that_ignores_positions_gives_clear_error():
    class Blind(TinyEncoder):
        def forward(self, batch):
            graph = get_graph(batch)
            points = self.species(graph.atomic_numbers)
            return Embeddings(points[:1].expand(num_graphs(graph), -1), points)

    task = ForceRegressionTask(encoder=Blind())
    with pytest.raises(ConfigError, match="does not depend on the atom positions"):
        task.compute_losses(make_batch(emt_structures(2)))


# ----------------------------------------------------------------------------- checkpoints
def _fit_briefly(task: LightningModule, batches: list[dict], tmp_path, **kwargs) -> str:
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path, limit_val_batches=1, **kwargs)
    trainer.fit(task, train_dataloaders=as_loader(batches), val_dataloaders=as_loader(batches))
    path = str(tmp_path / "task.ckpt")
    trainer.save_checkpoint(path)
    task.fit_metrics = dict(trainer.callback_metrics)
    return path


@pytest.mark.parametrize("clip", [None, 0.01])
def test_lightning_gradient_clipping_reaches_the_optimizer(tmp_path, clip):
    """With ``gradient_clip_val`` the optimizer steps on clipped gradients; without, on the raw ones."""
    norms: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # Lightning's closure: forward, backward, hooks, clipping
            loss = closure()
            grads = [p.grad.reshape(-1) for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
            return loss

    torch.manual_seed(15)
    batches = [make_batch(emt_structures(3, seed=15), {"y": [10.0, -20.0, 30.0]})]
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"], output_kwargs={"hidden_dim": 8})
    task.configure_optimizers = lambda: Recording(task.parameters(), lr=0.0)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path, gradient_clip_val=clip)
    trainer.fit(task, train_dataloaders=as_loader(batches))
    assert len(norms) == 2
    if clip is None:
        assert min(norms) > 0.1  # large targets: large gradients, so the clipped case is not vacuous
    else:
        assert max(norms) == pytest.approx(clip, rel=1e-4)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(12)
    structures = emt_structures(4, seed=12)
    batches = [make_batch(structures[:2], {"y": [1.0, 2.0]}), make_batch(structures[2:], {"y": [0.5, 3.0]})]
    task = ScalarRegressionTask(
        encoder_class=TinyEncoder,
        encoder_kwargs={"embedding_dim": 12},
        task_keys=["y"],
        loss_func=nn.L1Loss,
        output_kwargs={
            "hidden_dim": 12,
            "num_hidden": 2,
            "activation": nn.SiLU,
            "norm": {"class_path": "torch.nn.LayerNorm", "init_args": {"normalized_shape": 12}},
        },
        normalize_kwargs={"y_mean": 1.5, "y_std": 0.8},
        lr=1e-3,
        scheduler_kwargs={"StepLR": {"step_size": 1}},
    )
    path = _fit_briefly(task, batches, tmp_path)

    raw = torch.load(path, weights_only=True)
    hparams = raw["hyper_parameters"]
    assert hparams["encoder_class"] == encoder_path()
    assert hparams["loss_func"] == "torch.nn.modules.loss.L1Loss"
    assert hparams["output_kwargs"]["activation"] == "torch.nn.modules.activation.SiLU"
    assert hparams["output_kwargs"]["norm"] == {
        "class_path": "torch.nn.LayerNorm",
        "init_args": {"normalized_shape": 12},
    }
    loaded = ScalarRegressionTask.load_from_checkpoint(path, weights_only=True)
    assert isinstance(loaded.output_heads["y"].blocks[1].norm, nn.LayerNorm)
    task.eval()
    loaded.eval()
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(loaded(batch)["y"], task(batch)["y"], rtol=0, atol=0)


def test_force_checkpoint_and_pretrained_encoder(tmp_path):
    torch.manual_seed(13)
    batches = [make_batch(emt_structures(3, seed=13))]
    task = ForceRegressionTask(encoder_class=encoder_path(), encoder_kwargs={"embedding_dim": 8}, lr=1e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_forces", mode="min")
    path = _fit_briefly(task, batches, tmp_path, callbacks=[checkpoint], enable_checkpointing=True)
    names = {"train_loss", "train_loss_epoch", "train_forces_mae", "val_loss", "val_energy", "val_forces_mae"}
    assert names <= set(task.fit_metrics)
    assert checkpoint.best_model_path  # the upstream monitor name exists
    loaded = ForceRegressionTask.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(loaded(batches[0])["forces"], task(batches[0])["forces"], rtol=0, atol=0)
    fresh = ScalarRegressionTask.from_pretrained_encoder(path, task_keys=["y"])
    for key, value in task.encoder.state_dict().items():
        assert torch.equal(fresh.encoder.state_dict()[key], value)


def test_encoder_instance_is_not_in_hparams(tmp_path):
    batches = [make_batch(emt_structures(2), {"y": [1.0, 2.0]})]
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["y"])
    assert task.hparams["encoder_class"] is None
    path = _fit_briefly(task, batches, tmp_path)
    with pytest.raises(ConfigError, match="encoder=<the same encoder>"):
        ScalarRegressionTask.load_from_checkpoint(path, weights_only=True)
    loaded = ScalarRegressionTask.load_from_checkpoint(path, encoder=TinyEncoder(), weights_only=True)
    torch.testing.assert_close(loaded(batches[0])["y"], task(batches[0])["y"], rtol=0, atol=0)


def test_lazy_heads_train_and_reload(tmp_path):
    batches = [make_batch(emt_structures(2), {"y": [1.0, 2.0]})]
    task = ScalarRegressionTask(
        encoder_class=encoder_path(), task_keys=["y"], output_kwargs={"lazy": True, "hidden_dim": 8}
    )
    path = _fit_briefly(task, batches, tmp_path)
    assert task.output_heads["y"].blocks[0].linear.weight.shape == (8, 16)
    loaded = ScalarRegressionTask.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(loaded(batches[0])["y"], task(batches[0])["y"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- real encoders
def test_with_the_project_encoders():
    encoders = pytest.importorskip("matsciml.models.encoders")
    torch.manual_seed(14)
    batch = make_batch(emt_structures(2, seed=14))
    e3nn_kwargs = {"num_layers": 1, "hidden_irreps": "8x0e + 4x1o", "embedding_dim": 8, "cutoff": CUTOFF}
    task = ForceRegressionTask(encoder_class="E3NNEncoder", encoder_kwargs=e3nn_kwargs)
    assert isinstance(task.encoder, encoders.get_encoder_class("E3NNEncoder"))
    out = task.compute_losses(batch)
    assert out["predictions"]["forces"].shape == (batch["graph"].num_nodes, 3)
    # net force on a periodic cell is zero for a translation-invariant energy
    for g in range(2):
        net = out["predictions"]["forces"][batch["graph"].batch == g].sum(dim=0)
        torch.testing.assert_close(net, torch.zeros(3), atol=1e-5, rtol=0)
