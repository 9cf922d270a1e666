"""The processed-graph cache: deterministic transforms run once per structure, not once per epoch.

A dataset's transforms split at the **cache boundary**: the leading transforms whose
class sets ``deterministic = True``
(:class:`~matsciml.datasets.transforms.PeriodicPropertiesTransform`,
:class:`~matsciml.datasets.transforms.PointCloudToGraphTransform`) give the same output
for the same structure every time, so their output (the *processed sample*: neighbour
list and graph tensors) is computed once and kept. Every transform from the first one
without that flag on (rattling, random rotations, frame averaging, any user callable)
runs on each access, on a private copy of the processed sample, so random
augmentations stay random and never touch the cache.

Two stores:

* ``memory`` (the data module's default): a dict in the process, filled during the
  first epoch (or up front, see ``eager``), up to ``memory_budget_mb`` (default
  :data:`DEFAULT_MEMORY_BUDGET_MB`, 2048 MiB, counted as the bytes of the cached
  tensors). A dataset larger than that keeps the first structures that fit and rebuilds
  the others each epoch, with one warning that points to the disk cache. Samples handed
  out without later transforms share their tensors with the cache: treat them as
  read-only.
* ``disk``: the package's pickle-free LMDB (:mod:`matsciml.datasets.disk_cache`), one
  file per source and transform settings, named
  ``<cache_dir>/<stem>-<key>.lmdb`` where ``key`` hashes the source file(s) content, the
  deterministic transforms' class and settings, and the cache format version. A changed
  file or cutoff gives another key, hence a rebuild; an unchanged one is reused by
  later runs. It is built whole before training (``matsciml-preprocess``, or at
  ``setup``), atomically, by one process while concurrent ones wait.

Example YAML (data module arguments in a dataset config)::

    experiment:
      train_path: /data/train.extxyz
      graph_cache: memory        # the default; "disk", or "off"
    # or, with options:
      graph_cache: {mode: disk, cache_dir: /scratch/graphs, workers: 8}
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from matsciml.common.errors import ConfigError, closest
from matsciml.datasets import schema

__all__ = [
    "CACHE_MODES",
    "DEFAULT_MEMORY_BUDGET_MB",
    "GraphCacheConfig",
    "GraphCache",
    "cache_boundary",
    "cache_key",
    "prepare_columns_for",
    "held_for_columns",
    "sample_nbytes",
    "attach_graph_cache",
]

#: Values of ``graph_cache`` (``None``/``False`` mean ``"off"``, ``True`` means ``"memory"``).
CACHE_MODES = ("memory", "disk", "off")
#: Default ceiling of the in-memory cache, in MiB of cached tensor data.
DEFAULT_MEMORY_BUDGET_MB = 2048.0
_OPTIONS = ("mode", "cache_dir", "workers", "memory_budget_mb", "eager", "progress")


@dataclass(frozen=True)
class GraphCacheConfig:
    """Settings of the graph cache (see the module docs).

    Parameters
    ----------
    mode
        ``"memory"`` (default), ``"disk"`` or ``"off"``.
    cache_dir
        Folder of the disk cache files (default ``None``: ``graphs/`` in
        ``$MATSCIML_CACHE``, ``$XDG_CACHE_HOME/matsciml`` or ``~/.cache/matsciml``).
    workers
        Processes that build the cache in parallel when it is built up front (default 0:
        the calling process).
    memory_budget_mb
        Ceiling of the in-memory cache in MiB (default 2048).
    eager
        Build the cache up front, before the first batch (default ``None``: always for
        ``disk``; for ``memory`` when the loaders use worker processes, which then share
        the parent's cache instead of each filling its own).
    progress
        Progress bar while building up front (``None``: when stderr is a terminal).
    """

    mode: str = "memory"
    cache_dir: str | None = None
    workers: int = 0
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    eager: bool | None = None
    progress: bool | None = None

    @classmethod
    def parse(cls, value: Any, argument: str = "graph_cache") -> GraphCacheConfig:
        """Read ``"memory"``/``"disk"``/``"off"``, a bool, ``None``, a mapping of the fields, or a config.

        Raises
        ------
        ConfigError
            An unknown mode or option (with the closest valid name), or a bad value.
        """
        if isinstance(value, GraphCacheConfig):
            return value
        if value is None or value is False:
            return cls(mode="off")
        if value is True:
            return cls()
        if isinstance(value, str):
            value = {"mode": value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{argument}={value!r}: give one of {', '.join(CACHE_MODES)} or a mapping of options")
        for key in value:
            if key not in _OPTIONS:
                raise ConfigError(f"{argument}: unknown option {key!r}; {closest(str(key), _OPTIONS)}")
        options = dict(value)
        mode = str(options.get("mode", "memory"))
        if mode not in CACHE_MODES:
            raise ConfigError(f"{argument}: mode {mode!r} is not valid; {closest(mode, CACHE_MODES)}")
        workers = options.get("workers", 0)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ConfigError(f"{argument}: workers={workers!r}: give an integer >= 0")
        budget = options.get("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
            raise ConfigError(f"{argument}: memory_budget_mb={budget!r}: give a number of MiB >= 0")
        cache_dir = options.get("cache_dir")
        return cls(
            mode=mode,
            cache_dir=None if cache_dir is None else str(cache_dir),
            workers=workers,
            memory_budget_mb=float(budget),
            eager=options.get("eager"),
            progress=options.get("progress"),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for hyperparameters)."""
        return {name: getattr(self, name) for name in _OPTIONS}


def cache_boundary(transforms: Sequence[Any]) -> int:
    """Number of leading transforms whose output may be cached (their class sets ``deterministic = True``)."""
    for k, transform in enumerate(transforms):
        if getattr(transform, "deterministic", False) is not True:
            return k
    return len(transforms)


def _settings(transform: Any) -> str:
    cls = type(transform)
    state = {}
    for name, value in sorted(vars(transform).items()):
        try:
            json.dumps(value)
            state[name] = value
        except (TypeError, ValueError):
            state[name] = repr(value)
    return json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}", "settings": state}, sort_keys=True)


