"""Tests of the inference export against the task itself.

Oracles: the task's eager forward pass (a task reloaded with ``load_from_checkpoint``),
edge vectors of the whole batch for the per-structure split, and the metadata written.
"""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_egnn_kwargs
from torch import nn

from matsciml.common import graph as G
from matsciml.common.errors import ConfigError
from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.export import (
    ExportError,
    GraphTensors,
    export_model,
    graph_inputs,
    load_exported,
    split_structures,
)
from matsciml.models.embeddings import Embeddings
from matsciml.models.tasks.forces import ForceRegressionTask
from matsciml.models.tasks.scalar import ScalarRegressionTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

E3NN_KWARGS = {
    "num_layers": 2,
    "hidden_irreps": "8x0e + 4x1o",
    "embedding_dim": 16,
    "radial_hidden": 16,
    "cutoff": 5.0,
    "avg_num_neighbors": 20.0,
}
EGNN_KWARGS = tiny_egnn_kwargs(depth=2, cutoff=6.0)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    cache = tmp_path_factory.mktemp("devset")
    mp = pytest.MonkeyPatch()
    mp.setenv("MATSCIML_CACHE", str(cache))
    dm = MatSciMLDataModule.from_devset(
        dset_kwargs={"n": 16}, val_split=0.25, target_keys=["energy", "forces"], batch_size=4
    )
    dm.setup()
    yield dm
    mp.undo()


@pytest.fixture(scope="module")
def batches(datamodule):
    """An example batch (4 structures) and another batch of 3 different structures."""
    example = next(iter(datamodule.train_dataloader()))
    other = next(iter(datamodule.eval_dataloader("val", batch_size=3)))
    return example, other


def _fit_one_step(task: pl.LightningModule, datamodule, root) -> str:
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer.fit(task, datamodule=datamodule)
    return trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path


class ExportFriendlyEncoder(nn.Module):
    """A small message-passing encoder without Python decisions on tensor values."""

    embedding_dim = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 8)
        self.message = nn.Linear(9, 8)

    def forward(self, batch) -> Embeddings:
        graph = G.get_graph(batch)
        ei = G.edge_index(graph)
        h = self.embed(G.atomic_numbers(graph))
        d = G.edge_vectors(graph).norm(dim=-1, keepdim=True)
        m = torch.tanh(self.message(torch.cat([h[ei[1]], d], dim=-1))) * torch.exp(-d)
        point = h + torch.zeros_like(h).index_add(0, ei[0], m)
        system = point.new_zeros(G.cells(graph).shape[0], 8).index_add(0, G.graph_index(graph), point)
        return Embeddings(system_embedding=system, point_embedding=point)


# ----------------------------------------------------------------------------- pure helpers
def test_split_structures_keeps_every_edge_vector(batches):
    example, _ = batches
    inputs = graph_inputs(example)
    whole = G.edge_vectors(GraphTensors(*inputs))
    parts = split_structures(inputs)
    assert len(parts) == 4
    per = torch.cat([G.edge_vectors(GraphTensors(*p)) for p in parts])
    # the batch's edges are grouped by structure, so the order is kept
    torch.testing.assert_close(per, whole, rtol=0, atol=0)
    assert sum(p[0].shape[0] for p in parts) == inputs[0].shape[0]
    assert all(int(p[5].max()) == 0 and p[4].shape == (1, 3, 3) for p in parts)


# ----------------------------------------------------------------------------- torchscript
def test_torchscript_e3nn_matches_task_from_checkpoint(datamodule, batches, tmp_path):
    task = ScalarRegressionTask(
        encoder_class="E3NNEncoder", encoder_kwargs=E3NN_KWARGS, task_keys=["energy"], output_kwargs={"hidden_dim": 16}
    )
    ckpt = _fit_one_step(task, datamodule, tmp_path)
    example, other = batches
    path = export_model(task, example, tmp_path / "model.pt", method="torchscript")
    model = load_exported(path)
    assert model.method == "torchscript" and model.keys == ["energy"]
    assert model.metadata["mode"] == "trace" and model.metadata["structures_per_call"] == 1
    reference = ScalarRegressionTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    for batch in (example, other):  # the example and 3 other structures of other sizes
        with torch.no_grad():
            expected = reference(batch)["energy"]
        got = model(batch)["energy"]
        assert got.shape == (batch["batch_size"],)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob(".model.pt.*"))  # no temporary file left


