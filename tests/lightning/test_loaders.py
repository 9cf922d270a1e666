"""Training order as a function of (seed, epoch), DDP sharding, and exact mid-epoch resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from matsciml.lightning import MatSciMLDataModule
from matsciml.lightning.loaders import ResumableDataLoader, ResumableSampler, epoch_permutation, mix_seed


class TinyDataset(Dataset):
    """48 fixed random regression records; a sample carries its index."""

    def __init__(self, n: int = 48) -> None:
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = torch.randn(n, generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index], "idx": index}

    @staticmethod
    def collate_fn(samples: list[dict]) -> dict:
        return {
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.stack([s["y"] for s in samples]),
            "idx": torch.tensor([s["idx"] for s in samples]),
        }


def _epoch(loader: ResumableDataLoader) -> list[list[int]]:
    return [batch["idx"].tolist() for batch in loader]


def _chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


# --------------------------------------------------------------------------- order
def test_epoch_permutation_depends_on_seed_and_epoch_only():
    first = epoch_permutation(30, seed=5, epoch=2)
    assert sorted(first) == list(range(30))
    assert epoch_permutation(30, seed=5, epoch=2) == first
    assert epoch_permutation(30, seed=5, epoch=3) != first
    assert epoch_permutation(30, seed=6, epoch=2) != first
    # (seed, epoch) pairs that a plain sum would confuse
    assert mix_seed(0, 1) != mix_seed(1, 0)
    assert epoch_permutation(30, 0, 1) != epoch_permutation(30, 1, 0)
    assert epoch_permutation(7, 5, 2, shuffle=False) == list(range(7))


def test_epoch_order_does_not_depend_on_history():
    data = TinyDataset(23)
    a = ResumableDataLoader(data, batch_size=4, seed=9, collate_fn=TinyDataset.collate_fn)
    seen = []
    for epoch in range(4):
        a.set_epoch(epoch)
        seen.append(_epoch(a))
    b = ResumableDataLoader(data, batch_size=4, seed=9, collate_fn=TinyDataset.collate_fn)
    b.set_epoch(3)
    assert _epoch(b) == seen[3]
    # independent oracle: the epoch's permutation cut into batches
    assert seen[3] == _chunks(epoch_permutation(23, 9, 3), 4)
    assert seen[2] != seen[3]
    assert sorted(i for batch in seen[3] for i in batch) == list(range(23))
    c = ResumableDataLoader(data, batch_size=4, seed=10, collate_fn=TinyDataset.collate_fn)
    c.set_epoch(3)
    assert _epoch(c) != seen[3]


@pytest.mark.parametrize("n", [10, 11, 13])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_matches_distributed_sampler(n, world, drop_last):
    data = list(range(n))
    # unshuffled: identical to torch's DistributedSampler, padding included
    for rank in range(world):
        ours = ResumableSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(ref)
        assert len(ours) == len(ref)
    # shuffled: the ranks' shares interleave back into the padded permutation of (seed, epoch)
    shares = []
    for rank in range(world):
        sampler = ResumableSampler(data, num_replicas=world, rank=rank, seed=4, drop_last=drop_last)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    per_rank = n // world if drop_last else math.ceil(n / world)
    assert all(len(s) == per_rank for s in shares)
    merged = [shares[k % world][k // world] for k in range(per_rank * world)]
    perm = epoch_permutation(n, 4, 2)
    expected = perm[: per_rank * world] if drop_last else (perm + perm)[: per_rank * world]
    assert merged == expected
    if not drop_last:
        assert set(merged) == set(range(n))  # every index at least once per epoch


def test_two_ranks_cover_every_index_once():
    data = TinyDataset(40)
    batches = {}
    for rank in range(2):
        loader = ResumableDataLoader(
            data, batch_size=4, seed=3, num_replicas=2, rank=rank, collate_fn=TinyDataset.collate_fn
        )
        loader.set_epoch(1)
        batches[rank] = _epoch(loader)
    assert len(batches[0]) == len(batches[1]) == 5
    indices = [i for rank in range(2) for batch in batches[rank] for i in batch]
    assert sorted(indices) == list(range(40))


def test_lightning_keeps_the_sampler_under_ddp(tmp_path):
    """With use_distributed_sampler=True (default), Lightning replaces any sampler that is no DistributedSampler."""
    from torch.utils.data import DataLoader

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", default_root_dir=tmp_path, logger=False)
    connector = trainer._data_connector
    data = TinyDataset(8)
    assert connector._requires_distributed_sampler(DataLoader(data, shuffle=True))  # the oracle: plain loaders
    assert not connector._requires_distributed_sampler(ResumableDataLoader(data, num_replicas=2, rank=1))


def test_data_module_shards_by_trainer_rank():
    class _Progress:
        processed = 3

    class _FakeTrainer:
        distributed_sampler_kwargs = {"num_replicas": 2, "rank": 1}

        class fit_loop:  # noqa: N801
            class epoch_progress:  # noqa: N801
                current = _Progress

            class epoch_loop:  # noqa: N801
                class batch_progress:  # noqa: N801
                    current = _Progress

    dm = MatSciMLDataModule(dataset=TinyDataset(20), batch_size=4, seed=2)
    dm.setup()
    dm.trainer = _FakeTrainer()
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.epoch) == (2, 1, 3)
    assert [i for b in _epoch(loader) for i in b] == epoch_permutation(20, 2, 3)[1::2]


# --------------------------------------------------------------------------- resume without a trainer
@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_mid_epoch(num_workers):
    data = TinyDataset(30)
    kwargs = {"batch_size": 4, "seed": 8, "collate_fn": TinyDataset.collate_fn, "num_workers": num_workers}
    full = ResumableDataLoader(data, **kwargs)
    full.set_epoch(2)
    reference = _epoch(full)
    first = ResumableDataLoader(data, **kwargs)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator)["idx"].tolist() for _ in range(3)]
    state = first.state_dict()
    assert (state["epoch"], state["batches_done"]) == (2, 3)
    second = ResumableDataLoader(data, **kwargs)
    second.load_state_dict(state)
    second.set_epoch(2)  # as Lightning does after loading: same epoch, offset kept
    tail = _epoch(second)
    assert head + tail == reference
    assert _epoch(second) == reference  # the offset applies to one pass only
    # a resume state of another epoch is dropped when the loop moves on
    third = ResumableDataLoader(data, **kwargs)
    third.load_state_dict(state)
    third.set_epoch(3)
    assert _epoch(third) == _chunks(epoch_permutation(30, 8, 3), 4)


def test_changed_settings_warn_on_load():
    data = TinyDataset(30)
    loader = ResumableDataLoader(data, batch_size=4, seed=8, collate_fn=TinyDataset.collate_fn)
    state = loader.state_dict()
    other = ResumableDataLoader(data, batch_size=4, seed=9, collate_fn=TinyDataset.collate_fn)
    with pytest.warns(UserWarning, match="seed: saved 8, now 9"):
        other.load_state_dict(state)


def test_foreign_sampler_disables_state():
    data = TinyDataset(10)
    loader = ResumableDataLoader(data, batch_size=4, sampler=SequentialSampler(data), collate_fn=TinyDataset.collate_fn)
    assert not loader.resumable
    assert loader.state_dict() == {}
    assert [i for b in _epoch(loader) for i in b] == list(range(10))


def test_loader_leaves_global_rng_alone():
    loader = ResumableDataLoader(TinyDataset(10), batch_size=4, collate_fn=TinyDataset.collate_fn)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _epoch(loader)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- resume through Lightning
class Recorder(pl.LightningModule):
    """Linear regression with momentum SGD that records the indices of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(4.0).view(1, 4) / 10)
            self.lin.bias.zero_()
        self.seen: list[list[int]] = []

    def _loss(self, batch: dict) -> torch.Tensor:
        return ((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["idx"].tolist())
        return self._loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


# 48 records, 12 for validation, 36 for training: 8 batches of 5 per epoch (the last holds 1), 3 epochs.
STEPS_PER_EPOCH = 8


def _data_module(num_workers: int = 0, cls: type = MatSciMLDataModule) -> MatSciMLDataModule:
    return cls(dataset=TinyDataset(), val_split=0.25, batch_size=5, seed=11, num_workers=num_workers)


def _trainer(root: Path, callbacks=(), val_check_interval=0.5, **kwargs) -> pl.Trainer:
    if "max_steps" not in kwargs:
        kwargs["max_epochs"] = 3
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_check_interval,
        default_root_dir=root,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kwargs,
    )


