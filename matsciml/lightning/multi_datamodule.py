"""``MultiDataModule``: train and evaluate on several datasets at once.

Each split (train, val, test, predict) is a
:class:`~matsciml.datasets.multi_dataset.MultiDataset` and every batch holds structures of
several datasets, grouped by dataset name (the batch layout of
:class:`~matsciml.models.tasks.multitask.MultiTaskLitModule`). Two ways to give the data:

* ``datamodules={name: MatSciMLDataModule(...)}``: each data module reads and splits its
  own dataset (its paths, fractions, seed, transforms and target keys, validated as for a
  single dataset); split ``s`` of this module joins split ``s`` of every data module that
  has one;
* upstream's ``train_dataset=MultiDataset([...])``, ``val_dataset=...``, ... .

The loaders are those of :class:`~matsciml.lightning.MatSciMLDataModule`: the training
loader is the seeded, DDP-sharded, mid-epoch resumable
:class:`~matsciml.lightning.loaders.ResumableDataLoader` over the joined training set
(``sampling`` chooses proportional or balanced shares, see
:mod:`matsciml.datasets.multi_dataset`); the evaluation loaders read the joined sets in
order, sharded without repetition under DDP. Evaluation sets are always the plain
concatenation (every structure once).

Example YAML (what the runner builds from ``dataset: {oqmd_devset: [...], lips_devset: [...]}``)::

    class_path: matsciml.lightning.data_utils.MultiDataModule
    init_args:
      batch_size: 8
      sampling: balanced
      seed: 0
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from matsciml.common.errors import ConfigError, closest
from matsciml.datasets.multi_dataset import SAMPLING, MultiDataset
from matsciml.lightning.datamodule import MatSciMLDataModule

__all__ = ["MultiDataModule"]

_SPLITS = ("train", "val", "test", "predict")


class MultiDataModule(MatSciMLDataModule):
    """Several datasets in every batch, with the splits, seeding and resumable loader of a single one.

    Parameters
    ----------
    batch_size
        Structures per batch, of all datasets together (default 32).
    num_workers
        Loader worker processes (default 0).
    train_dataset, val_dataset, test_dataset, predict_dataset
        Upstream form: a :class:`~matsciml.datasets.multi_dataset.MultiDataset` per split.
    persistent_workers
        Keep workers between epochs; ``None`` means ``num_workers > 0``.
    datamodules
        ``{dataset name: MatSciMLDataModule}``; their splits are joined by split name.
    sampling
        ``"proportional"`` or ``"balanced"``: the datasets' shares of a training epoch.
    seed
        Seed of the training order (``None``: 0). The data modules' own seeds cut their
        splits.
    shuffle, drop_last, pin_memory
        As for :class:`~matsciml.lightning.MatSciMLDataModule`.

    Raises
    ------
    ConfigError
        No data, both forms at once, an unknown ``sampling``, a data module that is not
        a ``MatSciMLDataModule``, no training set (at ``setup``).
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        train_dataset: MultiDataset | None = None,
        val_dataset: MultiDataset | None = None,
        test_dataset: MultiDataset | None = None,
        predict_dataset: MultiDataset | None = None,
        persistent_workers: bool | None = None,
        datamodules: Mapping[str, MatSciMLDataModule] | None = None,
        sampling: str = "proportional",
        seed: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        given = {
            "train": train_dataset,
            "val": val_dataset,
            "test": test_dataset,
            "predict": predict_dataset,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if datamodules and given:
            raise ConfigError("MultiDataModule: give either datamodules or the *_dataset MultiDatasets, not both")
        if not datamodules and not given:
            raise ConfigError("MultiDataModule: no data; give datamodules={name: MatSciMLDataModule} or train_dataset")
        if sampling not in SAMPLING:
            raise ConfigError(f"MultiDataModule: sampling={sampling!r}; {closest(str(sampling), SAMPLING)}")
        for name, dataset in given.items():
            if not isinstance(dataset, MultiDataset):
                raise ConfigError(
                    f"MultiDataModule: {name}_dataset must be a MultiDataset, got {type(dataset).__name__}"
                )
        for name, module in (datamodules or {}).items():
            if not isinstance(module, MatSciMLDataModule):
                raise ConfigError(
                    f"MultiDataModule: datamodules[{name!r}] must be a MatSciMLDataModule, got {type(module).__name__}"
                )
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            persistent_workers=persistent_workers,
            shuffle=shuffle,
            drop_last=drop_last,
            pin_memory=pin_memory,
        )
        self.datamodules = dict(datamodules or {})
        self.sampling = sampling
        self._given = given
        self.hparams["sampling"] = sampling
        self.hparams["datamodules"] = {name: dict(dm.hparams) for name, dm in self.datamodules.items()}

    @property
    def dataset_names(self) -> list[str]:
        """Names of the datasets (in batch order)."""
        if self.datamodules:
            return list(self.datamodules)
        return list(next(iter(self._given.values())).names)

    @property
    def target_keys(self) -> dict[str, list[str] | None]:
        """``{dataset name: target keys}``."""
        if self.datamodules:
            return {name: dm.target_keys for name, dm in self.datamodules.items()}
        return dict(next(iter(self._given.values())).target_keys)

    def setup(self, stage: str | None = None) -> None:
        """Set up every data module (reading and checking its data) and join their splits."""
        if self._datasets is not None:
            return
        built: dict[str, Any] = dict(self._given)
        if self.datamodules:
            for dm in self.datamodules.values():
                dm.setup(stage)
            for split in _SPLITS:
                parts = {name: dm.datasets[split] for name, dm in self.datamodules.items() if split in dm.datasets}
                if not parts:
                    continue
                sampling = self.sampling if split == "train" else "proportional"
                collate = {name: dm._collate(parts[name]) for name, dm in self.datamodules.items() if name in parts}
                built[split] = MultiDataset(parts, sampling=sampling, collate_fns=collate)
        elif "train" in built and built["train"].sampling != self.sampling:
            train = built["train"]
            built["train"] = MultiDataset(
                dict(zip(train.names, train.datasets)), sampling=self.sampling, collate_fns=train.collate_fns
            )
        if "predict" not in built and "test" in built:
            built["predict"] = built["test"]
        self._datasets = built

    def split_of(self, dataset: str, split: str) -> Any:
        """Split ``split`` of the dataset named ``dataset`` (what its own data module built).

        Raises
        ------
        ConfigError
            Unknown dataset name or split.
        """
        if self._datasets is None:
            self.setup()
        if dataset not in self.dataset_names:
            raise ConfigError(f"MultiDataModule has no dataset {dataset!r}; {closest(dataset, self.dataset_names)}")
        if self.datamodules:
            return self.datamodules[dataset].datasets[split]
        joined = self._datasets.get(split)
        if joined is None:
            raise ConfigError(f"MultiDataModule has no {split!r} split")
        return joined.datasets[joined.names.index(dataset)]

    @property
    def datasets(self) -> Mapping[str, Any]:
        """Read-only ``{split: MultiDataset}`` (after :meth:`setup`)."""
        if self._datasets is None:
            raise RuntimeError("MultiDataModule.datasets is filled by setup(); call dm.setup() first")
        return MappingProxyType(self._datasets)
