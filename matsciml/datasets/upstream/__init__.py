"""Read the Open MatSciML Toolkit's LMDB datasets safely, under its dataset class names.

* :mod:`~.safe_pickle`: the restricted unpickler (an allowlist of globals; extend it with
  :func:`allow_global`).
* :mod:`~.records`: what each dataset's records hold and how they become samples.
* :mod:`~.reader`: :class:`UpstreamLMDBReader`, lazy random access to a folder of ``*.lmdb``.
* :mod:`~.classes`: ``OQMDDataset``, ``LiPSDataset``, ... (registered dataset classes).

See ``docs/coming_from_upstream.rst``.
"""

from __future__ import annotations

from typing import Any

from matsciml.datasets.upstream.reader import UpstreamLMDBReader, is_upstream_lmdb
from matsciml.datasets.upstream.records import FORMATS, UpstreamFormat
from matsciml.datasets.upstream.safe_pickle import UnsafeRecordError, allow_global, allowed_globals, safe_loads

__all__ = [
    "UpstreamLMDBReader",
    "is_upstream_lmdb",
    "FORMATS",
    "UpstreamFormat",
    "UnsafeRecordError",
    "allow_global",
    "allowed_globals",
    "safe_loads",
    "UpstreamDataset",
    *FORMATS,
]


def __getattr__(name: str) -> Any:
    # The dataset classes import StructureDataset, which imports the readers that import
    # this package: load them on first use.
    if name == "UpstreamDataset" or name in FORMATS:
        from matsciml.datasets.upstream import classes

        return getattr(classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