def _weights(module: pl.LightningModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 3-epoch run that writes checkpoints of three kinds."""
    root = tmp_path_factory.mktemp("reference")
    callbacks = [
        # on_train_batch_end: steps 4 and 12 are mid-epoch, 8 and 16 the last batch of an epoch
        ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=4, save_top_k=-1, filename="{step}"),
        # on_train_epoch_end
        ModelCheckpoint(
            dirpath=root / "epoch", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1, filename="{step}"
        ),
        # on_validation_end, validation twice per epoch (after batches 4 and 8)
        ModelCheckpoint(dirpath=root / "val", monitor="val_loss", save_top_k=-1, filename="{step}"),
    ]
    module = Recorder()
    _trainer(root, callbacks).fit(module, datamodule=_data_module())
    assert len(module.seen) == 3 * STEPS_PER_EPOCH
    return {"root": root, "seen": module.seen, "weights": _weights(module)}


def test_reference_epochs_follow_seed_and_epoch(reference):
    """Independent oracle for the uninterrupted run: the epoch permutations of the training subset."""
    dm = _data_module()
    dm.setup()
    train_indices = dm.datasets["train"].indices
    for epoch in range(3):
        order = [train_indices[k] for k in epoch_permutation(len(train_indices), 11, epoch)]
        assert reference["seen"][epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH] == _chunks(order, 5)


def _resume_and_compare(reference, ckpt: Path, tmp_path: Path, num_workers: int = 0, **trainer_kwargs) -> None:
    step = torch.load(ckpt, weights_only=True)["global_step"]
    module = Recorder()
    _trainer(tmp_path, **trainer_kwargs).fit(module, datamodule=_data_module(num_workers), ckpt_path=ckpt)
    assert module.seen == reference["seen"][step:]
    for got, want in zip(module.parameters(), reference["weights"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "ckpt",
    [
        "steps/step=4.ckpt",  # mid-epoch, on_train_batch_end
        "steps/step=8.ckpt",  # last batch of epoch 0, on_train_batch_end
        "steps/step=12.ckpt",  # mid-epoch 1
        "epoch/step=8.ckpt",  # epoch end, on_train_epoch_end
        "epoch/step=16.ckpt",
        "val/step=4.ckpt",  # validation in the middle of epoch 0
        "val/step=16.ckpt",  # validation at the end of epoch 1
    ],
)
def test_resume_matches_uninterrupted_run(reference, ckpt, tmp_path):
    _resume_and_compare(reference, reference["root"] / ckpt, tmp_path)


@pytest.mark.parametrize("ckpt", ["steps/step=8.ckpt", "epoch/step=16.ckpt", "val/step=12.ckpt"])
def test_resume_iteration_based_training(reference, ckpt, tmp_path):
    """With max_steps Lightning restarts (and loads the loader state) even from an epoch-end checkpoint."""
    _resume_and_compare(reference, reference["root"] / ckpt, tmp_path, max_steps=3 * STEPS_PER_EPOCH)


def test_resume_with_workers(reference, tmp_path):
    """Two worker processes read ahead; the order and the resume point do not change."""
    for ckpt in ("steps/step=12.ckpt", "epoch/step=8.ckpt"):
        _resume_and_compare(reference, reference["root"] / ckpt, tmp_path, num_workers=2)


class _Crash(Exception):
    pass


class _SaveAndCrash(pl.Callback):
    """Writes a checkpoint at the start of a batch (the loader has handed it out, no step ran) and dies."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise _Crash


class _UnsizedLoader(ResumableDataLoader):
    def __len__(self) -> int:
        raise TypeError("no length")


class _UnsizedDataModule(MatSciMLDataModule):
    """Without a length, Lightning's fetcher prefetches one batch ahead of the training step."""

    def train_dataloader(self) -> ResumableDataLoader:
        loader = super().train_dataloader()
        loader.__class__ = _UnsizedLoader
        return loader


@pytest.mark.parametrize(("step", "unsized"), [(3, False), (13, False), (8, True), (13, True)])
def test_interrupted_run_resumes_exactly(reference, tmp_path, step, unsized):
    """Crash after a checkpoint written while the loader is one (or, prefetching, two) batches ahead."""
    cls = _UnsizedDataModule if unsized else MatSciMLDataModule
    ckpt = tmp_path / "crash.ckpt"
    first = Recorder()
    with pytest.raises(_Crash):
        _trainer(tmp_path, [_SaveAndCrash(step, ckpt)], val_check_interval=4).fit(
            first, datamodule=_data_module(cls=cls)
        )
    assert len(first.seen) == step
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["batches_done"]) == divmod(step, STEPS_PER_EPOCH)
    second = Recorder()
    _trainer(tmp_path, val_check_interval=4).fit(second, datamodule=_data_module(cls=cls), ckpt_path=ckpt)
    assert first.seen + second.seen == reference["seen"]
    for got, want in zip(second.parameters(), reference["weights"]):
        assert torch.equal(got, want)


def test_resume_twice_across_lightning_epoch_jump(reference, tmp_path):
    """Resumed with max_steps from an epoch-end checkpoint, Lightning numbers the next epoch one too high.

    The loader follows the data (the epoch after the saved one) and keeps doing so across a second resume.
    """
    first = tmp_path / "first"
    module = Recorder()
    steps = ModelCheckpoint(dirpath=first, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [steps], max_steps=3 * STEPS_PER_EPOCH).fit(
        module, datamodule=_data_module(), ckpt_path=reference["root"] / "epoch/step=8.ckpt"
    )
    assert module.seen == reference["seen"][STEPS_PER_EPOCH:]
    for ckpt in ("step=14.ckpt", "step=20.ckpt"):
        _resume_and_compare(reference, first / ckpt, tmp_path, max_steps=3 * STEPS_PER_EPOCH)
