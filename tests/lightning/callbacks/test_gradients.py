"""Tests of GradientCheckCallback, MonitorGradients and ManualGradientClip.

Oracles: weights recorded before and after every optimizer step (a skipped step must leave
them bitwise equal, under AdamW with weight decay and SGD with momentum); an AdamW step on
zeroed gradients (which does move the weights: why gradients are set to ``None``);
gradient norms recomputed by hand with ``torch.linalg.vector_norm`` over concatenated
gradients; ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` applied to copies of
the gradients.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.grads import (
    OptimizerParameters,
    batch_ids,
    combine_norms,
    id_source,
    ids_of,
    skip_optimizer_step,
    tensor_norms,
    total_norm,
)
from matsciml.lightning.callbacks.gradients import (
    GradientCheckCallback,
    ManualGradientClip,
    MonitorGradients,
    TrainingFaultError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_models import (  # noqa: E402
    TinyTask,
    WeightRecorder,
    column,
    fit,
    loader,
    make_batches,
    read_csv,
    trainer,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class GradRecorder(Callback):
    """Copies of every parameter's gradient in ``on_before_optimizer_step`` (where it sits in the list)."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }


# ----------------------------------------------------------------------------- helpers
def test_skip_leaves_adamw_weights_unchanged_where_zeroed_gradients_do_not():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    opt = torch.optim.AdamW(weights, lr=0.1, weight_decay=0.5)
    for w in weights:
        w.grad = torch.randn(4)
    opt.step()  # builds momentum
    before = [w.detach().clone() for w in weights]
    for w in weights:
        w.grad = torch.zeros(4)
    opt.step()
    assert not torch.equal(weights[0], before[0])  # zeroed gradients still move the weights (decay, momentum)
    before = [w.detach().clone() for w in weights]
    state = {k: v.clone() for k, v in opt.state[weights[0]].items()}
    for w in weights:
        w.grad = torch.randn(4)
    skip_optimizer_step(opt)
    opt.step()
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    assert all(torch.equal(opt.state[weights[0]][k], v) for k, v in state.items())


def test_tensor_norms_and_batch_ids():
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.randn(2, 2)]
    expected = torch.tensor([float(torch.linalg.vector_norm(t)) for t in tensors])
    torch.testing.assert_close(tensor_norms(tensors), expected)
    assert batch_ids({"ids": ["a", "b"]}) == ["a", "b"]
    assert batch_ids({"graph": None}) == [] and batch_ids(torch.zeros(2)) == []
    assert ids_of(id_source({"ids": ["a", 3]}), id_source({"x": 1}), id_source({"ids": ("c",)})) == ["a", "3", "c"]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_total_norm_equals_the_norm_of_the_concatenation(norm_type, monkeypatch):
    """Concatenated (small, CPU), per-tensor norms (larger) and a mixed list: the norm of all elements as one vector."""
    from matsciml.lightning.callbacks._utils import grads

    g = torch.Generator().manual_seed(1)
    same = [torch.randn(s, generator=g) for s in [(3, 4), (5,), (2, 2, 2)]]
    same += [torch.randn(4, 3, generator=g).t(), torch.randn((), generator=g)]  # not contiguous, 0-d
    mixed = [*same, torch.randn(4, generator=g, dtype=torch.float64)]
    for tensors in (same, mixed):
        expected = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors]), norm_type)
        torch.testing.assert_close(total_norm(tensors, norm_type).double(), expected, rtol=1e-6, atol=0)
        monkeypatch.setattr(grads, "CONCAT_LIMIT", 10)  # the per-tensor path
        torch.testing.assert_close(total_norm(tensors, norm_type).double(), expected, rtol=1e-6, atol=0)
        monkeypatch.undo()
    nan = [torch.tensor([1.0, float("nan")]), torch.ones(3)]
    assert torch.isnan(total_norm(nan)) and float(total_norm([])) == 0.0


def test_optimizer_parameters_are_listed_again_when_the_groups_change():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimizer = torch.optim.SGD([{"params": [a, b]}], lr=0.1)
    listed = OptimizerParameters()
    assert listed(optimizer) == [a, b] and listed(optimizer) is listed(optimizer)
    optimizer.add_param_group({"params": [c]})
    assert listed(optimizer) == [a, b, c]
    optimizer.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(1)))  # one more in a group
    assert len(listed(optimizer)) == 4
    assert listed(torch.optim.SGD([c], lr=0.1)) == [c]


