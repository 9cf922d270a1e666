"""A training loader whose order is a function of (seed, epoch) and that resumes mid-epoch.

Two pieces:

* :class:`ResumableSampler` draws the order of one epoch from a generator seeded
  with ``(seed, epoch)`` only (:func:`epoch_permutation`), pads it to a multiple of
  the number of ranks exactly like :class:`torch.utils.data.DistributedSampler` and
  hands each rank its strided share. It can start an epoch part-way through.
* :class:`ResumableDataLoader` is a :class:`torch.utils.data.DataLoader` with
  ``state_dict()`` / ``load_state_dict()``. Lightning (2.x) finds these methods on
  the training loader, stores ``state_dict()`` in the checkpoint under
  ``loops.fit_loop.state_dict.combined_loader`` and, when it resumes an unfinished
  epoch, calls ``load_state_dict()`` before it asks the loader for an iterator. The
  loader then skips the batches the interrupted run had already trained on, without
  reading them.

The state counts the batches the *training loop* has finished, not the batches the
loader produced: worker processes read ahead, and a data fetcher that prefetches
(Lightning does for training loaders without a length) holds one batch the loop has
not seen yet. When a trainer is attached (:meth:`ResumableDataLoader.attach_trainer`,
done by :class:`~matsciml.lightning.MatSciMLDataModule`), the count is the smaller of
the batches handed out and the fit loop's processed-batch counter, so a checkpoint
written at any point of a step (batch start or end, during validation, at epoch end,
from a requeue signal) resumes at the first batch whose step had not finished.

The iterator starts the underlying DataLoader iterator at its first ``next``, not when
it is created: on resume Lightning creates the iterator *before* it calls
``set_epoch``, and worker processes pull indices as soon as their iterator exists.

The epoch of a pass follows the data, not only the number given to ``set_epoch``. The
state records both the epoch of the order and the number the loop gave for it; after
a resume, a pass that the loop numbers like the saved one continues the saved epoch,
and any later number starts the epoch after it, keeping the difference from then on.
This matters in Lightning 2.6 for ``max_steps`` runs resumed from a checkpoint written
in ``on_train_epoch_end``: the fit loop then counts that epoch twice and passes a
number one too high to ``set_epoch`` for every later epoch.

Example::

    loader = ResumableDataLoader(dataset, batch_size=32, seed=7)
    for epoch in range(3):
        loader.set_epoch(epoch)  # Lightning does this itself
        for batch in loader:
            ...
    state = loader.state_dict()  # {"epoch": 2, "batches_done": ..., ...}
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

__all__ = ["epoch_permutation", "mix_seed", "ResumableSampler", "ResumableDataLoader"]

_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, epoch: int) -> int:
    """Combine ``seed`` and ``epoch`` into one 63-bit generator seed.

    Unlike ``seed + epoch`` (used by :class:`~torch.utils.data.DistributedSampler`),
    different pairs do not collide in practice: ``(0, 1)`` and ``(1, 0)`` give
    unrelated orders.

    Parameters
    ----------
    seed
        The run's seed (any Python int; negative values are allowed).
    epoch
        Epoch number, ``>= 0``.
    """
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    # splitmix64 finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def epoch_permutation(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of one epoch over ``num_items`` items: a pure function of its arguments.

    Parameters
    ----------
    num_items
        Number of items in the dataset.
    seed, epoch
        Seed of the run and epoch number; ``torch.randperm`` draws from a
        ``torch.Generator`` seeded with :func:`mix_seed` ``(seed, epoch)``.
    shuffle
        ``False`` gives ``0, 1, ..., num_items - 1``.

    Returns
    -------
    list[int]
        A permutation of ``range(num_items)``.
    """
    if not shuffle:
        return list(range(num_items))
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


