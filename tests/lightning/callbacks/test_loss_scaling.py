"""Tests of the loss-weight schedules and LossScalingScheduler.

Oracles: the schedule formulas written out by hand (the sigmoid in the upstream toolkit's
form, ``(end * c**m + initial * c**t) / (c**m + c**t)``, not the form the code uses), and a
real ``ScalarRegressionTask`` whose training loss must equal the scheduled weights times
its per-key losses.
"""

from __future__ import annotations

import csv
import logging
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch_geometric.data import Batch, Data

from matsciml.common.config import instantiate
from matsciml.common.errors import ConfigError
from matsciml.common.graph import get_graph, graph_index, num_graphs
from matsciml.lightning.callbacks.loss_scaling import LossScalingScheduler
from matsciml.lightning.loss_scaling import LinearScalingSchedule, SigmoidScalingSchedule
from matsciml.models.base import ScalarRegressionTask
from matsciml.models.embeddings import Embeddings

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def upstream_sigmoid(t: float, initial: float, end: float, center: float, curvature: float) -> float:
    k_c, k_t = curvature**center, curvature**t
    return (end * k_c + initial * k_t) / (k_c + k_t)


# ----------------------------------------------------------------------------- formulas
def test_linear_values():
    schedule = LinearScalingSchedule("energy", 1.0, 5.0, step_frequency="step", total=5)
    assert [schedule.value_at(i) for i in range(5)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert schedule.value_at(12) == 5.0  # past the end: stays at the end value
    down = LinearScalingSchedule("energy", 2.0, 0.0, total=3)  # end 0 is zero, not "not given"
    assert [down.value_at(i) for i in range(3)] == [2.0, 1.0, 0.0]
    flat = LinearScalingSchedule("energy", 3.0, total=4)  # no end value: constant
    assert [flat.value_at(i) for i in range(4)] == [3.0] * 4
    assert LinearScalingSchedule("energy", 3.0, 7.0, total=1).value_at(0) == 3.0
    np.testing.assert_allclose(schedule.values(), [1, 2, 3, 4, 5])
    assert len(schedule) == 5 and [schedule.step() for _ in range(6)] == [1, 2, 3, 4, 5, 5]


@pytest.mark.parametrize(
    "initial, end, center, curvature, n",
    [(1.0, 10.0, 0.5, 5e-7, 11), (2.0, 0.5, 0.3, 1e-3, 7), (0.0, 1.0, 0.8, 1e-9, 101), (5.0, 5.0, 0.5, 0.5, 4)],
)
def test_sigmoid_values(initial, end, center, curvature, n):
    schedule = SigmoidScalingSchedule("forces", initial, end, center, curvature=curvature, total=n)
    for i in range(n):
        expected = upstream_sigmoid(i / (n - 1), initial, end, center, curvature)
        assert schedule.value_at(i) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # halfway between the asymptotes at the centre
    assert float(schedule.curve(center)) == pytest.approx((initial + end) / 2, rel=1e-12)


def test_schedule_arguments_are_checked():
    with pytest.raises(ConfigError, match="step_frequency"):
        LinearScalingSchedule("energy", 1.0, 2.0, step_frequency="batch")
    with pytest.raises(ConfigError, match="center_frac"):
        SigmoidScalingSchedule("energy", 1.0, 2.0, center_frac=1.0)
    with pytest.raises(ConfigError, match="curvature"):
        SigmoidScalingSchedule("energy", 1.0, 2.0, center_frac=0.5, curvature=2.0)
    with pytest.raises(ConfigError, match="initial_value"):
        LinearScalingSchedule("energy", float("nan"))
    with pytest.raises(ConfigError, match="total"):
        LinearScalingSchedule("energy", 1.0, total=0)
    with pytest.raises(RuntimeError, match="no length"):
        LinearScalingSchedule("energy", 1.0, 2.0).value_at(0)


def test_scheduler_arguments_are_checked():
    with pytest.raises(ConfigError, match="at least one schedule"):
        LossScalingScheduler()
    with pytest.raises(ConfigError, match="two schedules"):
        LossScalingScheduler(LinearScalingSchedule("e", 1.0), SigmoidScalingSchedule("e", 1.0, 2.0, 0.5))
    with pytest.raises(ConfigError, match="not a schedule"):
        LossScalingScheduler("energy")


def test_yaml_form():
    spec = {
        "class_path": "matsciml.lightning.callbacks.loss_scaling.LossScalingScheduler",
        "init_args": {
            "scaling_schedules": [
                {
                    "class_path": "matsciml.lightning.loss_scaling.SigmoidScalingSchedule",
                    "init_args": {"key": "forces", "initial_value": 1.0, "end_value": 10.0, "center_frac": 0.5},
                }
            ]
        },
    }
    scheduler = instantiate(spec)
    (schedule,) = scheduler.schedules
    assert isinstance(schedule, SigmoidScalingSchedule) and schedule.step_frequency == "step"


# ----------------------------------------------------------------------------- with a real task
KEYS = ["energy_per_atom", "band_gap"]


class TinyEncoder(nn.Module):
    """Species embedding plus a linear map of positions, averaged per structure."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embedding_dim = dim
        self.species = nn.Embedding(20, dim)
        self.position = nn.Linear(3, dim)

    def forward(self, batch) -> Embeddings:
        graph = get_graph(batch)
        points = torch.tanh(self.species(graph.atomic_numbers) + self.position(graph.pos))
        index = graph_index(graph)
        count = torch.bincount(index, minlength=num_graphs(graph)).clamp(min=1)
        system = points.new_zeros(num_graphs(graph), points.shape[1]).index_add(0, index, points) / count[:, None]
        return Embeddings(system_embedding=system, point_embedding=points)


def make_batches(num: int, per_batch: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num):
        data = []
        for _ in range(per_batch):
            n = int(torch.randint(2, 5, (1,), generator=g))
            data.append(
                Data(pos=torch.randn(n, 3, generator=g), atomic_numbers=torch.randint(1, 20, (n,), generator=g))
            )
        batches.append(
            {
                "graph": Batch.from_data_list(data),
                "targets": {key: torch.randn(per_batch, generator=g) for key in KEYS},
                "natoms": torch.tensor([d.num_nodes for d in data]),
                "batch_size": per_batch,
            }
        )
    return batches


def make_task() -> ScalarRegressionTask:
    torch.manual_seed(0)
    return ScalarRegressionTask(
        encoder=TinyEncoder(), task_keys=KEYS, output_kwargs={"hidden_dim": 8, "num_hidden": 1}, lr=0.01
    )


class Check(pl.Callback):
    """Listed after the scheduler: records the weights of each step and the loss they must give."""

    def __init__(self) -> None:
        self.weights: list[dict[str, float]] = []
        self.expected: list[float] = []
        self.returned: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weights = dict(pl_module.task_loss_scaling)
        self.weights.append(weights)
        with torch.no_grad():
            per_key = pl_module.compute_losses(batch)["per_key"]
        self.expected.append(sum(weights[k] * float(per_key[k]) for k in KEYS))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append(float(outputs["loss"]))


def test_scheduler_drives_the_task_loss(tmp_path):
    batches = make_batches(4)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    task = make_task()
    with torch.no_grad():
        before = task.compute_losses(batches[0])
    assert float(before["loss"]) == pytest.approx(sum(float(before["per_key"][k]) for k in KEYS), rel=1e-6)

    linear = LinearScalingSchedule("energy_per_atom", 1.0, 5.0, step_frequency="step")
    sigmoid = SigmoidScalingSchedule("band_gap", 2.0, 0.5, center_frac=0.4, curvature=1e-3, step_frequency="epoch")
    check = Check()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=[LossScalingScheduler(linear, sigmoid), check],
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, loader)

    # 3 epochs x 4 batches: 12 steps; the step schedule has 12 points, the epoch one 3
    assert len(linear) == 12 and len(sigmoid) == 3
    assert [w["energy_per_atom"] for w in check.weights] == pytest.approx([1.0 + 4.0 * i / 11 for i in range(12)])
    epoch_values = [upstream_sigmoid(e / 2, 2.0, 0.5, 0.4, 1e-3) for e in range(3)]
    assert [w["band_gap"] for w in check.weights] == pytest.approx([epoch_values[i // 4] for i in range(12)])
    # the loss the task trained on is the scheduled weights times its per-key losses
    assert check.returned == pytest.approx(check.expected, rel=1e-5)

    # after training the task keeps the last weights, and compute_losses uses them
    assert task.task_loss_scaling == pytest.approx({"energy_per_atom": 5.0, "band_gap": epoch_values[-1]})
    with torch.no_grad():
        after = task.compute_losses(batches[0])
    expected = 5.0 * float(after["per_key"]["energy_per_atom"]) + epoch_values[-1] * float(after["per_key"]["band_gap"])
    assert float(after["loss"]) == pytest.approx(expected, rel=1e-6)
    assert not math.isclose(float(after["loss"]), sum(float(after["per_key"][k]) for k in KEYS), rel_tol=1e-3)

    # logged as loss_scaling/<key>
    rows = list(csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv")))
    logged = {
        int(r["step"]): float(r["loss_scaling/energy_per_atom"]) for r in rows if r["loss_scaling/energy_per_atom"]
    }
    assert logged[11] == pytest.approx(5.0) and logged[0] == pytest.approx(1.0)


def test_resumed_run_continues_the_schedule(tmp_path):
    """Weights are functions of the trainer's counters: a run resumed at step 6 continues where it was."""
    loader = torch.utils.data.DataLoader(make_batches(4), batch_size=None, collate_fn=lambda b: b)

    def run(max_steps, ckpt_path=None):
        check = Check()
        schedule = LinearScalingSchedule("energy_per_atom", 0.0, 11.0, step_frequency="step", total=12)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=[LossScalingScheduler(schedule), check],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(make_task(), loader, ckpt_path=ckpt_path)
        return trainer, check

    first, check = run(6)
    first.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed = run(12, ckpt_path=tmp_path / "mid.ckpt")
    assert [w["energy_per_atom"] for w in check.weights] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [w["energy_per_atom"] for w in resumed.weights] == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]


def test_unknown_key_and_module_without_scaling(tmp_path):
    loader = torch.utils.data.DataLoader(make_batches(2), batch_size=None, collate_fn=lambda b: b)
    options = dict(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    scheduler = LossScalingScheduler(LinearScalingSchedule("forces", 1.0, 2.0, total=2))
    with pytest.raises(ConfigError, match="'forces' is not a task key"):
        pl.Trainer(callbacks=[scheduler], **options).fit(make_task(), loader)

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch["graph"].pos).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    scheduler = LossScalingScheduler(LinearScalingSchedule("energy", 1.0, 2.0, total=2))
    with pytest.raises(ConfigError, match="no task_loss_scaling"):
        pl.Trainer(callbacks=[scheduler], **options).fit(Plain(), loader)


def test_run_without_a_length_is_refused(tmp_path):
    loader = torch.utils.data.DataLoader(make_batches(2), batch_size=None, collate_fn=lambda b: b)
    scheduler = LossScalingScheduler(LinearScalingSchedule("band_gap", 1.0, 2.0, step_frequency="step"))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False, callbacks=[scheduler]
    )
    with pytest.raises(ConfigError, match="no finite number of optimizer steps"):
        trainer.fit(make_task(), loader)
