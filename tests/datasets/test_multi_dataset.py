"""MultiDataset / MultiDataModule: tagging, grouping, sampling shares, DDP shares, upstream import paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import _multitask_helpers as helpers  # noqa: E402

from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.datasets.multi_dataset import MultiDataset  # noqa: E402
from matsciml.lightning.data_utils import MatSciMLDataModule, MultiDataModule  # noqa: E402
from matsciml.lightning.loaders import ResumableDataLoader  # noqa: E402


def _joined(sampling="proportional"):
    a = helpers.samples(5, ("y",), seed=0)
    b = helpers.samples(2, ("u",), seed=1)
    return MultiDataset({"a": a, "b": b}, sampling=sampling, collate_fns={"a": helpers.stack, "b": helpers.stack})


def test_items_are_tagged_and_collated_per_dataset():
    joined = _joined()
    assert len(joined) == 7 and joined.locate(5) == ("b", 0) and joined.locate(-1) == ("b", 1)
    assert joined[6]["dataset"] == "b" and joined[6]["id"] == "1-1"
    batch = joined.collate_fn([joined[0], joined[5], joined[3]])
    assert list(batch) == ["a", "b", "batch_size"] and batch["batch_size"] == 3
    assert batch["a"]["ids"] == ["0-0", "0-3"] and batch["b"]["ids"] == ["1-0"]
    assert set(batch["a"]["targets"]) == {"y"} and set(batch["b"]["targets"]) == {"u"}  # no made-up targets
    with pytest.raises(DataError, match="tagged 'c'"):
        joined.collate_fn([{**joined[0], "dataset": "c"}])
    with pytest.raises(IndexError):
        joined[7]


def test_balanced_shares_and_argument_errors():
    joined = _joined("balanced")
    assert len(joined) == 10
    assert [joined.locate(i) for i in range(5, 10)] == [("b", 0), ("b", 1), ("b", 0), ("b", 1), ("b", 0)]
    with pytest.raises(ConfigError, match="did you mean 'balanced'"):
        MultiDataset({"a": [1]}, sampling="balance")
    with pytest.raises(ConfigError, match="batch key"):
        MultiDataset({"batch_size": [1]})
    with pytest.raises(ConfigError, match="empty"):
        MultiDataset({"a": []})
    with pytest.raises(ConfigError, match="need names"):
        MultiDataset([[1], [2]])


def test_two_ranks_share_an_epoch_and_resume_skips_done_batches():
    """The resumable loader over a MultiDataset: rank shares partition the epoch (padded as DistributedSampler)."""
    joined = _joined("balanced")
    seen = []
    for rank in (0, 1):
        loader = ResumableDataLoader(
            joined, batch_size=2, seed=3, num_replicas=2, rank=rank, collate_fn=joined.collate_fn
        )
        loader.set_epoch(1)
        for batch in loader:
            for name in ("a", "b"):
                seen += [(name, i) for i in batch.get(name, {}).get("ids", [])]
    assert len(seen) == 10
    expected = sorted((joined.locate(i)[0], joined[i]["id"]) for i in range(10))
    assert sorted(seen) == expected
    # resume after one batch: the rest of the epoch, identical to an uninterrupted pass
    full = ResumableDataLoader(joined, batch_size=3, seed=3, collate_fn=joined.collate_fn)
    full.set_epoch(0)
    batches = list(full)
    resumed = ResumableDataLoader(joined, batch_size=3, seed=3, collate_fn=joined.collate_fn)
    resumed.load_state_dict({**full.state_dict(), "batches_done": 1, "epoch": 0, "requested_epoch": 0})
    resumed.set_epoch(0)
    rest = list(resumed)
    assert len(rest) == len(batches) - 1
    for got, ref in zip(rest, batches[1:]):
        assert got.keys() == ref.keys()
        for name in ("a", "b"):
            if name in ref:
                assert torch.equal(got[name]["features"], ref[name]["features"])


def test_datamodule_joins_each_datasets_own_splits():
    a = MatSciMLDataModule(
        dataset=helpers.samples(20, ("y",), seed=0), val_split=0.25, seed=1, collate_fn=helpers.stack
    )
    b = MatSciMLDataModule(dataset=helpers.samples(8, ("u",), seed=1), val_split=0.25, seed=2, collate_fn=helpers.stack)
    dm = MultiDataModule(datamodules={"a": a, "b": b}, batch_size=4)
    dm.setup()
    assert dm.dataset_names == ["a", "b"]
    assert list(dm.datasets["val"].datasets[0].indices) == list(a.datasets["val"].indices)  # a's own seeded split
    assert dm.split_of("b", "train") is b.datasets["train"]
    batches = list(dm.val_dataloader())
    assert sum(b["batch_size"] for b in batches) == 5 + 2
    with pytest.raises(ConfigError, match="either datamodules or"):
        MultiDataModule(datamodules={"a": a}, train_dataset=_joined())
    with pytest.raises(ConfigError, match="no data"):
        MultiDataModule()
    upstream = MultiDataModule(train_dataset=_joined(), val_dataset=_joined(), batch_size=3, sampling="balanced")
    upstream.setup()
    assert len(upstream.datasets["train"]) == 10 and len(upstream.datasets["val"]) == 7
