"""The on-disk graph cache: processed samples in the package's pickle-free LMDB format.

A processed sample (the output of a dataset's deterministic transforms: positions,
targets, ``edge_index``, ``cell_shifts``, the PyG ``graph``) is stored as one record of
:func:`~matsciml.datasets.readers.lmdb_format.encode_arrays`: its tensors as raw
arrays (``s/<key>`` for sample keys, ``t/<key>`` for targets, ``g/<key>`` for the
graph's attributes) and its plain values (``id``, ``natoms``, ``source``) in the JSON
header. Decoding runs no code and gives the tensors back bit for bit. Records are keyed
by the record index in the source file, so a dataset that drops invalid records reads
the same cache.

The file is written once, whole, by :func:`build_disk_cache`: through a temporary file
renamed into place (:func:`~matsciml.datasets.readers.lmdb_format.write_lmdb_entries`),
under an exclusive ``flock`` on ``NAME.lmdb.lock`` so that concurrent processes (the
ranks of a DDP run, two runs on one machine) build it once and the others wait and
read it. A builder killed mid-write leaves only its temporary file
(``.partial-<pid>-<hex>.NAME.lmdb.tmp``, see :func:`~matsciml.common.atomic.leftover_temporaries`),
which the next build removes; the final name is never half-written.

Example::

    from matsciml.datasets.disk_cache import DiskGraphStore, build_disk_cache

    path = build_disk_cache(dataset, "/scratch/cache/train-3f2a.lmdb", key="3f2a...", workers=4)
    store = DiskGraphStore(path, key="3f2a...")
    sample = store.get(0)          # the processed sample of record 0, or None
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matsciml.common.atomic import leftover_temporaries
from matsciml.common.errors import DataError
from matsciml.datasets import schema
from matsciml.datasets.readers.lmdb_format import (
    METADATA_KEY,
    close_env,
    decode_arrays,
    encode_arrays,
    shared_env,
    temporary_suffix,
    write_lmdb_entries,
)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "encode_processed",
    "decode_processed",
    "DiskGraphStore",
    "build_disk_cache",
    "cache_file_name",
    "default_graph_cache_dir",
]

#: ``format`` and ``version`` in the metadata record of a graph cache file.
CACHE_FORMAT = "matsciml-graph-cache"
CACHE_VERSION = 1


def _record_key(record: int) -> bytes:
    return f"{record:010d}".encode("ascii")


def _plain_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def encode_processed(sample: dict[str, Any]) -> bytes:
    """Serialise a processed sample (tensors as raw arrays, plain values as JSON).

    Raises
    ------
    DataError
        A value is neither an array nor plain JSON data (a DGL graph, for instance): the
        message names the key and suggests the in-memory cache.
    """
    arrays: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    numpy_keys: list[str] = []
    alias: dict[str, str] = {}  # graph attributes that are a sample's tensor (stored once)
    by_id = {id(v): "s/" + k for k, v in sample.items() if isinstance(v, torch.Tensor)}
    where = sample.get(schema.ID, "?")
    for key, value in sample.items():
        if key == schema.TARGETS:
            for name, target in (value or {}).items():
                if isinstance(target, np.ndarray):
                    numpy_keys.append("t/" + name)
                arrays["t/" + name] = target if isinstance(target, (torch.Tensor, np.ndarray)) else np.asarray(target)
        elif key == schema.GRAPH:
            graph_type = type(value).__name__
            if graph_type != "Data" or not hasattr(value, "_store"):
                raise DataError(
                    f"sample {where!r}: the graph is a {graph_type}; the disk graph cache stores PyG Data "
                    "graphs only. Use graph_cache: memory, or the pyg backend of PointCloudToGraphTransform."
                )
            for name, attr in value._store._mapping.items():
                if name == "num_nodes":
                    continue
                if not isinstance(attr, torch.Tensor):
                    raise DataError(
                        f"sample {where!r}: graph attribute {name!r} is a {type(attr).__name__}; the disk graph "
                        "cache stores tensors only. Use graph_cache: memory."
                    )
                if id(attr) in by_id:
                    alias["g/" + name] = by_id[id(attr)]
                else:
                    arrays["g/" + name] = attr
            plain["__graph_num_nodes__"] = int(value.num_nodes)
            plain["__graph_order__"] = [name for name in value._store._mapping if name != "num_nodes"]
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            if isinstance(value, np.ndarray):
                numpy_keys.append("s/" + key)
            arrays["s/" + key] = value
        elif _plain_json(value):
            plain[key] = value
        else:
            raise DataError(
                f"sample {where!r}: key {key!r} holds a {type(value).__name__}, which the disk graph cache cannot "
                "store (tensors, arrays and plain JSON data only). Use graph_cache: memory."
            )
    header = {"id": str(where), "order": list(sample), "plain": plain, "numpy": numpy_keys, "alias": alias}
    return encode_arrays(arrays, header)


def decode_processed(value: bytes, where: str) -> dict[str, Any]:
    """Rebuild a processed sample from :func:`encode_processed` bytes (tensors bit for bit)."""
    from torch_geometric.data import Data

    header, arrays = decode_arrays(value, where)
    for name, target in header.get("alias", {}).items():
        arrays[name] = arrays[target]
    numpy_keys = set(header.get("numpy", ()))
    plain = header["plain"]
    targets: dict[str, Any] = {}
    graph_attrs: dict[str, torch.Tensor] = {}
    sample_arrays: dict[str, Any] = {}
    for name, tensor in arrays.items():
        out: Any = tensor.numpy() if name in numpy_keys else tensor
        kind, key = name[:2], name[2:]
        if kind == "t/":
            targets[key] = out
        elif kind == "g/":
            graph_attrs[key] = tensor
        else:
            sample_arrays[key] = out
    sample: dict[str, Any] = {}
    for key in header["order"]:
        if key == schema.TARGETS:
            sample[key] = targets
        elif key == schema.GRAPH:
            graph = Data()
            for name in plain["__graph_order__"]:
                graph._store._mapping[name] = graph_attrs[name]
            graph.num_nodes = int(plain["__graph_num_nodes__"])
            sample[key] = graph
        elif key in sample_arrays:
            sample[key] = sample_arrays[key]
        else:
            sample[key] = plain[key]
    return sample


def _read_cache_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata record, or ``None`` when the file is not a readable LMDB with one."""
    import lmdb

    try:
        env = shared_env(path, False)
        # a file cut short (by something else than the writer, which renames complete files only) would be
        # read through the memory map past its end: check its length against LMDB's own page count first
        if (env.info()["last_pgno"] + 1) * env.stat()["psize"] > path.stat().st_size:
            return None
        with env.begin() as txn:
            raw = txn.get(METADATA_KEY)
        return None if raw is None else json.loads(bytes(raw).decode("utf-8"))
    except (lmdb.Error, DataError, UnicodeDecodeError, json.JSONDecodeError):
        return None


