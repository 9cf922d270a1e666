"""``MatSciMLDataModule``: datasets from paths or the devset, seeded splits, resumable training order.

Example YAML (a dataset config of the experiment runner)::

    dataset: StructureDataset
    debug: {batch_size: 4, num_workers: 0}
    experiment:
      train_path: /data/lips/train.extxyz
      val_split: 0.1              # a fraction of train_path, or a path of its own
      test_split: /data/lips/test.extxyz
      batch_size: 32
      num_workers: 8
      seed: 1234
    target_keys: [energy, forces]
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sized
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from matsciml.common.checks import check_int
from matsciml.common.config import instantiate, resolve_class
from matsciml.common.errors import ConfigError
from matsciml.common.plain import to_plain
from matsciml.lightning.loaders import ResumableDataLoader
from matsciml.lightning.splits import _parse_split, fractional_split

__all__ = ["MatSciMLDataModule", "fractional_split", "default_transforms", "DEFAULT_SEED", "DEFAULT_DATASET"]

#: Seed used for splits and the training order when ``seed=None``.
DEFAULT_SEED = 0
#: Dataset class used when ``dataset`` is not given.
DEFAULT_DATASET = "StructureDataset"
_RESERVED = ("train", "val", "test", "predict")


def default_transforms() -> list:
    """The transforms used when ``dset_kwargs`` gives none.

    ``[PeriodicPropertiesTransform(cutoff_radius=6.0, adaptive_cutoff=True),
    PointCloudToGraphTransform("pyg")]``: a periodic radius graph (6 Å, widened
    where a structure would have isolated atoms) as a PyG ``Data``.
    """
    from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

    return [PeriodicPropertiesTransform(cutoff_radius=6.0, adaptive_cutoff=True), PointCloudToGraphTransform("pyg")]


def _names_parameter(func: Any, name: str) -> bool:
    """Whether ``func``'s signature names the parameter ``name`` (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _path_or_class(value: Any) -> str:
    """For hyperparameters: a path-like's path, else the import path of the value's class."""
    cls = type(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else f"{cls.__module__}.{cls.__qualname__}"


def _base(dataset: Any) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _resolve_dataset_class(dataset: str | type) -> type:
    if isinstance(dataset, type):
        return dataset
    if "." in dataset:
        return resolve_class(dataset, "dataset")
    try:
        from matsciml.datasets.registry import get_dataset_class
    except ImportError as err:
        raise ConfigError(
            f"dataset={dataset!r}: the dataset registry cannot be imported ({err}); "
            "pass a dataset class, an import path or an instance"
        ) from err
    return get_dataset_class(dataset)


class MatSciMLDataModule(LightningDataModule):
    """Datasets, splits and loaders for training on structures.

    ``setup`` (any stage; idempotent) builds every dataset once: the training set
    from ``train_path`` (or the devset, or the given instance), the validation and
    test sets as fractions of it or from their own paths, the prediction set and
    the named ``extra_datasets``. When target keys are known, every dataset is
    checked with :func:`matsciml.datasets.validation.validate_dataset` (a
    ``StructureDataset`` built with the keys checks itself at construction and is
    not checked twice), so bad records fail before the first step.

    **Splits.** Fractions are cut from one permutation drawn with
    ``torch.Generator().manual_seed(seed)`` (:func:`fractional_split`): the same
    seed gives the same split on every run and every rank; ``seed=None`` means
    :data:`DEFAULT_SEED` (0), not a random or global seed.

    **Training order.** The training loader is a
    :class:`~matsciml.lightning.loaders.ResumableDataLoader`: the order of epoch
    ``e`` is a function of ``(seed, e)`` only. Under a multi-process strategy each
    rank takes its strided share of the same permutation, padded like
    :class:`~torch.utils.data.DistributedSampler`; the sampler derives from that
    class, so Lightning keeps it whether or not ``use_distributed_sampler`` is set.
    The loader's state is stored in checkpoints and a resumed run, from any
    checkpoint, sees exactly the batches an uninterrupted run would. Loaders never
    draw from the global torch RNG.

    **Evaluation under several processes.** The validation, test and prediction
    loaders Lightning asks for carry a
    :class:`~lightning.pytorch.overrides.distributed.UnrepeatedDistributedSampler`
    (file order, ``shuffle=False``): rank ``r`` reads items ``r, r + W, ...`` of the
    set, each structure is evaluated on exactly one rank, and ranks differ by at most
    one structure (and so by at most one batch). Lightning keeps it (it is a
    ``DistributedSampler``) instead of padding the set with repeated structures, so
    the epoch metrics, sums and counts reduced across ranks, equal those of one
    process. A set smaller than the number of processes is read whole by every rank
    (with a warning), which keeps means exact and no rank without a batch. The
    sharding follows the trainer's world size and rank whatever
    ``Trainer(use_distributed_sampler=...)`` says, as for the training loader.
    :meth:`eval_dataloader` shards only when asked (``shard=True``).

    Parameters
    ----------
    dataset
        Dataset class name in the registry (``"StructureDataset"``), an import path,
        a dataset class, or a dataset instance (used as the training set when
        ``train_path`` is not given; its class builds the datasets read from paths).
        Default ``None`` means ``"StructureDataset"``.
    train_path
        File or folder of the training set.
    batch_size
        Structures per batch, default 32.
    num_workers
        Loader worker processes, default 0.
    val_split, test_split
        A fraction in ``[0, 1)`` of the training set, or a path (a string that
        parses as a number is a fraction; ``""``, ``None`` and ``0`` mean none).
        Default 0.0.
    seed
        Seed of the splits and of the training order; ``None`` means 0.
    dset_kwargs
        Keyword arguments of the dataset class (``transforms``, ``on_invalid``, ...).
        Values may be YAML-style specs (``class_path`` / ``init_args``); they are
        instantiated. Without ``transforms`` (absent or ``None``) the datasets use
        :func:`default_transforms`; ``transforms: []`` means none.
    persistent_workers
        Keep workers between epochs; ``None`` means ``num_workers > 0``.
    target_keys
        Labels the datasets must carry (``["energy", "forces"]``); when ``None``,
        ``dset_kwargs["target_keys"]`` or the training set's ``target_keys``
        attribute is used. Known keys trigger validation at ``setup``. They are
        also passed to dataset classes whose constructor takes ``target_keys``
        (unless ``dset_kwargs`` sets it), so ``dset_kwargs: {on_invalid: drop}``
        drops the records that lack them.
    predict_split
        Dataset of ``predict_dataloader``: a name in :attr:`datasets` or a path.
        ``None`` uses the test set.
    extra_datasets
        ``{name: path}``: more datasets built like the others, reachable as
        ``datasets[name]`` and through :meth:`eval_dataloader` (e.g. for inference
        callbacks).
    collate_fn
        Batch collation; ``None`` uses the dataset's ``collate_fn`` attribute if it
        has one, otherwise :func:`matsciml.datasets.collate.collate_samples`.
    shuffle
        Shuffle the training order each epoch (default ``True``).
    drop_last
        Drop the last incomplete training batch (default ``False``).
    pin_memory
        Passed to the loaders (default ``False``).
    graph_cache
        The processed-graph cache of the datasets (:mod:`matsciml.datasets.cache`):
        ``"memory"`` (default: neighbour lists and graphs computed once per structure and
        kept in memory, up to 2048 MiB), ``"disk"`` (an LMDB file reused by later runs),
        ``"off"``, or a mapping of options (``{mode: disk, cache_dir: ..., workers: 8}``).
    in_process_if_cached
        With ``num_workers > 0``: load in the training process after all when, at
        ``setup``, the memory cache holds every structure within the columns limit
        (:func:`~matsciml.datasets.cache.held_for_columns`); gathering a batch then costs
        less than receiving it from a worker. The runner sets it on a GPU.

    Raises
    ------
    ConfigError
        Bad argument values (at construction); a missing file, an unknown dataset
        name, or fractions without a training set (at ``setup``).
    matsciml.common.errors.DataError
        A record fails validation (at ``setup``).

    Example::

        dm = MatSciMLDataModule(
            dataset="StructureDataset",
            train_path="lips.extxyz",
            val_split=0.2,
            batch_size=8,
            dset_kwargs={"transforms": [PeriodicPropertiesTransform(5.0), PointCloudToGraphTransform("pyg")]},
        )
        trainer.fit(task, datamodule=dm)
    """

    def __init__(
        self,
        dataset: str | type | Any | None = None,
        train_path: str | os.PathLike | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        val_split: float | str | os.PathLike | None = 0.0,
        test_split: float | str | os.PathLike | None = 0.0,
        seed: int | None = None,
        dset_kwargs: dict[str, Any] | None = None,
        persistent_workers: bool | None = None,
        target_keys: list[str] | None = None,
        predict_split: str | os.PathLike | None = None,
        extra_datasets: Mapping[str, str | os.PathLike] | None = None,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool = False,
        graph_cache: str | Mapping[str, Any] | bool | None = "memory",
        in_process_if_cached: bool = False,
    ) -> None:
        super().__init__()
        from matsciml.datasets.cache import GraphCacheConfig

        self.graph_cache = GraphCacheConfig.parse(graph_cache)
        check_int(batch_size, "batch_size", "MatSciMLDataModule")
        check_int(num_workers, "num_workers", "MatSciMLDataModule", minimum=0)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"seed={seed!r}: give an integer or null")
        if dset_kwargs is not None and not isinstance(dset_kwargs, Mapping):
            raise ConfigError(f"dset_kwargs={dset_kwargs!r}: give a mapping of keyword arguments")
        if isinstance(target_keys, str):
            target_keys = [target_keys]
        extra = dict(extra_datasets or {})
        for name in extra:
            if name in _RESERVED:
                raise ConfigError(f"extra_datasets name {name!r} is reserved ({', '.join(_RESERVED)}); rename it")
        self.dataset = DEFAULT_DATASET if dataset is None else dataset
        self.train_path = train_path
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = _parse_split(val_split, "val_split")
        self.test_split = _parse_split(test_split, "test_split")
        self.seed = DEFAULT_SEED if seed is None else seed
        self.dset_kwargs = dict(dset_kwargs or {})
        self.persistent_workers = num_workers > 0 if persistent_workers is None else bool(persistent_workers)
        self.predict_split = predict_split
        self.extra_datasets = extra
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.in_process_if_cached = bool(in_process_if_cached)
        self._target_keys = list(target_keys) if target_keys is not None else None
        self._use_devset = False
        self._datasets: dict[str, Any] | None = None
        if not isinstance(self.dataset, (str, type)) and self.dset_kwargs and train_path is None:
            if not any(isinstance(s, Path) for s in (self.val_split, self.test_split)) and not extra:
                rank_zero_warn("dset_kwargs are ignored: the dataset is an instance and no dataset is read from a path")
        self.save_hyperparameters(
            to_plain(
                {
                    "dataset": self.dataset,
                    "train_path": train_path,
                    "batch_size": batch_size,
                    "num_workers": num_workers,
                    "val_split": val_split,
                    "test_split": test_split,
                    "seed": seed,
                    "dset_kwargs": self.dset_kwargs,
                    "persistent_workers": persistent_workers,
                    "target_keys": self._target_keys,
                    "predict_split": predict_split,
                    "extra_datasets": extra,
                    "shuffle": shuffle,
                    "drop_last": drop_last,
                    "pin_memory": pin_memory,
                    "graph_cache": self.graph_cache.as_dict(),
                    "in_process_if_cached": self.in_process_if_cached,
                },
                other=_path_or_class,
            )
        )

    @classmethod
    def from_devset(
        cls, dataset: str | type = DEFAULT_DATASET, dset_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> MatSciMLDataModule:
        """A data module over the dataset class's embedded devset (``cls.from_devset``).

        Defaults: ``batch_size=8``, ``num_workers=0``, ``persistent_workers=False``;
        other keyword arguments are those of the constructor (``val_split=0.2``, ...).

        Raises
        ------
        ConfigError
            ``train_path`` is given, or (at ``setup``) the class has no ``from_devset``.
        """
        if kwargs.get("train_path") is not None:
            raise ConfigError("from_devset reads the devset; drop train_path or use the constructor")
        kwargs.setdefault("batch_size", 8)
        kwargs.setdefault("num_workers", 0)
        kwargs.setdefault("persistent_workers", False)
        module = cls(dataset=dataset, dset_kwargs=dset_kwargs, **kwargs)
        module._use_devset = True
        module.hparams["devset"] = True
        return module

    # ------------------------------------------------------------------ datasets
    @property
    def datasets(self) -> Mapping[str, Any]:
        """Read-only ``{name: dataset}``: ``train``, ``val``, ``test``, ``predict`` (those present) and extras.

        Raises
        ------
        RuntimeError
            Before :meth:`setup`.
        """
        if self._datasets is None:
            raise RuntimeError("MatSciMLDataModule.datasets is filled by setup(); call dm.setup() first")
        return MappingProxyType(self._datasets)

    @property
    def splits(self) -> dict[str, Any]:
        """``{"train"|"val"|"test": dataset}`` of the splits present (the upstream attribute)."""
        return {k: v for k, v in self.datasets.items() if k in ("train", "val", "test")}

    @property
    def target_keys(self) -> list[str] | None:
        """Target keys checked at setup: given, from ``dset_kwargs``, or the training set's attribute."""
        if self._target_keys is not None:
            return list(self._target_keys)
        keys = self.dset_kwargs.get("target_keys")
        if keys is None and self._datasets is not None and "train" in self._datasets:
            keys = getattr(_base(self._datasets["train"]), "target_keys", None)
        if keys is None:
            return None
        return [keys] if isinstance(keys, str) else list(keys)

    def _dataset_class(self) -> type:
        return type(self.dataset) if not isinstance(self.dataset, (str, type)) else _resolve_dataset_class(self.dataset)

    def _dataset_kwargs(self, cls: type) -> dict[str, Any]:
        kwargs = instantiate(dict(self.dset_kwargs), "dset_kwargs")
        if kwargs.get("transforms") is None and _names_parameter(cls, "transforms"):
            kwargs["transforms"] = default_transforms()
        if self._target_keys is not None and "target_keys" not in kwargs and _names_parameter(cls, "target_keys"):
            kwargs["target_keys"] = list(self._target_keys)
        return kwargs

    def _make_dataset(self, path: str | os.PathLike, argument: str) -> Any:
        path = Path(path).expanduser()
        if not path.exists():
            raise ConfigError(f"{argument}={os.fspath(path)!r}: no such file or folder; check the path")
        cls = self._dataset_class()
        return cls(path, **self._dataset_kwargs(cls))

    def _make_devset(self) -> Any:
        cls = self._dataset_class()
        factory = getattr(cls, "from_devset", None)
        if factory is None:
            raise ConfigError(f"dataset {cls.__name__} has no from_devset(); give train_path instead")
        return factory(**self._dataset_kwargs(cls))

    def setup(self, stage: str | None = None) -> None:
        """Build all datasets and splits (once) and validate them when target keys are known."""
        if self._datasets is not None:
            return
        built: dict[str, Any] = {}
        if self._use_devset:
            train = self._make_devset()
        elif self.train_path is not None:
            train = self._make_dataset(self.train_path, "train_path")
        elif not isinstance(self.dataset, (str, type)):
            train = self.dataset
        else:
            train = None

        fractions = {
            name: (split if isinstance(split, float) else 0.0)
            for name, split in (("val", self.val_split), ("test", self.test_split))
        }
        if any(fractions.values()):
            if train is None:
                raise ConfigError(
                    "val_split/test_split are fractions but there is no training set to split; "
                    "give train_path (or a dataset instance), or paths for the splits"
                )
            parts = fractional_split(len(train), fractions["val"], fractions["test"], self.seed)
            built["train"] = Subset(train, parts["train"])
            for name, fraction in fractions.items():
                if fraction:
                    built[name] = Subset(train, parts[name])
        elif train is not None:
            built["train"] = train
        for name, split in (("val", self.val_split), ("test", self.test_split)):
            if isinstance(split, Path):
                built[name] = self._make_dataset(split, f"{name}_split")
        if self.predict_split is not None:
            if isinstance(self.predict_split, str) and self.predict_split in built:
                built["predict"] = built[self.predict_split]
            elif isinstance(self.predict_split, str) and self.predict_split in self.extra_datasets:
                pass  # resolved below, once the extras exist
            else:
                built["predict"] = self._make_dataset(self.predict_split, "predict_split")
        for name, path in self.extra_datasets.items():
            built[name] = self._make_dataset(path, f"extra_datasets[{name!r}]")
        if self.predict_split in self.extra_datasets:
            built["predict"] = built[self.predict_split]
        self._datasets = built
        self._validate()
        from matsciml.datasets.cache import attach_graph_cache, held_for_columns

        bases = {id(_base(d)): _base(d) for d in built.values()}.values()
        for base in bases:
            attach_graph_cache(base, self.graph_cache, self.num_workers)
        if self.in_process_if_cached and self.num_workers and all(held_for_columns(b) for b in bases):
            rank_zero_info(f"graph cache holds all structures: loading in process, not in {self.num_workers} workers")
            self.num_workers, self.persistent_workers = 0, False

    def _validate(self) -> None:
        keys = self.target_keys
        if keys is None:
            return
        from matsciml.datasets.structure_dataset import StructureDataset
        from matsciml.datasets.validation import validate_dataset

        seen: set[int] = set()
        for dataset in self.datasets.values():
            base = _base(dataset)
            if id(base) in seen:
                continue
            seen.add(id(base))
            own = getattr(base, "target_keys", None) or []
            if isinstance(base, StructureDataset) and set(keys) <= set(own):
                continue  # it validated itself at construction
            validate_dataset(base, keys)

    # ------------------------------------------------------------------ loaders
    def _get(self, name: str, hook: str) -> Any:
        datasets = self.datasets
        if name not in datasets:
            present = ", ".join(repr(k) for k in datasets) or "none"
            raise ConfigError(f"{hook}: there is no {name!r} dataset (present: {present}); configure it")
        return datasets[name]

    def _collate(self, dataset: Any) -> Callable:
        if self.collate_fn is not None:
            return self.collate_fn
        own = getattr(_base(dataset), "collate_fn", None)
        if callable(own):
            return own
        from matsciml.datasets.collate import collate_samples

        return collate_samples

    def _loader_kwargs(self, dataset: Any) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self._collate(dataset),
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning hook: :func:`~matsciml.datasets.collate.batch_to_device` (graphs copied without blocking)."""
        from matsciml.datasets.collate import batch_to_device

        return batch_to_device(batch, device)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, sharded, resumable loader over the training set (see the class docs)."""
        if self._datasets is None:
            self.setup("fit")
        dataset = self._get("train", "train_dataloader")
        trainer = self.trainer
        num_replicas, rank = self._world()
        loader = ResumableDataLoader(
            dataset,
            shuffle=self.shuffle,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=self.drop_last,
            **self._loader_kwargs(dataset),
        )
        if trainer is not None:
            # the epoch Lightning will pass to set_epoch; right even if it asks for an iterator first
            loader.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            loader.attach_trainer(trainer)
        return loader

    def _world(self) -> tuple[int, int]:
        """``(number of processes, this process's global rank)`` of the attached trainer; ``(1, 0)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        sampler_kwargs = trainer.distributed_sampler_kwargs or {}
        return int(sampler_kwargs.get("num_replicas", 1)), int(sampler_kwargs.get("rank", 0))

    def _eval_sampler(self, dataset: Any, name: str) -> Sampler | None:
        """This rank's unpadded share of ``dataset`` in file order; ``None`` (sequential) for one process."""
        num_replicas, rank = self._world()
        if num_replicas <= 1 or not isinstance(dataset, Sized):
            return None
        if len(dataset) < num_replicas:
            rank_zero_warn(
                f"the {name!r} set has {len(dataset)} structures for {num_replicas} processes; every process "
                "evaluates all of them (metrics that are means stay exact, the work is repeated)"
            )
            # a DistributedSampler over one replica: Lightning keeps it and every rank reads the whole set
            return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
        return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def eval_dataloader(self, name: str, batch_size: int | None = None, shard: bool = False) -> DataLoader:
        """Loader in file order over the dataset ``name`` of :attr:`datasets`.

        Parameters
        ----------
        name
            Key of :attr:`datasets` (``"val"``, ``"test"``, an extra name, ...).
        batch_size
            Structures per batch; ``None`` (default) uses the data module's.
        shard
            ``False`` (default): the whole set, whatever the number of processes (for a
            loop on one rank, or as a template of loader options). ``True``: under a
            multi-process trainer, this rank's share with no structure repeated
            (``UnrepeatedDistributedSampler(dataset, num_replicas, rank, shuffle=False)``;
            see the class docs), as the validation, test and prediction loaders do;
            with one process, or no trainer attached, the whole set.

        Raises
        ------
        ConfigError
            No dataset of that name.
        """
        if self._datasets is None:
            self.setup()
        dataset = self._get(name, f"eval_dataloader({name!r})")
        kwargs = self._loader_kwargs(dataset)
        if batch_size is not None:
            kwargs["batch_size"] = batch_size
        sampler = self._eval_sampler(dataset, name) if shard else None
        return DataLoader(
            dataset, sampler=sampler, shuffle=False, generator=torch.Generator().manual_seed(self.seed), **kwargs
        )

    def _optional_loader(self, name: str) -> DataLoader | list:
        if self._datasets is None:
            self.setup()
        return self.eval_dataloader(name, shard=True) if name in self.datasets else []

    def val_dataloader(self) -> DataLoader | list:
        """Loader over the validation set in file order; ``[]`` (no validation) when there is none.

        Under several processes, this rank's unpadded share (see the class docs).
        """
        return self._optional_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Loader over the test set in file order; ``[]`` when there is none.

        Under several processes, this rank's unpadded share (see the class docs).
        """
        return self._optional_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Loader over ``predict_split`` (or the test set when it is ``None``).

        Under several processes, this rank's unpadded share (see the class docs): each
        structure is predicted on exactly one rank.

        Raises
        ------
        ConfigError
            Neither is configured.
        """
        if self._datasets is None:
            self.setup()
        name = "predict" if "predict" in self.datasets else "test"
        if name not in self.datasets:
            raise ConfigError("predict_dataloader: set predict_split (a dataset name or a path) or test_split")
        return self.eval_dataloader(name, shard=True)