# ----------------------------------------------------------------------------- GradientCheckCallback
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_explosion_is_skipped_with_weights_bitwise_unchanged(tmp_path, optimizer):
    torch.manual_seed(0)
    task = TinyTask(weight_decay=0.1, explode_at_step=3, optimizer=optimizer)
    check = GradientCheckCallback(thres=1e4)
    recorder = WeightRecorder()
    caught = fit(task, make_batches(6), tmp_path, [recorder, check], max_steps=6)
    assert check.skipped_steps == 1
    assert [r["step"] for r in check.skipped] == [3]
    assert check.skipped[0]["ids"] == [f"b3-s{j}" for j in range(4)]
    assert check.skipped[0]["norm"] > 1e4
    for name, value in recorder.before[3].items():
        assert torch.equal(recorder.after[3][name], value), name
    moved = [n for n, v in recorder.before[4].items() if not torch.equal(recorder.after[4][n], v)]
    assert moved  # training goes on after the skipped step
    (message,) = [str(w.message) for w in caught]
    assert "step 3" in message and "b3-s0" in message and "b3-s3" in message and "exceeds thres=10000" in message


def test_nonfinite_gradient_is_skipped_and_logged(tmp_path):
    torch.manual_seed(0)
    task = TinyTask(weight_decay=0.1, explode_at_step=2, explode_factor=math.inf)
    check = GradientCheckCallback()
    recorder = WeightRecorder()
    logger = CSVLogger(tmp_path, name="csv")
    fit(task, make_batches(5), tmp_path, [recorder, check], max_steps=5, logger=logger)
    assert check.skipped_steps == 1 and not math.isfinite(check.skipped[0]["norm"])
    assert all(torch.equal(recorder.after[2][n], v) for n, v in recorder.before[2].items())
    assert all(torch.isfinite(v).all() for v in recorder.after[4].values())
    skipped = column(read_csv(tmp_path), "skipped_steps")
    assert skipped[2] == 1.0 and skipped[1] == 0.0 and skipped[4] == 1.0


def test_healthy_run_skips_nothing_and_warns_nothing(tmp_path):
    torch.manual_seed(0)
    check = GradientCheckCallback(relative_thres=50.0, min_history=3)
    assert fit(TinyTask(), make_batches(8), tmp_path, [check], max_steps=8) == []
    assert check.skipped_steps == 0 and len(check._norms) == 8


def test_relative_threshold_and_state_round_trip(tmp_path):
    torch.manual_seed(0)
    task = TinyTask(explode_at_step=6, explode_factor=1e4)
    check = GradientCheckCallback(thres=1e12, relative_thres=100.0, min_history=4)
    caught = fit(task, make_batches(8), tmp_path, [check], max_steps=8)
    assert [r["step"] for r in check.skipped] == [6]
    assert "x the median" in str(caught[0].message)
    other = GradientCheckCallback()
    other.load_state_dict(check.state_dict())
    assert other.skipped_steps == 1 and list(other._norms) == list(check._norms)


def test_too_many_consecutive_skips_raise_and_num_steps_limits_the_check(tmp_path):
    torch.manual_seed(0)
    task = TinyTask(weight_decay=0.1)
    start = {k: v.clone() for k, v in task.state_dict().items()}
    check = GradientCheckCallback(thres=1e-9, max_consecutive_skips=3)
    with pytest.raises(TrainingFaultError, match="3 optimizer steps in a row"):
        fit(task, make_batches(6), tmp_path, [check], max_steps=6)
    assert all(torch.equal(task.state_dict()[k], v) for k, v in start.items())
    limited = GradientCheckCallback(thres=1e-9, num_steps=2, max_consecutive_skips=None)
    fit(TinyTask(), make_batches(5), tmp_path, [limited], max_steps=5)
    assert limited.skipped_steps == 2 and [r["step"] for r in limited.skipped] == [0, 1]


def test_gradient_check_config_errors():
    for kwargs in ({"thres": 0}, {"relative_thres": 0.5}, {"num_steps": -3}, {"max_consecutive_skips": 0}):
        with pytest.raises(ConfigError):
            GradientCheckCallback(**kwargs)
    with pytest.warns(UserWarning, match="lower bound"):
        GradientCheckCallback(thres=1e-2).setup(None, None, "fit")