class DiskGraphStore:
    """Read-only access to a graph cache file written by :func:`build_disk_cache`.

    The LMDB environment is shared by the process and reopened in each DataLoader worker
    (see :func:`~matsciml.datasets.readers.lmdb_format.shared_env`).

    Parameters
    ----------
    path
        The ``.lmdb`` cache file.
    key
        The cache key it must carry (hash of the source and the transform settings).

    Raises
    ------
    DataError
        The file is not a graph cache of this version, or carries another key.
    """

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = key
        meta = _read_cache_metadata(self.path)
        if meta is None or meta.get("format") != CACHE_FORMAT or int(meta.get("version", 0)) != CACHE_VERSION:
            raise DataError(f"{self.path}: not a graph cache of version {CACHE_VERSION}; delete it to rebuild")
        if meta.get("key") != key:
            raise DataError(f"{self.path}: cache key {meta.get('key')!r} is not {key!r}; delete it to rebuild")
        self.length = int(meta["length"])

    def get(self, record: int) -> dict[str, Any] | None:
        """The processed sample of source record ``record``, or ``None`` when it is not stored."""
        with shared_env(self.path, False).begin() as txn:
            value = txn.get(_record_key(record))
        if value is None:
            return None
        return decode_processed(value, f"{self.path}: record {record}")


