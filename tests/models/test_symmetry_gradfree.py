"""CrystalSymmetryClassificationTask and GradFreeForceRegressionTask against hand-written oracles.

Oracles: textbook space groups of elemental crystals (fcc Cu 225, bcc Fe 229, hcp Mg 194,
diamond Si 227), the International Tables' crystal-system ranges, cross entropy and MSE
written out from the heads' outputs, accuracy and MAE counted by hand.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _multitask_helpers as helpers  # noqa: E402

from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.models.base import CrystalSymmetryClassificationTask, GradFreeForceRegressionTask  # noqa: E402
from matsciml.models.tasks.symmetry import crystal_system_index  # noqa: E402
from matsciml.registry import lookup  # noqa: E402


def _graph_batch(structures):
    from matsciml.datasets.collate import collate_samples
    from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

    samples = []
    for k, atoms in enumerate(structures):
        sample = {
            "pos": torch.tensor(atoms.positions, dtype=torch.float32),
            "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.long),
            "cell": torch.tensor(atoms.cell.array, dtype=torch.float32),
            "pbc": torch.tensor([True, True, True]),
            "targets": {},
            "id": str(k),
        }
        for transform in (PeriodicPropertiesTransform(cutoff_radius=3.0), PointCloudToGraphTransform("pyg")):
            sample = transform(sample)
        samples.append(sample)
    return collate_samples(samples)


def test_crystal_system_ranges():
    numbers = torch.tensor([1, 2, 3, 15, 16, 74, 75, 142, 143, 167, 168, 194, 195, 230, float("nan")])
    expected = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    got = crystal_system_index(numbers)
    assert got[:-1].tolist() == expected and math.isnan(got[-1].item())


def test_spacegroups_computed_with_spglib_when_the_data_has_none():
    from ase.build import bulk

    structures = [bulk("Cu", "fcc", a=3.6), bulk("Fe", "bcc", a=2.87), bulk("Mg", "hcp", a=3.2, c=5.2), bulk("Si")]
    batch = _graph_batch(structures)
    torch.manual_seed(0)
    task = CrystalSymmetryClassificationTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=_small_egnn(),
        task_keys=["spacegroup", "crystal_system"],
        output_kwargs={"hidden_dim": 8},
    )
    result = task.compute_losses(batch)
    assert batch["targets"]["spacegroup"].tolist() == [225, 229, 194, 227]  # cached for the metrics
    logits = task._raw_predictions(batch)[0]
    for key, classes in (("spacegroup", [224, 228, 193, 226]), ("crystal_system", [6, 6, 5, 6])):
        log_p = torch.log_softmax(logits[key].detach(), dim=-1)
        by_hand = -torch.stack([log_p[i, c] for i, c in enumerate(classes)]).mean()
        assert result["per_key"][key].item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert result["predictions"][key].shape == (4, 230 if key == "spacegroup" else 7)
    # the metric: fraction of structures whose most probable class is right, counted by hand
    targets = {k: task._target(batch, k, result["predictions"][k]) for k in task.task_keys}
    logged = task.task_metrics.update("val", result, targets)
    right = sum(int(result["predictions"]["crystal_system"][i].argmax()) == c for i, c in enumerate([6, 6, 5, 6]))
    assert logged["val_crystal_system_accuracy"].compute().item() == pytest.approx(right / 4)


def _small_egnn() -> dict:
    import yaml

    repo = HERE.parents[1]
    kwargs = yaml.safe_load((repo / "experiments/configs/models/egnn_small.yaml").read_text())["encoder_kwargs"]
    kwargs.update(embed_in_dim=8, embed_hidden_dim=8, embed_out_dim=8, embed_feat_dims=[8], embed_message_dims=[8, 8])
    kwargs.update(node_projection_hidden_dim=8, prediction_hidden_dim=8, embed_depth=1)
    return kwargs


def test_labels_from_the_data_and_missing_labels_are_left_out():
    task = CrystalSymmetryClassificationTask(
        encoder_class=helpers.ENCODER, encoder_kwargs=dict(helpers.ENCODER_KWARGS), output_kwargs={"hidden_dim": 8}
    )
    batch = helpers.stack(helpers.samples(4, (), seed=0))
    batch["targets"] = {"spacegroup": torch.tensor([225.0, float("nan"), 1.0, 62.0])}
    result = task.compute_losses(batch)
    log_p = torch.log_softmax(task._raw_predictions(batch)[0]["spacegroup"].detach(), dim=-1)
    by_hand = -(log_p[0, 224] + log_p[2, 0] + log_p[3, 61]) / 3
    assert result["per_key"]["spacegroup"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert result["counts"]["spacegroup"] == 3
    batch["targets"]["spacegroup"] = torch.tensor([231.0, 1.0, 1.0, 1.0])
    with pytest.raises(DataError, match="outside 1-230"):
        task.compute_losses(batch)
    with pytest.raises(ConfigError, match="atom_embedding"):
        CrystalSymmetryClassificationTask(
            encoder_class=helpers.ENCODER, encoder_kwargs=dict(helpers.ENCODER_KWARGS), freeze_embedding=True
        )
    assert lookup("task", "CrystalSymmetryClassificationTask") is CrystalSymmetryClassificationTask


def test_gradfree_forces_direct_head_loss_and_mae_by_hand():
    torch.manual_seed(1)
    task = GradFreeForceRegressionTask(
        encoder_class=helpers.ENCODER,
        encoder_kwargs=dict(helpers.ENCODER_KWARGS),
        output_kwargs={"hidden_dim": 8},
        normalize_kwargs={"force_std": 2.0},
        task_keys=["force"],  # upstream's name, read as the canonical "forces"
    ).double()
    g = torch.Generator().manual_seed(4)
    batch = {"features": torch.randn(5, 4, generator=g, dtype=torch.float64), "batch_size": 5}
    batch["targets"] = {"forces": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    result = task.compute_losses(batch)
    raw = task.output_heads["forces"](task.encoder(batch).point_embedding)
    by_hand = ((raw - batch["targets"]["forces"] / 2.0) ** 2).mean()
    assert result["per_key"]["forces"].item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert torch.allclose(result["predictions"]["forces"], raw * 2.0)
    logged = task.task_metrics.update("val", result, {"forces": batch["targets"]["forces"]})
    mae = (raw.detach() * 2.0 - batch["targets"]["forces"]).abs().mean()
    assert logged["val_forces_mae"].compute().item() == pytest.approx(mae.item(), rel=1e-6)
    result["loss"].backward()
    assert all(p.grad is not None for p in task.parameters())
    with pytest.raises(ConfigError, match="task key 'forcez'.*did you mean"):
        GradFreeForceRegressionTask(encoder_class=helpers.ENCODER, task_keys=["forcez"])
    batch["targets"] = {"forces": torch.zeros(4, 3, dtype=torch.float64)}
    with pytest.raises(DataError, match=r"one force per atom"):
        task.compute_losses(batch)


def test_computed_spacegroups_agree_with_oqmd_labels():
    """OQMD's own space-group symbols (tests/data), and pymatgen on each structure alone, against the batch."""
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    from pymatgen.symmetry.groups import SpaceGroup

    from matsciml.models.tasks.symmetry import spacegroup_numbers

    frames = read(HERE.parents[0] / "data" / "oqmd_devset.extxyz", index="::8")  # 25 crystals across the file
    got = [int(n) for n in spacegroup_numbers(_graph_batch(frames)["graph"]).tolist()]
    alone = [SpacegroupAnalyzer(AseAtomsAdaptor.get_structure(f)).get_space_group_number() for f in frames]
    assert got == alone
    labels = [SpaceGroup(f.info["spacegroup"]).int_number for f in frames]
    assert len(set(labels)) >= 4  # several groups, not one repeated label
    # OQMD labels the prototype; a few relaxed structures are more symmetric at 0.01 Å
    assert sum(g == e for g, e in zip(got, labels)) >= 22, list(zip(got, labels))


def test_upstream_symmetry_layout_is_read():
    task = CrystalSymmetryClassificationTask(
        encoder_class=helpers.ENCODER, encoder_kwargs=dict(helpers.ENCODER_KWARGS), output_kwargs={"hidden_dim": 8}
    )
    batch = helpers.stack(helpers.samples(3, (), seed=0))
    batch["symmetry"] = {"number": torch.tensor([3, 200, 230])}
    logits = task._raw_predictions(batch)[0]["spacegroup"].detach()
    by_hand = -torch.log_softmax(logits, -1)[[0, 1, 2], [2, 199, 229]].mean()
    assert task.compute_losses(batch)["per_key"]["spacegroup"].item() == pytest.approx(by_hand.item(), rel=1e-6)
