"""What the task modules send to the loggers, against sums written out by hand.

The metrics queue each batch and add the queue when read, and ``LightningModule.log`` is
called only when Lightning needs a metric (logging steps, the first update of a metric in
an epoch). The oracle: with ``lr=0`` the weights never move, so every batch's losses and
predictions are those of ``compute_losses`` after the fit; the per-step values at the
logging steps and the epoch values are then written out by hand from them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import RecordingLogger, make_trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _multitask_helpers as mt  # noqa: E402

from matsciml.models.base import MultiTaskLitModule  # noqa: E402
from matsciml.models.tasks.metrics import (  # noqa: E402
    FiniteBinaryAccuracy,
    FiniteMeanAbsoluteError,
    TaskMetrics,
    WeightedMean,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]

EVERY = 3  # log_every_n_steps: logging steps are the global steps s with (s + 1) % 3 == 0


def _loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)


def _fit(module, train: list[dict], val: list[dict], tmp_path) -> RecordingLogger:
    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, logger=logger, log_every_n_steps=EVERY, max_epochs=2)
    trainer.fit(module, _loader(train), _loader(val))
    names = set(trainer.callback_metrics)
    assert {"train_loss", "train_loss_step", "train_loss_epoch", "val_loss"} <= names
    return logger


def _batch_values(module, batches: list[dict], keys: list[str]) -> list[dict]:
    """Per batch, from ``compute_losses`` (the weights are those of the whole fit): the numbers the metrics add."""
    out = []
    with torch.no_grad():
        for batch in batches:
            result = module.compute_losses(batch)
            targets = module._metric_targets(batch, result)
            values = {"loss": float(result["loss"]), "size": result["batch_size"]}
            for key in keys:
                if key not in result["per_key"]:
                    continue
                values[key] = (float(result["per_key"][key]), result["counts"][key])
                pred = result["predictions"][key].double().reshape(-1)
                target = targets[key].double().reshape(-1)
                keep = torch.isfinite(target)
                values[f"{key}_abs"] = (pred[keep] - target[keep]).abs().tolist()
            out.append(values)
    return out


def _epoch_values(values: list[dict], keys: list[str]) -> dict[str, float]:
    """The epoch values written out: batch-size-weighted loss, count-weighted key losses, MAE over every pair."""
    size = sum(v["size"] for v in values)
    out = {"loss": sum(v["loss"] * v["size"] for v in values) / size}
    out["total"] = out["loss"]  # the upstream name of the same number
    for key in keys:
        pairs = [v[key] for v in values if key in v and v[key][1] > 0]
        if pairs:
            out[key] = sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)
        errors = [e for v in values for e in v.get(f"{key}_abs", [])]
        if errors:
            out[f"{key}_mae"] = sum(errors) / len(errors)
    return out


def _step_value(values: dict, name: str) -> float | None:
    if name in ("loss", "total"):
        return values["loss"]
    if name.endswith("_mae"):
        errors = values.get(f"{name[:-4]}_abs", [])
        return sum(errors) / len(errors) if errors else None
    pair = values.get(name)
    return pair[0] if pair and pair[1] > 0 else None


def _check(logger: RecordingLogger, train: list[dict], val: list[dict], keys: list[str], epochs: int = 2) -> None:
    names = ["loss", "total", *keys, *(f"{key}_mae" for key in keys)]
    n = len(train)
    for name in names:
        steps = {s: v for s, v in logger.values(f"train_{name}_step").items()}
        # the module hands a value to log at the first batch of the epoch that has one and at every logging
        # step that has one; at a logging step the logger gets the value last handed over in this epoch
        expected, last = {}, None
        for s in range(epochs * n):
            if s % n == 0:
                last = None
            value = _step_value(train[s % n], name)
            if value is not None and (last is None or (s + 1) % EVERY == 0):
                last = value
            if (s + 1) % EVERY == 0 and last is not None:
                expected[s] = last
        assert sorted(steps) == sorted(expected), name
        for s, value in expected.items():
            assert steps[s] == pytest.approx(value, rel=1e-5), (name, s)
    train_epoch, val_epoch = _epoch_values(train, keys), _epoch_values(val, keys)
    for name in names:
        if name not in train_epoch:
            assert not logger.values(f"train_{name}_epoch"), name
            continue
        logged = list(logger.values(f"train_{name}_epoch").values())
        assert logged == pytest.approx([train_epoch[name]] * epochs, rel=1e-5), name
        logged = list(logger.values(f"val_{name}").values())
        assert logged == pytest.approx([val_epoch[name]] * epochs, rel=1e-5), name


def test_single_task_logs_the_values_of_every_batch(tmp_path):
    """Uneven batches, a missing label, a batch without any z label on a logging step: step and epoch values."""
    samples = mt.samples(31, ("y", "z"), seed=5)
    for i in (4, 13, 14):  # 4: one missing z in batch 1; 13, 14: batch 5 (a logging step) has no z at all
        samples[i]["targets"]["z"] = torch.tensor(float("nan"), dtype=torch.float64)
    sizes, batches, start = [3, 2, 4, 1, 3, 2, 4, 3, 5, 4], [], 0
    for size in sizes:
        batches.append(mt.stack(samples[start : start + size]))
        start += size
    train, val = batches[:7], batches[7:]
    norm = {"y_mean": 0.2, "y_std": 1.5, "z_mean": -0.1, "z_std": 0.7}
    task = mt.scalar_task(["y", "z"], 0, lr=0.0, normalize_kwargs=norm)
    logger = _fit(task, train, val, tmp_path)
    keys = ["y", "z"]
    train_values, val_values = _batch_values(task, train, keys), _batch_values(task, val, keys)
    assert _step_value(train_values[5], "z_mae") is None  # the case is there
    _check(logger, train_values, val_values, keys)


def test_multitask_registers_a_pair_first_seen_between_logging_steps(tmp_path):
    """Pair ``b`` is absent from the first batch of each epoch and from every logging step: its epoch values
    are still logged, over its own batches; ``a`` at the logging steps and per epoch."""
    a = mt.samples(20, ("y",), seed=2)
    b = mt.samples(12, ("u", "v"), seed=3)
    sizes = [(3, 0), (2, 4), (4, 0), (3, 3), (1, 3), (2, 0), (3, 1), (2, 1)]  # the last two: validation
    batches = mt.pair_batches(sizes, a, b)
    train, val = batches[:6], batches[6:]
    first = mt.scalar_task(["y"], 0, lr=0.0, normalize_kwargs={"y_mean": 0.3, "y_std": 2.0})
    second = mt.scalar_task(["u", "v"], 1, lr=0.0, loss_func="L1Loss", normalize_kwargs={"u_std": 1.0, "v_std": 1.0})
    module = MultiTaskLitModule(("a", first), ("b", second), task_scaling=[1.0, 0.3], lr=0.0)
    logger = _fit(module, train, val, tmp_path)
    keys = ["a_y", "b_u", "b_v"]
    _check(logger, _batch_values(module, train, keys), _batch_values(module, val, keys), keys)
    # b never reaches a logging step: its step value is the one of its first batch (1, 7), repeated by Lightning
    assert sorted(logger.values("train_b_u_step")) == [2, 5, 8, 11]
    assert len(logger.values("train_b_u_epoch")) == 2


def test_queued_batches_add_what_updates_one_by_one_add():
    """The deferred metrics: a queue flushed on read equals the sum written out; reset drops the queue."""
    g = torch.Generator().manual_seed(0)
    mean = WeightedMean()
    values = [torch.randn((), generator=g) for _ in range(5)] + [torch.randn(3, generator=g)]
    weights = [3.0, 1.0, 2.0, 4.0, 0.5, 2.0]
    for value, weight in zip(values, weights):
        mean.defer(value, weight)
    total = sum(float(v.sum()) * w for v, w in zip(values, weights))
    weight = sum(w * v.numel() for v, w in zip(values, weights))  # 16.5
    assert float(mean.compute()) == pytest.approx(total / weight, rel=1e-12)
    assert mean._pending == []
    mean.defer(torch.tensor(100.0), 1.0)  # after a read: added on the next read, the cached value is stale
    expected = (total + 100.0) / (weight + 1.0)
    assert float(mean.compute()) == pytest.approx(expected, rel=1e-12)

    mae = FiniteMeanAbsoluteError()
    mae.max_pending = 2  # the third batch triggers a flush of two, the rest waits for compute
    preds = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5]), torch.tensor([4.0, -1.0])]
    targets = [torch.tensor([1.5, float("nan"), 2.0]), torch.tensor([float("inf")]), torch.tensor([3.0, 1.0])]
    for pred, target in zip(preds, targets):
        mae.defer(pred, target)
    assert len(mae._pending) == 1
    assert float(mae.compute()) == pytest.approx((0.5 + 1.0 + 1.0 + 2.0) / 4)

    accuracy = FiniteBinaryAccuracy()
    accuracy.defer(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 1.0, float("nan")]))
    accuracy.defer(torch.tensor([0.1]), torch.tensor([0.0]))
    assert float(accuracy.compute()) == pytest.approx(2 / 3)
    accuracy.defer(torch.tensor([0.9]), torch.tensor([0.0]))
    accuracy.reset()
    assert accuracy._pending == [] and accuracy.update_count == 0


def test_step_values_are_the_batch_alone_and_leave_the_state():
    metrics = TaskMetrics({"y": "regression"})
    result = {
        "loss": torch.tensor(2.0),
        "per_key": {"y": torch.tensor(1.5)},
        "counts": {"y": 2},
        "predictions": {"y": torch.tensor([1.0, 2.0, 3.0])},
        "batch_size": 3,
    }
    first = metrics.update("train", result, {"y": torch.tensor([0.0, float("nan"), 1.0])}, step_values=False)
    assert set(first) == {"train_loss", "train_total", "train_y", "train_y_mae"}  # queued, no value computed
    result["loss"] = torch.tensor(4.0)
    logged = metrics.update("train", result, {"y": torch.tensor([1.0, 2.0, 5.0])}, step_values=True)
    assert float(logged["train_loss"]._forward_cache) == 4.0
    assert float(logged["train_y_mae"]._forward_cache) == pytest.approx(2.0 / 3)
    assert float(metrics.store["train_loss"].compute()) == pytest.approx(3.0)  # (2 * 3 + 4 * 3) / 6
    assert float(metrics.store["train_y_mae"].compute()) == pytest.approx((1.0 + 2.0 + 0.0 + 0.0 + 2.0) / 5)
    nan_batch = metrics.update("train", result, {"y": torch.full((3,), math.nan)}, step_values=True)
    assert "train_y_mae" not in nan_batch and "train_loss" in nan_batch
