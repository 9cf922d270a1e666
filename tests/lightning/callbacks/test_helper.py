"""Tests of TrainingHelperCallback.

Oracles: weight norms recomputed in float64 from the module's parameters; real OQMD
crystals (``tests/data/oqmd_devset.extxyz``) written once with Cartesian positions
(must pass) and once with their fractional coordinates in place of Cartesian ones (the
upstream loader's mistake: must be flagged); synthetic crystals when the data folder is
absent; an encoder that returns one constant vector (collapse by construction).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import TrainingDynamicsWarning
from matsciml.lightning.callbacks.helper import (
    TrainingHelperCallback,
    embedding_statistics,
    fractional_coordinate_structures,
)
from matsciml.models.tasks import ScalarRegressionTask

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import (  # noqa: E402
    DATA,
    PlainModule,
    TinyEncoder,
    TinyTask,
    collate,
    column,
    fit,
    make_batches,
    oqmd_batches,
    read_csv,
    structure,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def messages(caught) -> list[str]:
    return [str(w.message) for w in caught]


def test_healthy_run_is_silent_and_logs_its_numbers(tmp_path):
    torch.manual_seed(0)
    helper = TrainingHelperCallback(update_freq=2)
    logger = CSVLogger(tmp_path, name="csv")
    assert fit(TinyTask(), make_batches(6), tmp_path, [helper], max_steps=6, logger=logger) == []
    rows = read_csv(tmp_path)
    for name in ("embeddings/system_spread", "embeddings/point_median_abs", "param_norm/encoder", "grad/small_count"):
        assert sorted(column(rows, name)) == [0, 2, 4], name
    assert [s for s, _, _ in helper.param_norm_history] == [0, 2, 4]


def test_real_task_healthy_run_is_silent(tmp_path):
    torch.manual_seed(0)
    task = ScalarRegressionTask(encoder=TinyEncoder(), task_keys=["energy"], lr=1e-3)
    helper = TrainingHelperCallback(update_freq=1)
    assert fit(task, make_batches(4), tmp_path, [helper], max_steps=4) == []
    assert len(helper.param_norm_history) == 4


def test_frozen_encoder_feeding_a_huge_head_gives_both_norms(tmp_path):
    torch.manual_seed(0)
    task = TinyTask(frozen_encoder=True, head_scale=1e3)
    enc = [p.detach().double() for p in task.encoder.parameters()]
    heads = [p.detach().double() for p in task.output_heads.parameters()]
    enc_l2 = math.sqrt(sum(float(p.pow(2).sum()) for p in enc))
    heads_l2 = math.sqrt(sum(float(p.pow(2).sum()) for p in heads))
    enc_rms = enc_l2 / math.sqrt(sum(p.numel() for p in enc))
    heads_rms = heads_l2 / math.sqrt(sum(p.numel() for p in heads))
    caught = fit(task, make_batches(2), tmp_path, [TrainingHelperCallback(update_freq=10)], max_steps=2)
    (message,) = [m for m in messages(caught) if "output-head weights" in m]
    assert "step 0" in message
    for number in (heads_rms, enc_rms, heads_l2, enc_l2):
        assert f"{number:.3e}" in message
    assert f"ratio {heads_rms / enc_rms:.3g}" in message


def test_constant_embedding_is_reported_as_collapse(tmp_path):
    torch.manual_seed(0)
    caught = fit(TinyTask(constant=True), make_batches(2), tmp_path, [TrainingHelperCallback()], max_steps=2)
    collapse = [m for m in messages(caught) if "collapsed" in m]
    assert len(collapse) == 2
    assert any(m.startswith("TrainingHelperCallback: step 0: graph-level") for m in collapse)
    assert any("node-level" in m and "spread" in m and "0.000e+00" in m for m in collapse)


def test_collapse_needs_inputs_that_differ():
    values = torch.ones(4, 3)
    median, spread = embedding_statistics(values)
    assert float(median) == 1.0 and float(spread) == 0.0
    same = [structure(torch.rand(2, 3) * 4, torch.tensor([13, 13]), 4 * torch.eye(3)) for _ in range(3)]
    batch = collate(same, ["a", "b", "c"], torch.zeros(3))
    helper = TrainingHelperCallback()
    helper._graph = batch["graph"]
    from matsciml.lightning.callbacks.helper import _composition_differs

    assert _composition_differs(batch["graph"]) == (False, False)


def test_exploding_embeddings_and_small_gradients_are_reported_with_numbers(tmp_path):
    torch.manual_seed(0)
    task = TinyTask()
    with torch.no_grad():
        task.encoder.mlp[2].weight.mul_(1e4)
        task.encoder.mlp[2].bias.mul_(1e4)
    helper = TrainingHelperCallback(small_grad_thres=1e9, small_grad_mode="absolute", update_freq=10)
    found = messages(fit(task, make_batches(1), tmp_path, [helper], max_steps=1))
    (magnitude,) = [m for m in found if "graph-level embeddings have a median" in m]
    assert "> 100" in magnitude
    (small,) = [m for m in found if "below small_grad_thres=1e+09" in m]
    assert "encoder.species.weight (" in small and "median over all parameters" in small


def test_relative_small_gradients_name_the_slow_layer_with_its_norm(tmp_path):
    torch.manual_seed(0)
    task = TinyTask()
    weight = task.output_heads["energy"][0].weight
    weight.register_hook(lambda g: g * 1e-6)  # a layer that barely learns
    caught = fit(task, make_batches(1), tmp_path, [TrainingHelperCallback()], max_steps=1)
    (message,) = messages(caught)
    assert "1 parameter(s) have a gradient norm below 0.001 x the median" in message
    assert f"output_heads.energy.0.weight ({float(weight.grad.norm()):.2e})" in message  # the step's gradient


def test_missing_gradients_on_a_plain_module(tmp_path):
    torch.manual_seed(0)
    caught = fit(PlainModule(), make_batches(2), tmp_path, [TrainingHelperCallback()], max_steps=2, everything=True)
    assert sum("embedding and encoder/head weight checks are off" in m for m in messages(caught)) == 1
    (message,) = [str(w.message) for w in caught if issubclass(w.category, TrainingDynamicsWarning)]
    assert "2 trainable parameter(s) have no gradient: unused.weight, unused.bias" in message


@pytest.fixture(scope="module")
def crystals():
    """``(Cartesian batches, fractional batches)``: OQMD from tests/data, else synthetic."""
    if (DATA / "oqmd_devset.extxyz").exists():
        return oqmd_batches(fractional=False), oqmd_batches(fractional=True)
    gen = torch.Generator().manual_seed(3)
    cart, frac = [], []
    for b in range(2):
        graphs_c, graphs_f, ids = [], [], []
        for j in range(6):
            cell = (3.0 + 3 * torch.rand(3, generator=gen)).diag()
            scaled = torch.rand(4, 3, generator=gen)
            numbers = torch.randint(1, 30, (4,), generator=gen)
            graphs_c.append(structure(scaled @ cell, numbers, cell))
            graphs_f.append(structure(scaled, numbers, cell))
            ids.append(f"synthetic-{b}-{j}")
        cart.append(collate(graphs_c, ids, torch.zeros(6)))
        frac.append(collate(graphs_f, ids, torch.zeros(6)))
    return cart, frac


def test_fractional_coordinates_are_flagged_and_cartesian_ones_are_not(tmp_path, crystals):
    cartesian, fractional = crystals
    for batch in cartesian:
        flagged, eligible, *_ = fractional_coordinate_structures(batch["graph"])
        assert not flagged.any() and eligible.all()
    flagged, eligible, lo, hi, cell_min = fractional_coordinate_structures(fractional[0]["graph"])
    assert flagged.all()
    graph = fractional[0]["graph"]
    for g in range(graph.num_graphs):  # independent per-structure numbers
        pos = graph.pos[graph.batch == g]
        assert float(lo[g]) == float(pos.min()) and float(hi[g]) == float(pos.max())
        assert float(cell_min[g]) == pytest.approx(float(np.linalg.norm(graph.cell[g].numpy(), axis=1).min()))
    torch.manual_seed(0)
    helper = TrainingHelperCallback(update_freq=1)
    caught = fit(TinyTask(), fractional, tmp_path, [helper], max_steps=2)
    found = [m for m in messages(caught) if "fractional coordinates" in m]
    assert len(found) == 1  # rate-limited: once for two checked steps
    n = graph.num_graphs
    assert f"{n} of {n} structures" in found[0] and fractional[0]["ids"][0] in found[0]
    torch.manual_seed(0)
    caught = fit(TinyTask(), cartesian, tmp_path, [TrainingHelperCallback(update_freq=1)], max_steps=2)
    assert not [m for m in messages(caught) if "fractional" in m]


def test_histograms_go_to_files_without_a_histogram_logger(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="csv")
    batches = make_batches(1)
    fit(TinyTask(), batches, tmp_path, [TrainingHelperCallback(update_freq=1)], max_steps=1, logger=logger)
    figures = Path(logger.log_dir) / "figures"
    system = np.load(figures / "embeddings_system_step0.npz")
    assert system["counts"].sum() == 4 * 8  # 4 structures x 8 dimensions
    point = np.load(figures / "embeddings_point_step0.npz")
    assert point["counts"].sum() == batches[0]["graph"].num_nodes * 8
    assert (figures / "grad_norms_step0.npz").exists()


def test_config_errors():
    with pytest.raises(ConfigError):
        TrainingHelperCallback(update_freq=0)
    with pytest.raises(ConfigError):
        TrainingHelperCallback(small_grad_thres=-1.0)
    with pytest.raises(ConfigError):
        TrainingHelperCallback(histogram_every_n_steps=-1)
