"""Lazy random access to Open MatSciML Toolkit LMDB datasets, through the restricted unpickler.

Layout read: a ``.lmdb`` file, or a folder of ``*.lmdb`` files (``subdir=False``; a
folder holding ``data.mdb`` is read too). Keys are ASCII integers, not necessarily
contiguous; other keys (``metadata``) are skipped. Records are pickled dicts, read with
:func:`~matsciml.datasets.upstream.safe_pickle.safe_loads` and mapped to samples by the
dataset's :class:`~matsciml.datasets.upstream.records.UpstreamFormat` (chosen by name, or
detected from the layout of the first record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets.readers.lmdb_format import METADATA_KEY, _file_key, close_env, lmdb_files, shared_env
from matsciml.datasets.upstream.records import FORMATS, UpstreamFormat, detect
from matsciml.datasets.upstream.safe_pickle import safe_loads

__all__ = ["UpstreamLMDBReader", "is_upstream_lmdb", "integer_keys"]


def integer_keys(env: Any) -> list[int]:
    """The record keys of an environment (ASCII integers), sorted numerically."""
    keys = []
    with env.begin() as txn:
        for key in txn.cursor().iternext(keys=True, values=False):
            if key.isdigit():
                keys.append(int(key))
    keys.sort()
    return keys


def is_upstream_lmdb(path: str | Path) -> bool:
    """Whether ``path`` is an LMDB (file or folder) in the toolkit's layout: integer keys, no matsciml metadata."""
    try:
        files = lmdb_files(path)
    except DataError:
        return False
    file, subdir = files[0]
    env = shared_env(file, subdir)
    with env.begin() as txn:
        if txn.get(METADATA_KEY) is not None:
            return False
        cursor = txn.cursor()
        return any(key.isdigit() for key in cursor.iternext(keys=True, values=False))


def _format(dataset: str | UpstreamFormat | None) -> UpstreamFormat | None:
    if dataset is None or isinstance(dataset, UpstreamFormat):
        return dataset
    if dataset not in FORMATS:
        raise ConfigError(f"upstream dataset {dataset!r} is not known; {closest(dataset, FORMATS)}")
    return FORMATS[dataset]


class UpstreamLMDBReader:
    """Samples of an Open MatSciML Toolkit LMDB dataset, read on access.

    Parameters
    ----------
    path
        A ``.lmdb`` file or a folder of them.
    dataset
        The toolkit's class name of the data (``"OQMDDataset"``, ...; see
        :data:`~matsciml.datasets.upstream.records.FORMATS`), or ``None`` to detect it from
        the first record.

    Attributes
    ----------
    format
        The :class:`~matsciml.datasets.upstream.records.UpstreamFormat` in use.
    target_keys
        The targets of the first record (records of one dataset share their keys).

    Raises
    ------
    DataError
        Not an LMDB, no integer keys, a record that cannot be read safely, or a layout that
        matches no known dataset (the message lists them).
    ConfigError
        ``dataset`` is not a known name.
    """

    lazy = True

    def __init__(self, path: str | Path, dataset: str | UpstreamFormat | None = None) -> None:
        self.path = Path(path)
        self._files = lmdb_files(self.path)
        self._ids: list[tuple] = []
        self._keys: list[list[int]] = []
        for file, subdir in self._files:
            self._ids.append(_file_key(file, subdir))
            self._keys.append(integer_keys(shared_env(file, subdir)))
        self._offsets = np.cumsum([0] + [len(k) for k in self._keys])
        if len(self) == 0:
            raise DataError(f"{self.path}: no records with integer keys; not an Open MatSciML Toolkit LMDB dataset")
        fmt = _format(dataset)
        if fmt is None:
            first = self.record(0)
            fmt = detect(first)
            if fmt is None:
                keys = sorted(first)[:12] if isinstance(first, dict) else type(first).__name__
                raise DataError(
                    f"{self.path}: neither this package's LMDB (no '__metadata__' key, as write_lmdb writes) nor a "
                    f"known Open MatSciML Toolkit layout (first record: {keys}). Name the toolkit's dataset class "
                    f"(dataset: NAME in the config, --dataset NAME for matsciml-convert; one of "
                    f"{', '.join(FORMATS)}), or write the data with write_lmdb"
                )
        self.format = fmt
        first_targets = self[0]["targets"]
        self.target_keys = sorted(first_targets)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with 'spawn' receive the reader pickled: send the
        # format by name (its functions are module-level, its detector may be a lambda)
        state = dict(self.__dict__)
        state["format"] = self.format.name if self.format.name in FORMATS else self.format
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("format"), str):
            state["format"] = FORMATS[state["format"]]
        self.__dict__.update(state)

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} records")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, self._keys[shard][index - int(self._offsets[shard])]

    def raw_bytes(self, index: int) -> bytes:
        """The stored (pickled) bytes of record ``index``."""
        shard, key = self._locate(index)
        file, subdir = self._files[shard]
        with shared_env(file, subdir, self._ids[shard]).begin() as txn:
            value = txn.get(str(key).encode("ascii"))
        if value is None:
            raise DataError(f"{file}: key {str(key)!r}: missing from the file; the file changed while being read")
        return bytes(value)

    def record(self, index: int) -> Any:
        """Record ``index`` as stored (unpickled with the allowlist, not mapped)."""
        shard, key = self._locate(index)
        return safe_loads(self.raw_bytes(index), self._files[shard][0], key)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, key = self._locate(index)
        file = self._files[shard][0]
        record = safe_loads(self.raw_bytes(index), file, key)
        try:
            return self.format.to_sample(record, file, key)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"{file}: key {str(key)!r}: cannot map the record as {self.format.name} ({type(err).__name__}: {err}); "
                "check that the dataset class matches the data"
            ) from None

    def close(self) -> None:
        """Close this process's environments of the reader's files (they reopen on the next access)."""
        for file, subdir in self._files:
            close_env(file, subdir)
