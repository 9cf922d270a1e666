"""PeriodicDataIteratorCallback: sharding, per-sample gathering, results against hand-computed predictions.

Oracles: ``torch.utils.data.DistributedSampler`` for the shards; a direct forward pass of
the module over the dataset, sample by sample, in file order; the EMA callback's own EMA
weights; a run without the callback (training must be bitwise unchanged); a single-process
pass for the two-process DDP run.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.inference import combine_samples, shard_indices, split_per_sample
from matsciml.lightning.callbacks.data_iterator import PeriodicDataIteratorCallback
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _callback_toys import ToyDataset, ToyTask, make_datamodule, make_trainer  # noqa: E402


def oracle_predictions(net: torch.nn.Module, dataset) -> tuple[list[str], torch.Tensor]:
    """One sample at a time, in file order."""
    ids, preds = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            ids.append(sample["id"])
            preds.append(net(sample["x"][None])[0, 0])
    return ids, torch.stack(preds)


class History(PeriodicDataIteratorCallback):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[tuple[str, int, dict, bool]] = []

    def process_results(self, results, *, trainer, pl_module, interval_type, interval):
        super().process_results(
            results, trainer=trainer, pl_module=pl_module, interval_type=interval_type, interval=interval
        )
        self.history.append((interval_type, interval, results, pl_module.training))


# ---------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_match_distributed_sampler(world):
    for n in range(0, 12):
        data = list(range(n))
        for rank in range(world):
            reference = list(DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)) if n else []
            assert shard_indices(n, world, rank, pad=True) == reference
        unpadded = sorted(i for r in range(world) for i in shard_indices(n, world, r, pad=False))
        assert unpadded == data


def test_split_and_combine():
    out = {
        "e": torch.arange(3.0),
        "f": [torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(4, 3)],
        "id": ["a", "b", "c"],
    }
    items = split_per_sample(out, 3)
    assert items[1]["e"] == 1.0 and items[2]["id"] == "c" and items[2]["f"].shape == (4, 3)
    back = combine_samples(items)
    assert torch.equal(back["e"], out["e"]) and back["id"] == ["a", "b", "c"]
    assert [f.shape[0] for f in back["f"]] == [2, 1, 4]  # different sizes stay a list
    with pytest.raises(ValueError, match="first dimension 3"):
        split_per_sample(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="length 2"):
        split_per_sample(["a", "b"], 3)


# ---------------------------------------------------------------------------- runs
def test_results_in_dataset_order(tmp_path):
    dm = make_datamodule(n=30, test=0.3, batch_size=4)
    callback = History("test", every_n_updates=5, batch_size=3)
    task = ToyTask()
    trainer = make_trainer(tmp_path, [callback], max_steps=5)  # fires once, after the last step
    trainer.fit(task, datamodule=dm)

    assert [(t, i) for t, i, _, _ in callback.history] == [("updates", 5)]
    results = callback.results
    ids, preds = oracle_predictions(task.net, dm.datasets["test"])
    assert results["ids"] == ids and len(ids) == 9
    torch.testing.assert_close(results["y"], preds, rtol=0, atol=1e-6)
    assert callback.history[0][3] is True  # training mode restored before process_results
    assert task.training


def test_uses_ema_weights_and_leaves_training_untouched(tmp_path):
    def run(with_iterator: bool):
        dm = make_datamodule(n=24, test=0.25, batch_size=4)
        ema = ExponentialMovingAverageCallback(decay=0.5, keep_raw_weights_after_fit=True)
        callbacks = [ema] + ([History("test", every_n_epochs=1)] if with_iterator else [])
        task = ToyTask()
        make_trainer(tmp_path / str(with_iterator), callbacks, max_epochs=2).fit(task, datamodule=dm)
        return task, ema, callbacks[-1], dm

    task, ema, callback, dm = run(True)
    reference, _, _, _ = run(False)
    # the raw (trained) weights are bitwise those of a run without the callback
    for a, b in zip(task.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    # at the last epoch end the EMA was final: its weights give the callback's predictions
    ema_net = copy.deepcopy(task.net)
    ema_net.load_state_dict({k.removeprefix("net."): v for k, v in ema.ema_state_dict().items()})
    ids, expected = oracle_predictions(ema_net, dm.datasets["test"])
    assert callback.results["ids"] == ids
    torch.testing.assert_close(callback.results["y"], expected, rtol=0, atol=1e-6)
    _, raw = oracle_predictions(task.net, dm.datasets["test"])
    assert (raw - expected).abs().max() > 1e-3  # the EMA made a difference
    assert [i for _, i, _, _ in callback.history] == [1, 2]


def test_unknown_dataset_names_closest(tmp_path):
    dm = make_datamodule(n=12, test=0.25)
    trainer = make_trainer(tmp_path, [History("tset", every_n_updates=1)], max_steps=2)
    with pytest.raises(ConfigError, match="'test'"):
        trainer.fit(ToyTask(), datamodule=dm)


def test_bad_process_data_is_reported_with_the_callback_name(tmp_path):
    class Bad(PeriodicDataIteratorCallback):
        def process_data(self, batch, predictions):
            return torch.zeros(1)

    from matsciml.lightning.callbacks._base.isolation import CallbackError

    trainer = make_trainer(tmp_path, [Bad("test", every_n_updates=1, batch_size=2)], max_steps=2)
    with pytest.raises(CallbackError, match=r"Bad\.on_train_batch_end .*first dimension 2"):
        trainer.fit(ToyTask(), datamodule=make_datamodule(n=12, test=0.25))


# ---------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "_data_iterator_ddp_worker.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(o["world"] == 2 for o in outs)

    from _data_iterator_ddp_worker import BATCH, TEST_FRACTION, N

    dm = make_datamodule(n=N, test=TEST_FRACTION, batch_size=BATCH)
    dm.setup()
    net = ToyTask().net
    net.load_state_dict({k.removeprefix("net."): v for k, v in outs[0]["weights"].items()})
    ids, expected = oracle_predictions(net, dm.datasets["test"])
    assert len(ids) == 9 and len(set(ids)) == 9
    for out in outs:  # every rank got the full, ordered, de-duplicated results
        assert out["results"]["ids"] == ids
        torch.testing.assert_close(out["results"]["y"], expected, rtol=0, atol=1e-6)
    # 20 training samples, 10 per rank, batches of 2 per rank: 4 samples per step on all ranks
    assert outs[0]["samples"] == outs[1]["samples"] == [12, 20]
    assert len(ToyDataset(N)) == N
