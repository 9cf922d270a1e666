"""``MultiDataset``: several datasets read as one, each sample tagged with its dataset's name.

Item ``i`` is a sample of one of the datasets with ``sample["dataset"] = <name>``;
:meth:`MultiDataset.collate_fn` groups a list of such samples by name and collates each
group with its own dataset's collate function, giving the batch layout of
:class:`~matsciml.models.tasks.multitask.MultiTaskLitModule`::

    {"oqmd": <batch of the oqmd samples>, "lips": <batch of the lips samples>, "batch_size": 8}

A dataset without samples in a batch is absent from it, so a task never sees another
dataset's structures, and a structure never gets a made-up target.

**Sampling.** ``sampling="proportional"`` (default) is the plain concatenation: an epoch
holds every sample once, so each dataset's share of an epoch is its share of the samples.
``sampling="balanced"`` gives every dataset the same share: the dataset is
``len(datasets) * max(len(d))`` long, dataset ``k`` owning indices
``[k * L, (k + 1) * L)``, position ``j`` of that range being sample ``j mod len(d_k)``;
the smaller datasets are repeated (each of their samples ``floor`` or ``ceil`` of
``L / len(d_k)`` times per epoch). Either way the index is a plain range, so any
sampler (shuffling, DDP sharding, the resumable loader) works on it unchanged.

Example::

    train = MultiDataset({"oqmd": oqmd_train, "lips": lips_train}, sampling="balanced")
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=train.collate_fn)
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset, Subset

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.registry import register_dataset

__all__ = ["MultiDataset", "SAMPLING", "DATASET_KEY"]

#: Sampling policies.
SAMPLING = ("proportional", "balanced")
#: Key of a sample that names its dataset.
DATASET_KEY = "dataset"
_RESERVED = ("batch_size",)


def _base(dataset: Any) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _default_collate(dataset: Any) -> Callable:
    own = getattr(_base(dataset), "collate_fn", None)
    if callable(own):
        return own
    from matsciml.datasets.collate import collate_samples

    return collate_samples


@register_dataset
class MultiDataset(Dataset):
    """Several datasets as one, samples tagged with their dataset's name.

    Parameters
    ----------
    datasets
        ``{name: dataset}``, or a sequence of datasets (upstream form; each is named by
        its class name, which must then be unique).
    sampling
        ``"proportional"`` or ``"balanced"`` (see the module docstring).
    collate_fns
        ``{name: collate function}``; default each dataset's ``collate_fn`` attribute,
        else :func:`~matsciml.datasets.collate.collate_samples`.

    Raises
    ------
    ConfigError
        No dataset, an empty one, duplicate or reserved names, unknown ``sampling``.
    """

    def __init__(
        self,
        datasets: Mapping[str, Any] | Sequence[Any],
        sampling: str = "proportional",
        collate_fns: Mapping[str, Callable] | None = None,
    ) -> None:
        if isinstance(datasets, Mapping):
            named = [(str(k), v) for k, v in datasets.items()]
        else:
            named = [(type(_base(d)).__name__, d) for d in datasets]
            names = [n for n, _ in named]
            if len(set(names)) != len(names):
                raise ConfigError(
                    f"MultiDataset: datasets of one class ({names}) need names: pass {{name: dataset}} instead of a list"
                )
        if not named:
            raise ConfigError("MultiDataset needs at least one dataset")
        if sampling not in SAMPLING:
            raise ConfigError(f"MultiDataset: sampling={sampling!r}; {closest(str(sampling), SAMPLING)}")
        for name, dataset in named:
            if name in _RESERVED or not name:
                raise ConfigError(f"MultiDataset: {name!r} cannot name a dataset (it is a batch key); rename it")
            if len(dataset) == 0:
                raise ConfigError(f"MultiDataset: dataset {name!r} is empty")
        self.names = [n for n, _ in named]
        self.datasets = [d for _, d in named]
        self.sampling = sampling
        fns = dict(collate_fns or {})
        for name in fns:
            if name not in self.names:
                raise ConfigError(
                    f"MultiDataset: collate_fns has {name!r}, which is no dataset; {closest(name, self.names)}"
                )
        self.collate_fns = {n: fns.get(n) or _default_collate(d) for n, d in named}
        self.sizes = [len(d) for d in self.datasets]
        span = max(self.sizes)
        self._starts = [k * span for k in range(len(self.sizes))] if sampling == "balanced" else self._cumulative()
        self._span = span

    def _cumulative(self) -> list[int]:
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return starts

    def __len__(self) -> int:
        if self.sampling == "balanced":
            return self._span * len(self.sizes)
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[str, int]:
        """``(dataset name, index in that dataset)`` of item ``index``."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"MultiDataset index {index} out of range [0, {len(self)})")
        k = bisect_right(self._starts, index) - 1
        return self.names[k], (index - self._starts[k]) % self.sizes[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, local = self.locate(index)
        sample = self.datasets[self.names.index(name)][local]
        if not isinstance(sample, Mapping):
            raise DataError(f"MultiDataset: dataset {name!r} item {local} is a {type(sample).__name__}, not a mapping")
        return {**sample, DATASET_KEY: name}

    def collate_fn(self, samples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Group ``samples`` by their ``"dataset"`` tag and collate each group with its dataset's function.

        Returns
        -------
        dict
            ``{name: batch}`` for each dataset present, in the order of the datasets, and
            ``batch_size`` (the number of samples).

        Raises
        ------
        DataError
            A sample without a tag, or with an unknown one.
        """
        groups: dict[str, list] = {}
        count = 0
        for sample in samples:
            name = sample.get(DATASET_KEY) if isinstance(sample, Mapping) else None
            if name not in self.collate_fns:
                raise DataError(
                    f"MultiDataset.collate_fn: a sample is tagged {name!r}, not one of {self.names}; "
                    "read the samples through the MultiDataset"
                )
            groups.setdefault(name, []).append({k: v for k, v in sample.items() if k != DATASET_KEY})
            count += 1
        out: dict[str, Any] = {name: self.collate_fns[name](groups[name]) for name in self.names if name in groups}
        out["batch_size"] = count
        return out

    @property
    def target_keys(self) -> dict[str, list[str] | None]:
        """``{name: target keys}`` of each dataset (``None`` when it does not say)."""
        return {n: getattr(_base(d), "target_keys", None) for n, d in zip(self.names, self.datasets)}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {s}" for n, s in zip(self.names, self.sizes))
        return f"MultiDataset({parts}; sampling={self.sampling!r})"
