"""Per-atom attributions: completeness of integrated gradients (sum = prediction - baseline prediction)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_egnn_kwargs

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.attribution import atom_attributions, find_layer
from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.models.tasks.scalar import ScalarRegressionTask

TARGET = "energy_per_atom"


@pytest.fixture(scope="module")
def task_and_batch(devset_cache, tmp_path_factory):
    dm = MatSciMLDataModule.from_devset(dset_kwargs={"n": 8}, val_split=0.5, target_keys=[TARGET], batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    task = ScalarRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=tiny_egnn_kwargs(depth=2, cutoff=6.0),
        task_keys=[TARGET],
        output_kwargs={"hidden_dim": 16},
    ).eval()
    batch = next(iter(dm.val_dataloader()))
    yield task, batch


def test_integrated_gradients_are_complete(task_and_batch):
    task, batch = task_and_batch
    layer = find_layer(task, None)
    out = atom_attributions(task, batch, TARGET, layer, steps=64)
    sums = torch.zeros_like(out["prediction"]).index_add_(0, out["structure"], out["attributions"])
    difference = out["prediction"] - out["baseline_prediction"]
    assert difference.abs().min() > 1e-3  # the baseline really changes the predictions
    torch.testing.assert_close(sums, difference, rtol=1e-4, atol=1e-6)
    # the predictions are the model's own (independent call, no hook)
    with torch.no_grad():
        direct = task(batch)[TARGET].reshape(-1)
    torch.testing.assert_close(out["prediction"], direct, rtol=1e-5, atol=1e-6)
    # gradient x input is not complete in general: it must differ from integrated gradients
    gxi = atom_attributions(task, batch, TARGET, layer, method="gradient_x_input")
    assert not torch.allclose(gxi["attributions"], out["attributions"], rtol=1e-3)


def test_bad_layer_and_target(task_and_batch):
    task, batch = task_and_batch
    with pytest.raises(ConfigError, match="target_layer='encoder.atom_embeding'.*did you mean"):
        find_layer(task, "encoder.atom_embeding")
    with pytest.raises(ConfigError, match="task='energy'"):
        atom_attributions(task, batch, "energy", find_layer(task, None))


def test_callback_writes_pictures_and_a_complete_csv(tmp_path, task_and_batch):
    import csv

    import lightning.pytorch as pl

    from matsciml.lightning.callbacks import AtomAttributionCallback
    from matsciml.lightning.callbacks.builder import build_callback

    cb = build_callback({"kind": "GradCamCallback", "task": TARGET, "log_n_batches": 1, "steps": 32})
    assert isinstance(cb, AtomAttributionCallback)
    task, _ = task_and_batch
    dm = MatSciMLDataModule.from_devset(dset_kwargs={"n": 8}, val_split=0.5, target_keys=[TARGET], batch_size=4)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[cb],
        limit_train_batches=1,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    assert cb.images and all(p.is_file() and p.stat().st_size > 5000 for p in cb.images)
    with open(tmp_path / "attributions" / "attributions.csv") as fh:
        rows = list(csv.DictReader(fh))
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert len(by_id) == 4
    for atoms in by_id.values():
        total = sum(float(r["attribution"]) for r in atoms)
        expected = float(atoms[0]["prediction"]) - float(atoms[0]["baseline_prediction"])
        assert total == pytest.approx(expected, rel=1e-3, abs=1e-6)
