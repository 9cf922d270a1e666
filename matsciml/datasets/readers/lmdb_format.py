"""This package's LMDB format: a reader that loads records lazily, and an atomic writer.

.. rubric:: Layout (format version 1)

An LMDB environment stored as a single file ``NAME.lmdb`` (LMDB's ``subdir=False``
layout; a directory ``NAME.lmdb/`` holding ``data.mdb`` is read too, and so is a
directory of several ``*.lmdb`` files, read one after the other as shards).

* key ``b"__metadata__"``: UTF-8 JSON ``{"format": "matsciml-lmdb", "version": 1,
  "length": n, "target_keys": [...]}``.
* keys ``b"0000000000"``, ``b"0000000001"``, ...: one record per sample, encoded as
  ``b"MSML"`` + a little-endian ``uint32`` header length + a UTF-8 JSON header + the raw
  bytes of each array (8-byte aligned). The header holds the record ``id`` and, per array
  (``pos``, ``atomic_numbers``, ``cell``, ``pbc``, ``targets/<key>``), its NumPy dtype
  string, shape and byte offset. Only plain numeric and boolean dtypes are allowed, so
  reading a record never runs code (no pickle), and decoded tensors are bit-for-bit the
  ones written.

The writer fills a temporary file beside ``NAME.lmdb``
(:func:`~matsciml.common.atomic.atomic_path`, ``.partial-<pid>-<hex>.NAME.lmdb.tmp``) and
moves it onto ``NAME.lmdb`` with :func:`os.replace` once complete, so an interrupted write
never leaves a half-written dataset under the final name.

Example::

    from matsciml.datasets import StructureDataset
    from matsciml.datasets.readers import write_lmdb

    write_lmdb(StructureDataset("train.extxyz"), "train.lmdb")
    dataset = StructureDataset("train.lmdb")
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matsciml.common.atomic import atomic_path
from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets import schema
from matsciml.datasets.readers.common import atoms_to_sample

__all__ = [
    "LMDBReader",
    "write_lmdb",
    "encode_record",
    "decode_record",
    "encode_arrays",
    "decode_arrays",
    "write_lmdb_entries",
    "temporary_suffix",
    "lmdb_files",
    "shared_env",
    "close_env",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
]

FORMAT_NAME = "matsciml-lmdb"
FORMAT_VERSION = 1
METADATA_KEY = b"__metadata__"
_MAGIC = b"MSML"
_ALIGN = 8
_TARGET_PREFIX = "targets/"
_ALLOWED_DTYPES = {"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1"}
_ITEMSIZE = {dtype: np.dtype(dtype).itemsize for dtype in _ALLOWED_DTYPES}


def _key(index: int) -> bytes:
    return f"{index:010d}".encode("ascii")


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value, order="C")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr


def encode_record(sample: dict[str, Any]) -> bytes:
    """Serialise one sample (``pos``, ``atomic_numbers``, ``cell``, ``pbc``, ``id``, ``targets``).

    Other keys (``source``, transform outputs such as ``graph``) are not stored.

    Raises
    ------
    DataError
        A key is missing or an array has a dtype the format does not hold.
    """
    missing = [k for k in (schema.POS, schema.ATOMIC_NUMBERS) if k not in sample]
    if missing:
        raise DataError(f"sample {sample.get(schema.ID, '?')!r}: key {missing[0]!r} missing; cannot store it")
    arrays = {
        schema.POS: _as_array(sample[schema.POS]),
        schema.ATOMIC_NUMBERS: _as_array(sample[schema.ATOMIC_NUMBERS]),
        schema.CELL: _as_array(sample.get(schema.CELL, np.zeros((1, 3, 3), dtype=np.float32))),
        schema.PBC: _as_array(sample.get(schema.PBC, np.zeros(3, dtype=bool))),
    }
    for key, value in (sample.get(schema.TARGETS) or {}).items():
        arrays[_TARGET_PREFIX + key] = _as_array(value)
    return encode_arrays(arrays, {"id": str(sample.get(schema.ID, ""))})


def encode_arrays(arrays: dict[str, Any], header: dict[str, Any]) -> bytes:
    """Serialise named numeric arrays and a JSON ``header`` into one record (the layout above).

    Parameters
    ----------
    arrays
        ``{name: array or tensor}`` of float, integer or bool dtype.
    header
        Plain JSON data stored with the arrays (its ``"id"`` names the record in errors);
        the key ``"arrays"`` is filled here.

    Raises
    ------
    DataError
        An array has a dtype the format does not hold.
    """
    header = dict(header, arrays={})
    chunks = []
    offset = 0
    for name, value in arrays.items():
        arr = _as_array(value)
        dtype = arr.dtype.str
        if dtype not in _ALLOWED_DTYPES:
            raise DataError(
                f"sample {header.get('id', '')!r}: key {name!r}: dtype {arr.dtype} cannot be stored; "
                "use float, integer or bool arrays"
            )
        data = arr.tobytes()
        header["arrays"][name] = [dtype, list(arr.shape), offset]
        pad = (-len(data)) % _ALIGN
        chunks.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * ((-(len(head) + 8)) % _ALIGN)
    return _MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def decode_record(value: bytes, file: str | Path = "", index: int = 0) -> dict[str, Any]:
    """Rebuild a sample from :func:`encode_record` bytes (``source`` is set to ``file``/``index``).

    Raises
    ------
    DataError
        The bytes are not a record of this format, or are cut short.
    """
    header, out = decode_arrays(value, f"{file}: record {index}")
    targets = {k[len(_TARGET_PREFIX) :]: v for k, v in out.items() if k.startswith(_TARGET_PREFIX)}
    z = out[schema.ATOMIC_NUMBERS]
    return {
        schema.POS: out[schema.POS],
        schema.ATOMIC_NUMBERS: z,
        schema.CELL: out[schema.CELL],
        schema.PBC: out[schema.PBC],
        schema.NATOMS: int(z.shape[0]),
        schema.ID: header["id"],
        schema.SOURCE: {"file": str(file), "index": int(index)},
        schema.TARGETS: targets,
    }


def decode_arrays(value: bytes, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode_arrays`: ``(header, {name: tensor})``, tensors bit-for-bit as written.

    Parameters
    ----------
    value
        The record's bytes.
    where
        Names the record in errors (``"<file>: record 3"``).

    Raises
    ------
    DataError
        The bytes are not a record of this format, or are cut short.
    """
    if value[:4] != _MAGIC or len(value) < 8:
        raise DataError(f"{where}: not a matsciml LMDB record; rewrite the file with write_lmdb")
    (head_len,) = struct.unpack("<I", value[4:8])
    try:
        header = json.loads(bytes(value[8 : 8 + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{where}: corrupt record header; rewrite the file with write_lmdb") from None
    body = bytearray(value[8 + head_len :])
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, offset) in header["arrays"].items():
        if dtype not in _ALLOWED_DTYPES:
            raise DataError(f"{where}: key {name!r}: unsupported dtype {dtype!r}; rewrite the file with write_lmdb")
        count = math.prod(shape)
        nbytes = count * _ITEMSIZE[dtype]
        if offset + nbytes > len(body):
            raise DataError(f"{where}: key {name!r}: record cut short; the file is corrupt: rewrite it")
        arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
        out[name] = torch.from_numpy(arr)
    return header, out


def lmdb_files(path: str | Path) -> list[tuple[Path, bool]]:
    """Return the LMDB environments at ``path`` as ``(path, subdir)`` pairs.

    ``path`` is a ``.lmdb`` file, a directory with ``data.mdb``, or a directory of
    ``*.lmdb`` files (shards, sorted by name).

    Raises
    ------
    DataError
        Nothing LMDB-like at ``path``.
    """
    path = Path(path)
    if path.is_file():
        return [(path, False)]
    if path.is_dir():
        if (path / "data.mdb").is_file():
            return [(path, True)]
        shards = sorted(p for p in path.iterdir() if p.suffix == ".lmdb")
        if shards:
            out: list[tuple[Path, bool]] = []
            for shard in shards:
                out.extend(lmdb_files(shard))
            return out
        raise DataError(f"{path}: an LMDB directory must hold data.mdb or *.lmdb files; found neither")
    raise DataError(f"{path}: no such file or directory")


def _open_env(path: Path, subdir: bool) -> Any:
    import lmdb

    try:
        return lmdb.open(
            str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048
        )
    except lmdb.Error as err:
        raise DataError(f"{path}: cannot open as LMDB ({err}); the file is not an LMDB or is corrupt") from None


# LMDB refuses to open the same file twice in one process, so every reader of this process
# shares one read-only environment per file (keyed by device and inode, so a file replaced
# by write_lmdb gets a fresh one). A forked child (a DataLoader worker) drops the
# environments it inherited and opens its own.
_ENVS: dict[tuple, Any] = {}
_ENVS_PID = os.getpid()


def _file_key(path: Path, subdir: bool) -> tuple:
    st = os.stat(path / "data.mdb" if subdir else path)
    return (st.st_dev, st.st_ino, subdir)


def shared_env(path: str | Path, subdir: bool, expected: tuple | None = None) -> Any:
    """Return this process's read-only LMDB environment for ``path`` (opened on first use).

    Parameters
    ----------
    path, subdir
        The environment, as returned by :func:`lmdb_files`.
    expected
        The file identity seen when the dataset was opened; a different one means the file
        was replaced meanwhile.

    Raises
    ------
    DataError
        The file is missing, was replaced, is not an LMDB, or is corrupt.
    """
    global _ENVS_PID
    path = Path(path)
    if os.getpid() != _ENVS_PID:
        for env in _ENVS.values():
            try:
                env.close()  # unmaps the parent's environment in this child only
            except Exception:  # a broken inherited handle must not stop the worker
                pass
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    try:
        key = _file_key(path, subdir)
    except OSError as err:
        raise DataError(f"{path}: cannot read the LMDB file ({err}); check the path") from None
    if expected is not None and key != expected:
        raise DataError(
            f"{path}: the file was replaced after the dataset was opened; create the dataset again to read the new file"
        )
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = _open_env(path, subdir)
    return env


def close_env(path: str | Path, subdir: bool = False) -> None:
    """Close and forget this process's environment of ``path`` (before the file is deleted or replaced)."""
    try:
        key = _file_key(Path(path), subdir)
    except OSError:
        return
    env = _ENVS.pop(key, None)
    if env is not None:
        env.close()


def _read_metadata(env: Any, path: Path) -> dict[str, Any]:
    with env.begin() as txn:
        raw = txn.get(METADATA_KEY)
        count = txn.stat()["entries"]
    if raw is None:
        raise DataError(
            f"{path}: key {METADATA_KEY.decode()!r} missing: not an LMDB written by matsciml.write_lmdb "
            f"({count} entries). LMDBs of other tools (e.g. pickled records) are not read, since unpickling "
            "can run code; convert them with write_lmdb"
        )
    meta = json.loads(bytes(raw).decode("utf-8"))
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: metadata format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise DataError(
            f"{path}: format version {meta['version']} is newer than this matsciml reads ({FORMAT_VERSION}); "
            "upgrade matsciml"
        )
    if int(meta.get("length", -1)) != count - 1:
        raise DataError(
            f"{path}: metadata says {meta.get('length')} records but the file holds {count - 1}; "
            "the file is incomplete: rewrite it with write_lmdb"
        )
    return meta


class LMDBReader:
    """Random access to the records of one or more matsciml LMDB files, read lazily.

    The LMDB environments are shared by all readers of a process and reopened in each
    forked or spawned worker, so the reader can be handed to ``DataLoader`` workers.

    Parameters
    ----------
    path
        A ``.lmdb`` file, a directory holding ``data.mdb``, or a directory of ``*.lmdb``
        shards.

    Raises
    ------
    DataError
        The path is not a readable matsciml LMDB (see :func:`lmdb_files`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files = lmdb_files(self.path)
        self._lengths: list[int] = []
        keys: set[str] = set()
        self._keys: list[tuple] = []
        for file, subdir in self._files:
            meta = _read_metadata(shared_env(file, subdir), file)
            self._keys.append(_file_key(file, subdir))
            self._lengths.append(int(meta["length"]))
            keys.update(meta.get("target_keys", []))
        self.target_keys = sorted(keys)
        self._offsets = np.cumsum([0] + self._lengths)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        local = index - int(self._offsets[shard])
        file = self._files[shard][0]
        with shared_env(file, self._files[shard][1], self._keys[shard]).begin() as txn:
            value = txn.get(_key(local))
        if value is None:
            raise DataError(f"{file}: record {local}: missing from the file; the file is incomplete: rewrite it")
        return decode_record(value, file, local)

    def close(self) -> None:
        """Close this process's environments of the reader's files (they reopen on the next access)."""
        for file, subdir in self._files:
            close_env(file, subdir)


def _iter_samples(records: Any, path: Path) -> Iterable[dict[str, Any]]:
    raw = getattr(records, "raw", None)
    if callable(raw) and hasattr(records, "__len__"):
        for i in range(len(records)):
            yield raw(i)
        return
    for i, record in enumerate(records):
        if isinstance(record, dict):
            yield record
        elif hasattr(record, "get_positions") and hasattr(record, "arrays"):
            yield atoms_to_sample(record, path, i)
        else:
            raise DataError(
                f"{path}: record {i}: cannot store a {type(record).__name__}; pass sample dicts or ase.Atoms"
            )


def write_lmdb(
    records: Iterable[Any],
    path: str | Path,
    *,
    overwrite: bool = False,
    commit_every: int = 1000,
    map_size: int = 1 << 28,
) -> Path:
    """Write samples (or ``ase.Atoms``) to a matsciml LMDB file, atomically.

    Parameters
    ----------
    records
        Sample dicts (as returned by the readers), ``ase.Atoms`` (labels found as by
        :func:`~matsciml.datasets.readers.common.atoms_to_sample`), or a dataset with
        ``raw(i)`` such as :class:`~matsciml.datasets.StructureDataset` (its samples are
        stored without transforms).
    path
        Output file; its name must end in ``.lmdb``.
    overwrite
        Replace an existing file at ``path`` (default ``False``).
    commit_every
        Records per write transaction (default 1000).
    map_size
        Initial LMDB map size in bytes (default 256 MiB); doubled whenever it fills up.

    Returns
    -------
    Path
        ``path``, holding every record and the ``__metadata__`` record (format, version,
        length, target keys).

    Raises
    ------
    ConfigError
        ``path`` does not end in ``.lmdb`` or is a directory.
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    DataError
        A record cannot be stored (see :func:`encode_record`).
    """
    path = Path(path)
    if path.suffix != ".lmdb":
        raise ConfigError(f"write_lmdb: path {str(path)!r} must end in '.lmdb' so that readers recognise it")
    if path.is_dir():
        raise ConfigError(f"write_lmdb: path {str(path)!r} is a directory; give a file name ending in '.lmdb'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_lmdb: {path} exists; pass overwrite=True to replace it")
    target_keys: set[str] = set()

    def entries() -> Iterable[tuple[bytes, bytes]]:
        for count, sample in enumerate(_iter_samples(records, path)):
            target_keys.update((sample.get(schema.TARGETS) or {}).keys())
            yield _key(count), encode_record(sample)

    def metadata(count: int) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "length": count, "target_keys": sorted(target_keys)}

    return write_lmdb_entries(entries(), path, metadata, commit_every=commit_every, map_size=map_size)


def write_lmdb_entries(
    entries: Iterable[tuple[bytes, bytes]],
    path: str | Path,
    metadata: Any,
    *,
    commit_every: int = 1000,
    map_size: int = 1 << 28,
) -> Path:
    """Write ``(key, value)`` entries and a JSON metadata record to an LMDB file, atomically.

    The entries go to a temporary file beside ``path`` (:func:`~matsciml.common.atomic.atomic_path`,
    named ``.partial-<pid>-<hex>`` + :func:`temporary_suffix`), which is synced and moved
    onto ``path`` with :func:`os.replace` once complete: a reader finds the whole file or
    none (an existing file at ``path`` is replaced). After an exception the temporary file
    is removed; after a kill it is left behind under its temporary name, never under
    ``path``, and :func:`~matsciml.common.atomic.leftover_temporaries` finds it.

    Parameters
    ----------
    entries
        ``(key, value)`` byte pairs.
    path
        Output file.
    metadata
        ``metadata(count) -> dict``: called after the last entry with the number of
        entries; stored as UTF-8 JSON under :data:`METADATA_KEY`.
    commit_every, map_size
        As for :func:`write_lmdb`.
    """
    import lmdb

    path = Path(path)
    count = 0
    with atomic_path(path, suffix=temporary_suffix(path)) as tmp:
        env = lmdb.open(str(tmp), subdir=False, map_size=map_size, lock=False, meminit=False, sync=False)

        def flush(batch: list[tuple[bytes, bytes]]) -> None:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in batch:
                            txn.put(key, value)
                    return
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)

        try:
            batch: list[tuple[bytes, bytes]] = []
            for key, value in entries:
                batch.append((key, value))
                count += 1
                if len(batch) >= commit_every:
                    flush(batch)
                    batch = []
            batch.append((METADATA_KEY, json.dumps(metadata(count), sort_keys=True).encode("utf-8")))
            flush(batch)
            env.sync(True)
        finally:
            env.close()
    return path


def temporary_suffix(path: str | Path) -> str:
    """Ending of the temporary name of an LMDB file being written to ``path``: ``.NAME.tmp``.

    It names the target (so the leftovers of a killed write of ``path`` can be told from
    those of other files) and does not end in ``.lmdb`` (so that no reader of a folder of
    shards takes it for data).
    """
    return f".{Path(path).name}.tmp"