# ---------------------------------------------------------------- building (one file, atomically)

_BUILD_PROCESS: Callable[[int], dict[str, Any]] | None = None


def _init_worker(process: Callable[[int], dict[str, Any]]) -> None:
    global _BUILD_PROCESS
    torch.set_num_threads(1)
    _BUILD_PROCESS = process


def _encode_chunk(indices: Sequence[int]) -> list[bytes]:
    assert _BUILD_PROCESS is not None
    return [encode_processed(_BUILD_PROCESS(i)) for i in indices]


def _encoded(
    process: Callable[[int], dict[str, Any]], count: int, workers: int, chunk: int = 64
) -> Iterator[tuple[int, bytes]]:
    """``(index, encoded sample)`` for ``index`` in ``range(count)``, in order, over ``workers`` processes."""
    if workers <= 1:
        for i in range(count):
            yield i, encode_processed(process(i))
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    chunks = [range(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (process,)) as pool:
        for part, values in zip(chunks, pool.imap(_encode_chunk, chunks)):
            yield from zip(part, values)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is the user's affair
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(path: Path) -> list[Path]:
    """Delete temporary files of interrupted builds of ``path`` (call with the lock held)."""
    removed = []
    for leftover in leftover_temporaries(path, temporary_suffix(path)):
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed.append(leftover)
    return removed


def build_disk_cache(
    process: Callable[[int], dict[str, Any]],
    count: int,
    record_of: Callable[[int], int],
    path: str | Path,
    key: str,
    *,
    workers: int = 0,
    progress: bool | None = None,
    description: str = "",
    commit_every: int = 64,
) -> Path:
    """Write the processed samples ``process(0) ... process(count - 1)`` to a graph cache file.

    Does nothing when a valid cache with ``key`` already exists at ``path`` (another
    process may have built it while this one waited for the lock).

    Parameters
    ----------
    process
        ``index -> processed sample`` (the dataset's raw sample through its deterministic
        transforms). Must be picklable when ``workers > 1`` on a platform without ``fork``.
    count
        Number of samples.
    record_of
        ``index -> record index`` in the source file (the key of the record).
    path
        The ``.lmdb`` cache file.
    key
        Cache key stored in the metadata and checked on reading.
    workers
        Processes computing samples in parallel (default 0: this process).
    progress
        Show a progress bar (``None``: when stderr is a terminal).
    description
        Label of the progress bar.
    commit_every
        Records per write transaction (default 64).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    with _exclusive(path.with_name(path.name + ".lock")):
        if path.exists():
            try:
                DiskGraphStore(path, key)
                return path
            except DataError:
                close_env(path)
                path.unlink()  # a foreign, stale or cut file under our name: rebuild
        _remove_leftovers(path)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=count,
            desc=description or f"graph cache {path.name}",
            unit="structure",
            disable=None if progress is None else not progress,
        )

        def entries() -> Iterator[tuple[bytes, bytes]]:
            for index, value in _encoded(process, count, int(workers)):
                bar.update(1)
                yield _record_key(record_of(index)), value

        def metadata(length: int) -> dict[str, Any]:
            return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "length": length}

        try:
            write_lmdb_entries(entries(), path, metadata, commit_every=commit_every)
        finally:
            bar.close()
    return path


def cache_file_name(stem: str, key: str) -> str:
    """``<stem>-<first 16 hex digits of key>.lmdb``: one file per source and transform settings."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "dataset"
    return f"{safe}-{key[:16]}.lmdb"


def default_graph_cache_dir() -> Path:
    """``graphs/`` under the package cache folder (``$MATSCIML_CACHE``, ``$XDG_CACHE_HOME/matsciml``, ...)."""
    from matsciml.datasets.devset import default_cache_dir

    return default_cache_dir() / "graphs"