# ----------------------------------------------------------------------------- MonitorGradients
def test_monitor_gradients_logs_module_norms_equal_to_hand_computation(tmp_path):
    torch.manual_seed(0)
    recorder = GradRecorder()
    monitor = MonitorGradients(every_n_steps=2)
    check = GradientCheckCallback()
    logger = CSVLogger(tmp_path, name="csv")
    # the recorder and the monitor see the same gradient; GradientCheck comes last
    fit(TinyTask(), make_batches(6), tmp_path, [recorder, monitor, check], max_steps=6, logger=logger)
    rows = read_csv(tmp_path)
    for name in ("grad_norm/total", "grad_norm/encoder", "grad_norm/output_heads", "skipped_steps"):
        assert column(rows, name), f"{name} missing from metrics.csv"
    for group in ("total", "encoder", "output_heads"):
        logged = column(rows, f"grad_norm/{group}")
        assert sorted(logged) == [0, 2, 4]
        for step, value in logged.items():
            grads = recorder.grads[step]
            picked = [g.flatten() for n, g in grads.items() if group == "total" or n.startswith(group + ".")]
            expected = float(torch.linalg.vector_norm(torch.cat(picked)))
            assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_group_norms_equal_the_norm_of_each_group(norm_type):
    norms = torch.tensor([3.0, 4.0, 1.0, 2.0, 0.5])
    names = ["encoder.a.weight", "heads.b.bias", "encoder.c.weight", "heads.b.weight", "scale"]
    monitor = MonitorGradients(norm_type=norm_type)
    keys, index = monitor._groups(names, norms.device)
    assert keys == ["total", "encoder", "heads", "<root>"]
    expected = [combine_norms(norms, norm_type)] + [
        combine_norms(
            norms[[i for i, n in enumerate(names) if g == (n.split(".")[0] if "." in n else "<root>")]], norm_type
        )
        for g in keys[1:]
    ]
    torch.testing.assert_close(monitor._group_norms(norms, index, len(keys) - 1), torch.stack(expected))


def test_monitor_gradients_depth_two_and_upstream_name(tmp_path):
    torch.manual_seed(0)
    monitor = MonitorGradients(step_frequency=1, depth=2)
    assert monitor.every_n_steps == 1
    fit(TinyTask(), make_batches(2), tmp_path, [monitor], max_steps=2)
    assert {"grad_norm/encoder.species", "grad_norm/encoder.mlp", "grad_norm/output_heads.energy"} <= set(monitor.last)
    with pytest.raises(ConfigError, match="disagree"):
        MonitorGradients(step_frequency=5, every_n_steps=10)


def test_monitor_gradients_warns_when_the_gradient_repeats(tmp_path):
    torch.manual_seed(0)
    same = make_batches(1) * 4
    caught = fit(TinyTask(lr=0.0), same, tmp_path, [MonitorGradients(every_n_steps=1)], max_steps=4)
    assert caught and "equals that of step 0" in str(caught[0].message)
    assert fit(TinyTask(lr=0.0), make_batches(4), tmp_path, [MonitorGradients(every_n_steps=1)], max_steps=4) == []


# ----------------------------------------------------------------------------- ManualGradientClip
class AfterClip(Callback):
    def __init__(self, clip: ManualGradientClip) -> None:
        self.clip = clip
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.norms: dict[int, torch.Tensor | None] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads[trainer.global_step] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}
        self.norms[trainer.global_step] = self.clip.last_total_norm


@pytest.mark.parametrize("algorithm,value", [("norm", 0.05), ("value", 0.01)])
def test_manual_clip_equals_torch_clipping(tmp_path, algorithm, value):
    torch.manual_seed(0)
    clip = ManualGradientClip(value=value, algorithm=algorithm)
    before, after = GradRecorder(), AfterClip(clip)
    fit(TinyTask(), make_batches(3), tmp_path, [before, clip, after], max_steps=3)
    for step in range(3):
        names = list(before.grads[step])
        copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in before.grads[step].values()]
        for p, g in zip(copies, before.grads[step].values()):
            p.grad = g.clone()
        if algorithm == "norm":
            total = torch.nn.utils.clip_grad_norm_(copies, value)
            assert total > value  # the clip did something
            torch.testing.assert_close(after.norms[step], total)
            # joint clipping keeps the direction: one common factor value / (total + 1e-6)
            scale = value / (float(total) + 1e-6)
            for n in names:
                torch.testing.assert_close(after.grads[step][n], before.grads[step][n] * scale)
        else:
            torch.nn.utils.clip_grad_value_(copies, value)
        for n, p in zip(names, copies):
            assert torch.equal(after.grads[step][n], p.grad), n


def test_manual_clip_config_errors_and_double_clipping_warning(tmp_path):
    with pytest.raises(ConfigError):
        ManualGradientClip(1.0, algorithm="l1")
    with pytest.raises(ConfigError):
        ManualGradientClip(0.0)
    with pytest.raises(ConfigError, match="unknown argument"):
        ManualGradientClip(1.0, max_norm_typo=2)
    ManualGradientClip(1.0, error_if_nonfinite=True)
    with pytest.warns(UserWarning, match="both clip"):
        trainer(tmp_path, [ManualGradientClip(1.0)], max_steps=1, gradient_clip_val=1.0).fit(
            TinyTask(), loader(make_batches(1))
        )