def _hash_path(path: Path, digest: Any) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.name.endswith("-lock") or file.name == "lock.mdb":
            continue  # LMDB lock files change on every read
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def cache_key(source: str | Path, transforms: Sequence[Any], extra: str = "") -> str:
    """Hex SHA-256 of the source file(s) content, the transforms' classes and settings, and the format version.

    Parameters
    ----------
    source
        The dataset's file or folder.
    transforms
        The cached (deterministic) transforms.
    extra
        Anything else the processed samples depend on (the reader, for instance).
    """
    from matsciml.datasets.disk_cache import CACHE_VERSION

    digest = hashlib.sha256()
    digest.update(f"graph-cache-v{CACHE_VERSION}|{extra}|".encode())
    _hash_path(Path(source), digest)
    for transform in transforms:
        digest.update(_settings(transform).encode())
    return digest.hexdigest()


def sample_nbytes(sample: Mapping[str, Any]) -> int:
    """Bytes of the distinct tensor storages a processed sample holds (graph and targets included)."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif hasattr(value, "_store"):
            for item in value._store._mapping.values():
                visit(item)

    visit(sample)
    return sum(seen.values())


def _shallow(sample: dict[str, Any]) -> dict[str, Any]:
    """A new sample dict (new ``targets`` and ``source`` dicts) sharing the tensors and the graph."""
    out = dict(sample)
    for key in (schema.TARGETS, schema.SOURCE):
        if isinstance(out.get(key), dict):
            out[key] = dict(out[key])
    return out


def _deep(sample: dict[str, Any]) -> dict[str, Any]:
    """A copy whose tensors and graph can be changed in place without touching the cache."""
    from matsciml.datasets.readers.common import copy_sample

    out = copy_sample(sample)
    graph = out.get(schema.GRAPH)
    if graph is not None and hasattr(graph, "clone"):
        out[schema.GRAPH] = graph.clone()
    if isinstance(out.get(schema.SOURCE), dict):
        out[schema.SOURCE] = dict(out[schema.SOURCE])
    return out


class GraphCache:
    """Processed samples of one dataset, by record index; in memory, on disk, or both.

    Parameters
    ----------
    boundary
        Number of leading transforms whose output is cached (:func:`cache_boundary`).
    memory_budget_bytes
        Ceiling of the in-memory store; ``0`` keeps nothing in memory.
    disk
        A :class:`~matsciml.datasets.disk_cache.DiskGraphStore` to read from, or ``None``.
    name
        Names the dataset in the budget warning.
    """

    def __init__(self, boundary: int, memory_budget_bytes: float, disk: Any = None, name: str = "") -> None:
        self.boundary = int(boundary)
        self.memory_budget_bytes = float(memory_budget_bytes)
        self.disk = disk
        self.name = name
        self.memory: dict[int, dict[str, Any]] = {}
        self.memory_bytes = 0
        self.full = False
        self.hits = 0
        self.misses = 0
        self._columns: dict[int, tuple[Any, int]] = {}  # dataset index -> (Columns, position in them)

    def lookup(self, record: int) -> dict[str, Any] | None:
        """The stored processed sample of ``record`` (not a copy), or ``None``."""
        sample = self.memory.get(record)
        if sample is None and self.disk is not None:
            sample = self.disk.get(record)
        return sample

    def store(self, record: int, sample: dict[str, Any]) -> bool:
        """Keep ``sample`` in memory if the budget allows; whether it was kept."""
        if self.full or self.disk is not None:
            return False
        size = sample_nbytes(sample) + 512  # tensors plus a rough allowance for the Python objects
        if self.memory_bytes + size > self.memory_budget_bytes:
            self.full = True
            warnings.warn(
                f"{self.name}: the in-memory graph cache reached its budget of "
                f"{self.memory_budget_bytes / 2**20:.0f} MiB after {len(self.memory)} structures; the others "
                "are rebuilt every epoch. Raise graph_cache.memory_budget_mb, or use graph_cache: disk "
                "(matsciml-preprocess builds it up front).",
                UserWarning,
                stacklevel=4,
            )
            return False
        self.memory[record] = sample
        self.memory_bytes += size
        return True

    def item(self, dataset: Any, index: int) -> dict[str, Any]:
        """Sample ``index`` of ``dataset``: the cached processed sample through the remaining transforms."""
        record = dataset._record_index(index)
        head, tail = dataset.transforms[: self.boundary], dataset.transforms[self.boundary :]
        sample = self.lookup(record)
        if sample is None:
            self.misses += 1
            sample = dataset.apply_transforms(dataset.raw(index), head)
            if not self.store(record, sample):
                return dataset.apply_transforms(sample, tail)  # nothing keeps it: no copy needed
        else:
            self.hits += 1
            if self.disk is not None and record not in self.memory:
                return dataset.apply_transforms(sample, tail)  # freshly decoded: already private
        if tail:
            return dataset.apply_transforms(_deep(sample), tail)
        return _shallow(sample)

    def prepare_columns(self, dataset: Any, indices: Sequence[int]) -> bool:
        """Lay the samples ``indices`` of ``dataset`` out as columns (:mod:`~matsciml.datasets.columns`).

        Done when every one of them is held in memory, no transform follows the cache, the
        cache holds at most :data:`~matsciml.datasets.columns.COLUMNS_MAX_BYTES` and the
        samples fit one layout; a no-op when these samples already are in one set of
        columns. Call it between passes over the data (the loaders do, at the end of
        each pass): it costs about one pass of the per-sample collate. Whether the
        samples are in columns afterwards.
        """
        from matsciml.datasets.columns import COLUMNS_MAX_BYTES, Columns

        indices = list(indices)
        if not indices or self.disk is not None or dataset.transforms[self.boundary :]:
            return False
        known = {id(self._columns[i][0]) if i in self._columns else None for i in indices}
        if len(known) == 1 and None not in known:
            return True
        if self.memory_bytes > COLUMNS_MAX_BYTES:
            return False
        samples = [self.memory.get(dataset._record_index(i)) for i in indices]
        if any(sample is None for sample in samples):
            return False
        columns = Columns.build(samples)
        if columns is None:
            return False
        self._columns.update((index, (columns, k)) for k, index in enumerate(indices))
        return True

    def batch_columns(self, indices: Sequence[int]) -> tuple[Any, list[int]] | None:
        """``(Columns, positions)`` when the samples ``indices`` are all in one set of columns, else ``None``."""
        found = self._columns
        if not found:
            return None
        first = found.get(indices[0]) if indices else None
        if first is None:
            return None
        columns, positions = first[0], []
        for index in indices:
            entry = found.get(index)
            if entry is None or entry[0] is not columns:
                return None
            positions.append(entry[1])
        return columns, positions

    def fill(self, dataset: Any, workers: int = 0, progress: bool | None = None) -> None:
        """Compute and keep every processed sample of ``dataset`` now (in ``workers`` processes)."""
        from tqdm.auto import tqdm

        from matsciml.datasets.disk_cache import _encoded, decode_processed

        todo = [i for i in range(len(dataset)) if dataset._record_index(i) not in self.memory]
        if not todo or self.full:
            return
        process = _Processor(dataset, self.boundary, todo)
        bar = tqdm(
            total=len(todo),
            desc=f"graph cache {self.name}",
            unit="structure",
            disable=None if progress is None else not progress,
        )
        try:
            for k, value in _encoded(process, len(todo), workers) if workers > 1 else _direct(process, len(todo)):
                sample = value if isinstance(value, dict) else decode_processed(value, self.name)
                bar.update(1)
                if not self.store(dataset._record_index(todo[k]), sample):
                    break
        finally:
            bar.close()


def _direct(process: Callable[[int], dict[str, Any]], count: int) -> Any:
    for k in range(count):
        yield k, process(k)


class _Processor:
    """``k -> dataset.raw(indices[k])`` through the cached transforms (picklable for worker processes)."""

    def __init__(self, dataset: Any, boundary: int, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.boundary = boundary
        self.indices = list(indices)

    def __call__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        return self.dataset.apply_transforms(self.dataset.raw(index), self.dataset.transforms[: self.boundary])


def prepare_columns_for(dataset: Any) -> bool:
    """:meth:`GraphCache.prepare_columns` for the samples a loader reads: ``dataset`` or its ``Subset`` chain.

    Returns whether those samples are held as columns (``False`` for datasets without a
    graph cache).
    """
    from torch.utils.data import Subset

    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        indices = list(dataset.indices) if indices is None else [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    cache = getattr(dataset, "graph_cache", None)
    if not isinstance(cache, GraphCache):
        return False
    return cache.prepare_columns(dataset, range(len(dataset)) if indices is None else indices)


def held_for_columns(dataset: Any) -> bool:
    """Whether the memory graph cache of ``dataset`` already holds all of it, small enough for columns.

    True when every structure of ``dataset`` is in its in-memory cache, no transform runs
    after the cache, and the cache holds at most
    :data:`~matsciml.datasets.columns.COLUMNS_MAX_BYTES`: a loader in the training process
    then gathers its batches from columns (:mod:`~matsciml.datasets.columns`) after its
    first pass, with no per-structure work left for worker processes to share.
    """
    from matsciml.datasets.columns import COLUMNS_MAX_BYTES

    cache = getattr(dataset, "graph_cache", None)
    if not isinstance(cache, GraphCache) or cache.disk is not None or cache.full:
        return False
    if dataset.transforms[cache.boundary :] or cache.memory_bytes > COLUMNS_MAX_BYTES:
        return False
    return all(dataset._record_index(i) in cache.memory for i in range(len(dataset)))


def attach_graph_cache(dataset: Any, config: GraphCacheConfig | Any, num_workers: int = 0) -> GraphCache | None:
    """Give ``dataset`` a graph cache as ``config`` says (building it up front when due).

    Datasets without a ``graph_cache`` attribute (not a
    :class:`~matsciml.datasets.StructureDataset`), with no cacheable transform, or that
    already have a cache, are left as they are.

    Parameters
    ----------
    dataset
        The dataset (a ``StructureDataset``; subsets are unwrapped by the caller).
    config
        A :class:`GraphCacheConfig` or anything :meth:`GraphCacheConfig.parse` reads.
    num_workers
        Loader worker processes: with workers, a memory cache is built up front so the
        forked workers share it.

    Returns
    -------
    GraphCache or None
        The cache attached, or ``None``.
    """
    config = GraphCacheConfig.parse(config)
    if config.mode == "off" or not hasattr(dataset, "graph_cache"):
        return None
    if dataset.graph_cache is not None:
        return dataset.graph_cache
    boundary = cache_boundary(dataset.transforms)
    if boundary == 0:
        return None
    name = str(getattr(dataset, "path", type(dataset).__name__))
    if config.mode == "disk":
        from matsciml.datasets.disk_cache import (
            DiskGraphStore,
            build_disk_cache,
            cache_file_name,
            default_graph_cache_dir,
        )

        key = cache_key(dataset.path, dataset.transforms[:boundary], type(dataset._records).__name__)
        folder = Path(config.cache_dir).expanduser() if config.cache_dir else default_graph_cache_dir()
        path = folder / cache_file_name(Path(dataset.path).stem, key)
        indices = range(len(dataset))
        build_disk_cache(
            _Processor(dataset, boundary, indices),
            len(indices),
            dataset._record_index,
            path,
            key,
            workers=config.workers,
            progress=config.progress,
            description=f"graph cache {Path(dataset.path).name}",
        )
        cache = GraphCache(boundary, 0, disk=DiskGraphStore(path, key), name=name)
    else:
        cache = GraphCache(boundary, config.memory_budget_mb * 2**20, name=name)
        eager = config.eager if config.eager is not None else num_workers > 0
        if eager:
            cache.fill(dataset, workers=config.workers, progress=config.progress)
    dataset.graph_cache = cache
    return cache