def test_force_task_exports_the_energy_only(batches, tmp_path):
    task = ForceRegressionTask(
        encoder_class="PLEGNNBackbone", encoder_kwargs=EGNN_KWARGS, output_kwargs={"hidden_dim": 16}
    ).eval()
    example, other = batches
    model = load_exported(export_model(task, example, tmp_path / "forces.pt"))
    assert model.keys == ["energy"] and model.metadata["dropped_keys"] == ["forces"]
    expected = task(other)
    got = model(other)
    assert set(got) == {"energy"}
    torch.testing.assert_close(got["energy"], expected["energy"].detach(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- torch.export
def test_torch_export_with_dynamic_sizes(batches, tmp_path):
    task = ScalarRegressionTask(encoder=ExportFriendlyEncoder(), task_keys=["energy"], output_kwargs={"hidden_dim": 8})
    task.eval()
    example, other = batches
    path = export_model(task, example, tmp_path / "model.pt2", method="export")
    model = load_exported(path)
    assert model.method == "export" and model.program is not None
    assert model.metadata["structures_per_call"] is None
    for batch in (example, other):  # 4 then 3 structures: one program for both
        with torch.no_grad():
            expected = task(batch)["energy"]
        torch.testing.assert_close(model(batch)["energy"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("encoder_class", "encoder_kwargs"),
    [("PLEGNNBackbone", EGNN_KWARGS), ("E3NNEncoder", E3NN_KWARGS)],
    ids=["egnn", "e3nn"],
)
def test_torch_export_of_the_project_encoders(encoder_class, encoder_kwargs, batches, tmp_path):
    """Both encoders export: one program, reloaded with torch.export.load, for batches of 4 and 3 structures."""
    task = ScalarRegressionTask(
        encoder_class=encoder_class,
        encoder_kwargs=encoder_kwargs,
        task_keys=["energy"],
        output_kwargs={"hidden_dim": 8},
    ).eval()
    example, other = batches
    # the graphs reach past E3NNEncoder's cutoff: the eager task drops those edges, the export keeps them
    assert bool((G.edge_vectors(G.get_graph(example)).norm(dim=-1) > E3NN_KWARGS["cutoff"]).any())
    path = export_model(task, example, tmp_path / "model.pt2", method="export")
    model = load_exported(path)
    assert model.method == "export" and model.metadata["structures_per_call"] is None
    program = torch.export.load(str(path)).module()  # the file alone, without matsciml's loader
    for batch in (example, other):
        assert G.get_graph(batch).num_graphs == batch["batch_size"]
        with torch.no_grad():
            expected = task(batch)["energy"]
            (direct,) = program(*graph_inputs(batch))
        assert direct.shape == (batch["batch_size"],)
        torch.testing.assert_close(direct, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(batch)["energy"], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_errors(batches, tmp_path):
    task = ScalarRegressionTask(encoder=ExportFriendlyEncoder(), task_keys=["energy"], output_kwargs={"hidden_dim": 8})
    example, _ = batches
    with pytest.raises(ConfigError, match="did you mean 'torchscript'"):
        export_model(task, example, tmp_path / "m.pt", method="torchscrip")
    with pytest.raises(ConfigError, match="did you mean 'energy'"):
        export_model(task, example, tmp_path / "m.pt", keys=["energi"])
    single = {"graph": example["graph"].get_example(0)}
    with pytest.raises(ExportError, match="at least 2 structures"):
        export_model(task, single, tmp_path / "m.pt2", method="export")
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not an exported matsciml model"):
        load_exported(junk)
    # a TorchScript file without matsciml metadata
    plain = tmp_path / "plain.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(plain))
    with pytest.raises(ExportError, match="not written by matsciml"):
        load_exported(plain)
