"""Tests of the task protocol helpers used by callbacks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch_geometric.data import Batch, Data

from matsciml.common.graph import get_graph
from matsciml.models.embeddings import Embeddings
from matsciml.models.tasks import ScalarRegressionTask, TaskProtocol, compute_loss, is_task


class MeanSpecies(nn.Module):
    """Minimal encoder: mean of per-species vectors (enough to exercise the protocol)."""

    embedding_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.species = nn.Embedding(10, 4)

    def forward(self, batch) -> Embeddings:
        graph = get_graph(batch)
        points = self.species(graph.atomic_numbers) + 0.0 * graph.pos.sum()
        system = torch.zeros(graph.num_graphs, 4).index_add(0, graph.batch, points)
        return Embeddings(system, points)


def _batch() -> dict:
    graphs = [
        Data(
            pos=torch.randn(2, 3), atomic_numbers=torch.tensor([1, 2]), edge_index=torch.zeros(2, 0, dtype=torch.long)
        ),
        Data(
            pos=torch.randn(3, 3),
            atomic_numbers=torch.tensor([3, 1, 1]),
            edge_index=torch.zeros(2, 0, dtype=torch.long),
        ),
    ]
    return {
        "graph": Batch.from_data_list(graphs),
        "targets": {"y": torch.tensor([0.5, -1.0])},
        "ids": ["a", "b"],
        "batch_size": 2,
    }


class PlainModule(LightningModule):
    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.returns = returns

    def training_step(self, batch, batch_idx):
        loss = (self.weight * batch["targets"]["y"]).pow(2).mean() + batch_idx
        if self.returns == "tensor":
            return loss
        if self.returns == "dict":
            return {"loss": loss, "other": 1}
        return None


def test_tasks_follow_the_protocol_and_plain_modules_do_not():
    task = ScalarRegressionTask(encoder=MeanSpecies(), task_keys=["y"])
    assert is_task(task) and isinstance(task, TaskProtocol)
    assert task.task_keys == ["y"] and set(task.output_heads) == {"y"}
    assert task.task_loss_scaling == {"y": 1.0}
    assert not is_task(PlainModule())


def test_compute_loss_uses_compute_losses_for_tasks():
    torch.manual_seed(0)
    task = ScalarRegressionTask(encoder=MeanSpecies(), task_keys=["y"])
    batch = _batch()
    calls = []
    task.training_step = lambda *args: calls.append(args)  # must not be used
    torch.testing.assert_close(compute_loss(task, batch, 3), task.compute_losses(batch)["loss"])
    assert calls == []


@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_compute_loss_falls_back_to_training_step(returns):
    module = PlainModule(returns)
    batch = _batch()
    expected = (2.0 * torch.tensor([0.5, -1.0])).pow(2).mean() + 1
    loss = compute_loss(module, batch, 1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert module.weight.grad is not None


def test_compute_loss_rejects_a_step_without_loss():
    with pytest.raises(TypeError, match="returned NoneType"):
        compute_loss(PlainModule("none"), _batch(), 0)
