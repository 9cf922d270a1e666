"""The runner's data module: validation and test sets split across ranks without repeated structures.

Under a multi-process strategy Lightning gives a plain validation loader a
``DistributedSampler``, which pads the set by repeating its first structures until
every rank has the same number; those repeats enter the validation metrics twice, so the
validation MAE of N processes differs from that of one process on the same data.
:class:`RunnerDataModule` hands Lightning validation and test loaders that already carry
an unpadded sampler (each structure on exactly one rank, ranks differing by at most
one structure); Lightning keeps a loader that has a ``DistributedSampler``. The task's
metrics are sums and counts reduced across ranks at the end of the epoch, so the result
equals the single-process value (up to floating-point summation order). Nothing
synchronises per validation batch (the module's buffers are broadcast at the first
forward pass only), so unequal batch counts are safe.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from matsciml.lightning.datamodule import MatSciMLDataModule

__all__ = ["RunnerDataModule", "unpadded_eval_loader"]


def unpadded_eval_loader(loader: DataLoader, num_replicas: int, rank: int) -> DataLoader:
    """``loader`` over this rank's share of its dataset, in order, with no structure repeated.

    Rank ``r`` reads items ``r, r + num_replicas, ...``. A loader that already has a
    ``DistributedSampler``, a single replica, or a dataset smaller than ``num_replicas``
    (a rank would get no batch and the end-of-epoch reduction would wait for it) is
    returned unchanged; the last case warns that Lightning will pad it.

    Parameters
    ----------
    loader
        An evaluation loader (sequential order).
    num_replicas, rank
        Number of processes and this process's global rank.
    """
    if num_replicas <= 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    dataset = loader.dataset
    if len(dataset) < num_replicas:
        rank_zero_warn(
            f"the evaluation set has {len(dataset)} structures for {num_replicas} processes; Lightning pads it, "
            "so some structures are counted twice in the validation metrics"
        )
        return loader
    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        generator=loader.generator,
        drop_last=False,
    )


class RunnerDataModule(MatSciMLDataModule):
    """:class:`~matsciml.lightning.MatSciMLDataModule` whose validation and test loaders are split without padding.

    Only the loaders Lightning asks for (``val_dataloader``, ``test_dataloader``) are
    split; :meth:`eval_dataloader` still covers the whole set (the runner's summary uses
    it on rank 0). Arguments are those of the parent class.
    """

    def _shard(self, loader: Any) -> Any:
        trainer = self.trainer
        if not isinstance(loader, DataLoader) or trainer is None:
            return loader
        kwargs = trainer.distributed_sampler_kwargs or {}
        return unpadded_eval_loader(loader, int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0)))

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, this rank's unpadded share under several processes."""
        return self._shard(super().val_dataloader())

    def test_dataloader(self) -> DataLoader | list:
        """The test loader, this rank's unpadded share under several processes."""
        return self._shard(super().test_dataloader())