class ResumableSampler(DistributedSampler):
    """Per-rank share of an epoch order that depends on ``(seed, epoch)`` only.

    The full order is :func:`epoch_permutation`; it is padded (by repeating its
    start) or cut (``drop_last=True``) to a multiple of ``num_replicas``, as
    :class:`~torch.utils.data.DistributedSampler` does, and rank ``r`` takes
    positions ``r, r + num_replicas, ...``. With one replica it is simply the
    permutation. The order used is that of ``epoch = requested_epoch +
    epoch_offset``, where ``requested_epoch`` is the number last given to
    :meth:`set_epoch` and ``epoch_offset`` (normally 0) is set by
    :class:`ResumableDataLoader` on resume.

    Because the class derives from ``DistributedSampler``, Lightning never swaps it
    for its own distributed sampler, whatever ``Trainer(use_distributed_sampler=...)``
    says: the sampler does the sharding.

    Parameters
    ----------
    dataset
        A sized dataset (only ``len`` is used).
    num_replicas
        Number of ranks (processes) sharing the epoch, default 1.
    rank
        This process' rank in ``[0, num_replicas)``, default 0.
    shuffle
        Shuffle each epoch (default ``True``); ``False`` gives file order.
    seed
        Seed of the order, default 0. Must be equal on all ranks.
    drop_last
        Cut the order to a multiple of ``num_replicas`` instead of padding it.

    Raises
    ------
    ValueError
        ``rank`` outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=int(num_replicas),
            rank=int(rank),
            shuffle=shuffle,
            seed=int(seed),
            drop_last=drop_last,
        )
        self.start = 0  # position (in this rank's share) where the next iteration begins
        self.requested_epoch = 0  # the number last given to set_epoch
        self.epoch_offset = 0  # epoch used for the order minus requested_epoch (see ResumableDataLoader)

    def shard(self, epoch: int | None = None) -> list[int]:
        """This rank's full share of the order of ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = epoch_permutation(len(self.dataset), self.seed, epoch, self.shuffle)
        if self.drop_last:
            order = order[: self.total_size]
        elif order:
            while len(order) < self.total_size:
                order += order[: self.total_size - len(order)]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0  # an offset applies to one iteration only
        return iter(self.shard()[start:])

    def __len__(self) -> int:
        """Length of this rank's full share (an iteration started part-way yields fewer)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (``epoch + epoch_offset``)."""
        self.requested_epoch = int(epoch)
        self.epoch = self.requested_epoch + self.epoch_offset


class _TrainerProgress:
    """Reads how many training batches of the current epoch the fit loop has processed."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)

    def __call__(self) -> int | None:
        trainer = self._trainer()
        if trainer is None:
            return None
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except AttributeError:
            return None


class _ResumableIterator(Iterator):
    """Starts the underlying DataLoader iterator at the first ``next`` and counts batches.

    Lightning asks for the iterator before it calls ``set_epoch`` when it resumes, and
    worker processes pull indices from the sampler as soon as their iterator exists;
    starting lazily makes the epoch the one set last before the first batch.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._inner: Iterator | None = None

    def __iter__(self) -> _ResumableIterator:
        return self

    def __next__(self) -> Any:
        loader = self._loader
        if self._inner is None:
            self._inner = loader._start_pass()
        try:
            batch = next(self._inner)
        except StopIteration:
            loader._pass_finished()
            raise
        loader._yielded += 1
        if loader._yielded == loader._pass_length:  # the last batch (Lightning stops without asking for more)
            loader._pass_finished()
        return batch


class ResumableDataLoader(DataLoader):
    """DataLoader over a :class:`ResumableSampler` with ``state_dict`` / ``load_state_dict``.

    The order of epoch ``e`` is a function of ``(seed, e)`` only; the loop sets the
    epoch with :meth:`set_epoch` (Lightning calls it on the sampler each epoch). A
    state taken after ``k`` finished batches and loaded into a fresh loader makes its
    next iteration yield batches ``k, k+1, ...`` of the same epoch, the skipped ones
    unread. Worker seeds are drawn from a private generator seeded with
    ``(seed, epoch)``, so the loader never consumes the global torch RNG and random
    augmentations in workers repeat on resume.

    Parameters
    ----------
    dataset
        Map-style dataset.
    batch_size
        Samples per batch, default 1.
    shuffle
        Shuffle each epoch (default ``True``).
    seed
        Seed of the order, default 0.
    num_replicas, rank
        Distributed sharding (default 1 and 0): each rank gets the strided share of
        the same padded order (see :class:`ResumableSampler`).
    sampler
        Normally left ``None``. Any other sampler than a :class:`ResumableSampler`
        (Lightning passes a sequential one for ``overfit_batches``) turns resuming
        off: ``state_dict()`` is empty and loading does nothing.
    drop_last
        Drop the last incomplete batch.
    **kwargs
        Passed to :class:`~torch.utils.data.DataLoader` (``num_workers``,
        ``collate_fn``, ``pin_memory``, ``persistent_workers``, ...).

    Raises
    ------
    ValueError
        ``batch_sampler`` is given (the batch structure must come from ``batch_size``).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        sampler: Sampler | None = None,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("batch_sampler") is not None:
            raise ValueError("ResumableDataLoader builds its batches from batch_size; do not pass batch_sampler")
        kwargs.pop("batch_sampler", None)
        if sampler is None:
            sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, shuffle=None, sampler=sampler, drop_last=drop_last, **kwargs)
        # kept as attributes of the same names so Lightning can re-create the loader
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self._yielded = 0  # batches handed out in the current epoch (skipped ones included)
        self._count_epoch = self.epoch  # the epoch _yielded belongs to
        self._resume: dict[str, int] | None = None  # loaded state not applied yet
        self._pass_length: int | None = None  # batches in a whole pass
        self._progress: Callable[[], int | None] | None = None

    @property
    def resumable(self) -> bool:
        """Whether the loader can resume (its sampler is a :class:`ResumableSampler`)."""
        return isinstance(self.sampler, ResumableSampler)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next (or current) iteration yields."""
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (forwarded to the sampler)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._sync_epoch()

    def _sync_epoch(self) -> None:
        # A new epoch forgets the previous epoch's count; the same epoch (Lightning
        # sets it again right after a resume) keeps it.
        if self._count_epoch != self.epoch:
            self._count_epoch = self.epoch
            self._yielded = 0

    def attach_trainer(self, trainer: Any) -> None:
        """Count finished batches with ``trainer``'s fit loop (weakly referenced).

        Without it the state counts the batches handed out, which equals the batches
        trained on when nothing reads ahead of the training loop.
        """
        self._progress = _TrainerProgress(trainer) if trainer is not None else None

    def __iter__(self) -> Iterator:
        return _ResumableIterator(self)

    def _start_pass(self) -> Iterator:
        skip = 0
        if self._resume is not None and self.resumable:
            sampler, state = self.sampler, self._resume
            if sampler.requested_epoch == state["requested_epoch"]:
                # the interrupted epoch goes on
                sampler.epoch_offset = state["epoch"] - state["requested_epoch"]
                skip = state["batches_done"]
            else:
                # the loop has moved on: this is the epoch after the saved one, whatever number it was given
                sampler.epoch_offset = state["epoch"] + 1 - sampler.requested_epoch
            sampler.set_epoch(sampler.requested_epoch)
        self._resume = None
        self._sync_epoch()
        self._yielded = skip
        if self.resumable and skip:
            self.sampler.start = min(skip * self.batch_size, len(self.sampler))
        if self.resumable:
            self.generator.manual_seed(mix_seed(self.seed, self.epoch) ^ 0x5DEECE66D)
        try:
            self._pass_length = len(self)
        except TypeError:  # an iterable dataset without length
            self._pass_length = None
        return super().__iter__()

    def _pass_finished(self) -> None:
        """At the end of a pass without worker processes: let the graph cache hold these samples as columns.

        The next passes then gather each batch with a few tensor calls
        (:func:`~matsciml.datasets.cache.prepare_columns_for`); with workers the batches
        are collated in the workers, which were started before.
        """
        if self.num_workers == 0:
            from matsciml.datasets.cache import prepare_columns_for

            prepare_columns_for(self.dataset)

    def batches_done(self) -> int:
        """Batches of the current epoch finished by the training loop (see the module docs)."""
        done = self._yielded
        if self._progress is not None:
            processed = self._progress()
            if processed is not None:
                done = min(done, processed)
        return done

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: epoch, finished batches and the settings that fix the order.

        Empty when the loader is not :attr:`resumable`.
        """
        if not self.resumable:
            return {}
        if self._resume is not None:
            return dict(self._resume)  # loaded, not applied yet: still the truth
        self._sync_epoch()
        sampler = self.sampler
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "requested_epoch": sampler.requested_epoch,
            "batches_done": self.batches_done(),
            "seed": self.seed,
            "shuffle": bool(sampler.shuffle),
            "batch_size": int(self.batch_size),
            "num_items": len(sampler.dataset),
            "num_replicas": int(sampler.num_replicas),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the epoch stored in ``state_dict`` at its first unfinished batch.

        Takes effect at the next iteration. If the seed, shuffling, batch size, dataset
        length or number of ranks differ from the saved ones, the order of the rest of
        the epoch cannot match the interrupted run; a warning says so and the finished
        batches are still skipped, which keeps the epoch's length in step with the
        trainer's counters.
        """
        if not state_dict or not self.resumable:
            return
        sampler = self.sampler
        now = {
            "seed": self.seed,
            "shuffle": bool(sampler.shuffle),
            "batch_size": int(self.batch_size),
            "num_items": len(sampler.dataset),
            "num_replicas": int(sampler.num_replicas),
        }
        changed = {k: (state_dict[k], v) for k, v in now.items() if k in state_dict and state_dict[k] != v}
        if changed:
            diff = ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
            rank_zero_warn(
                f"Resuming the training loader with changed settings ({diff}): the rest of epoch "
                f"{state_dict['epoch']} will not repeat the interrupted run's order. Use the saved "
                "settings for an exact resume."
            )
        self._resume = dict(state_dict)
        self._resume.setdefault("requested_epoch", state_dict["epoch"])
        self.sampler.epoch_offset = int(state_dict["epoch"]) - int(self._resume["requested_epoch"])
        self.sampler.set_epoch(self._resume["requested_epoch"])
