"""A restricted unpickler for the records of Open MatSciML Toolkit LMDB files.

Those records are ``pickle`` (protocol 5) dicts. Plain :func:`pickle.loads` would call
whatever callable a record names, so a downloaded file could run any command. This
module reads them with an **allowlist**: a record may only name the globals below; any
other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) stops the read
with :class:`UnsafeRecordError` before anything is called.

Globals a record may name, and what they load as:

* ``torch.storage._load_from_bytes``: the nested legacy ``torch.save`` blob of a storage,
  parsed without running code (any other blob: ``torch.load(..., weights_only=True)``);
* ``torch._utils._rebuild_tensor_v2``: torch's own tensor rebuild (also allowed by
  ``weights_only`` loads); ``collections.OrderedDict`` (the tensors' empty hook dicts);
* ``numpy.dtype`` (object dtypes are refused), ``numpy.ndarray``,
  ``numpy.core.numeric._frombuffer``, ``numpy.core.multiarray.scalar`` and
  ``numpy.core.multiarray._reconstruct`` (as their ``numpy._core`` versions);
* ``pymatgen.core``: ``structure.Structure``/``IStructure``/``Molecule``,
  ``lattice.Lattice``, ``sites.PeriodicSite``/``Site``,
  ``periodic_table.Element``/``Species``/``DummySpecies``, ``composition.Composition``
  (pymatgen is imported when a record needs it);
* ``emmet.core.symmetry.SymmetryData`` and ``CrystalSystem``: small stand-ins
  (:class:`SymmetryData`, :class:`CrystalSystem`), so emmet is not needed;
* ``copyreg._reconstructor`` and ``builtins.object``: generic object rebuilding of
  protocol 0/1 records (the class rebuilt must itself be allowed);
* ``torch_geometric.data.data.Data`` and its storages: :class:`GraphRecord` (the fields as
  a dict; PyG is not imported).

A record naming a ``dgl.*`` class (a DGL graph) is refused with an error that says so.

``numpy.core.*`` names (NumPy 1 pickles) resolve to ``numpy._core.*`` (NumPy 2).

Extending the allowlist
-----------------------
Records of your own that hold other classes are read once you allow those classes by
name (there is deliberately no switch that falls back to plain ``pickle``)::

    from matsciml.datasets.upstream import allow_global

    allow_global("my_package.records", "MyRecord")             # imports my_package.records.MyRecord
    allow_global("old.module", "Thing", replacement=NewThing)  # or maps a name to an object

Only allow classes whose construction from pickled state cannot run code you do not
trust.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from matsciml.common.errors import DataError

__all__ = [
    "UnsafeRecordError",
    "SafeUnpickler",
    "safe_loads",
    "allow_global",
    "allowed_globals",
    "SymmetryData",
    "CrystalSystem",
    "GraphRecord",
]


class UnsafeRecordError(DataError):
    """A pickled record names a global that is not on the allowlist (nothing was executed)."""


# --------------------------------------------------------------------------- stand-ins


class CrystalSystem(str, Enum):
    """Stand-in for ``emmet.core.symmetry.CrystalSystem`` (the seven crystal systems)."""

    tri = "Triclinic"
    mono = "Monoclinic"
    ortho = "Orthorhombic"
    tet = "Tetragonal"
    trig = "Trigonal"
    hex_ = "Hexagonal"
    cubic = "Cubic"

    def __str__(self) -> str:
        return str(self.value)


class SymmetryData:
    """Stand-in for ``emmet.core.symmetry.SymmetryData`` (a pydantic model upstream).

    Holds the pickled fields as attributes: ``crystal_system``, ``symbol`` (Hermann-Mauguin),
    ``number`` (space group, 1-230), ``point_group``, ``symprec``, ``version``.
    """

    crystal_system: Any = None
    symbol: str | None = None
    number: int | None = None
    point_group: str | None = None
    symprec: float | None = None
    version: str | None = None

    def __setstate__(self, state: Any) -> None:
        # pydantic v2 pickles {"__dict__": fields, "__pydantic_extra__": ..., ...};
        # pydantic v1 pickles {"__dict__": fields, "__fields_set__": ...}.
        fields = state.get("__dict__", state) if isinstance(state, dict) else {}
        if isinstance(fields, dict):
            for key, value in fields.items():
                if isinstance(key, str) and not key.startswith("__"):
                    object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        return f"SymmetryData(number={self.number!r}, symbol={self.symbol!r}, point_group={self.point_group!r})"


class GraphRecord:
    """Stand-in for a pickled PyG ``Data`` (the OCP S2EF/IS2RE records): its fields as a dict.

    Reads both layouts PyG has pickled: the attribute dict of old versions and the
    ``_store`` (a ``GlobalStorage``) of current ones.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fields: dict[str, Any] = dict(kwargs)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        store = state.get("_store")
        if isinstance(store, _Storage):
            self.fields = dict(store.mapping)
        else:
            self.fields = {k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("_")}


class _Storage:
    """Stand-in for PyG's ``GlobalStorage``/``NodeStorage``/``EdgeStorage`` (a mapping of fields)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.mapping: dict[str, Any] = dict(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.mapping = dict(state.get("_mapping") or {})


class _Ignored:
    """Stand-in for bookkeeping objects of pickled PyG data (attribute descriptors); holds nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# --------------------------------------------------------------------------- nested torch blobs


#: Storage classes of torch's legacy serialisation -> element dtype name.
_LEGACY_STORAGES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _NotLegacyStorage(Exception):
    """The blob is not a single storage in torch's legacy format (read it with torch.load instead)."""


class _LegacyStorageUnpickler(pickle.Unpickler):
    """The pickles of a legacy ``torch.save`` blob: only storage class names are resolved (to names)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _LEGACY_STORAGES:
            return name
        raise _NotLegacyStorage(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _legacy_storage(blob: bytes) -> Any:
    """Read one storage from a legacy-format ``torch.save`` blob without running code.

    The blob is five small pickles (magic number, protocol, system info, the persistent id
    ``('storage', <class name>, key, location, numel, None)``, the list of keys) and the raw
    little-endian elements preceded by their count (8 bytes). Only that exact shape is read;
    anything else raises :class:`_NotLegacyStorage`.
    """
    import torch

    f = io.BytesIO(blob)
    if _LegacyStorageUnpickler(f).load() != _LEGACY_MAGIC:
        raise _NotLegacyStorage("magic")
    _LegacyStorageUnpickler(f).load()  # protocol version
    info = _LegacyStorageUnpickler(f).load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise _NotLegacyStorage("byte order")
    pid = _LegacyStorageUnpickler(f).load()
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and pid[5] is None):
        raise _NotLegacyStorage("persistent id")
    if _LegacyStorageUnpickler(f).load() != [pid[2]]:
        raise _NotLegacyStorage("keys")
    dtype = getattr(torch, _LEGACY_STORAGES[pid[1]])
    start = f.tell() + 8
    count = int.from_bytes(blob[start - 8 : start], "little")
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if start + nbytes != len(blob):
        raise _NotLegacyStorage("length")
    data = torch.frombuffer(bytearray(blob[start:]), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)


def _load_from_bytes(blob: bytes) -> Any:
    """Read a nested ``torch.save`` blob (a storage) without running code.

    A single storage in torch's legacy format (what the toolkit's records hold) is parsed
    directly (:func:`_legacy_storage`, several times faster); any other blob is read with
    ``torch.load(..., weights_only=True)``.
    """
    try:
        return _legacy_storage(blob)
    except (_NotLegacyStorage, pickle.UnpicklingError, EOFError, ValueError, TypeError):
        import torch

        return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")


def _dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} holds Python objects, which are not read")
    return dtype


def _rebuild_tensor_v2(*args: Any) -> Any:
    from torch._utils import _rebuild_tensor_v2 as rebuild

    return rebuild(*args)


# --------------------------------------------------------------------------- the allowlist

#: (module, name) -> the object, or a zero-argument function returning it (imported on use).
_ALLOWED: dict[tuple[str, str], Any] = {}
_RESOLVED: dict[tuple[str, str], Any] = {}


def _importer(module: str, name: str) -> Callable[[], Any]:
    def load() -> Any:
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError as err:
            top = module.split(".")[0]
            raise DataError(f"reading this record needs {module}.{name}: install {top} ({err})") from None

    load.lazy_import = True  # type: ignore[attr-defined]
    return load


def _builtin_allowlist() -> None:
    _ALLOWED.update(
        {
            ("torch.storage", "_load_from_bytes"): _load_from_bytes,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("collections", "OrderedDict"): OrderedDict,
            ("numpy", "dtype"): _dtype,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy._core.numeric", "_frombuffer"): _importer("numpy._core.numeric", "_frombuffer"),
            ("numpy._core.multiarray", "scalar"): _importer("numpy._core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"): _importer("numpy._core.multiarray", "_reconstruct"),
            ("emmet.core.symmetry", "SymmetryData"): SymmetryData,
            ("emmet.core.symmetry", "CrystalSystem"): CrystalSystem,
            ("emmet.core.settings", "CrystalSystem"): CrystalSystem,
            ("copyreg", "_reconstructor"): _importer("copyreg", "_reconstructor"),
            ("torch_geometric.data.data", "Data"): GraphRecord,
            ("torch_geometric.data.storage", "GlobalStorage"): _Storage,
            ("torch_geometric.data.storage", "NodeStorage"): _Storage,
            ("torch_geometric.data.storage", "EdgeStorage"): _Storage,
            ("torch_geometric.data.data", "DataEdgeAttr"): _Ignored,
            ("torch_geometric.data.data", "DataTensorAttr"): _Ignored,
            ("builtins", "object"): object,
        }
    )
    for module, name in (
        ("pymatgen.core.structure", "Structure"),
        ("pymatgen.core.structure", "IStructure"),
        ("pymatgen.core.structure", "Molecule"),
        ("pymatgen.core.lattice", "Lattice"),
        ("pymatgen.core.sites", "PeriodicSite"),
        ("pymatgen.core.sites", "Site"),
        ("pymatgen.core.periodic_table", "Element"),
        ("pymatgen.core.periodic_table", "Species"),
        ("pymatgen.core.periodic_table", "DummySpecies"),
        ("pymatgen.core.composition", "Composition"),
    ):
        _ALLOWED[(module, name)] = _importer(module, name)


_builtin_allowlist()


def _canonical_module(module: str) -> str:
    if module == "numpy.core" or module.startswith("numpy.core."):
        return "numpy._core" + module[len("numpy.core") :]
    return module


def allow_global(module: str, name: str, replacement: Any = None) -> None:
    """Add ``module.name`` to the allowlist of the upstream reader.

    Parameters
    ----------
    module, name
        The global as pickled records name it (e.g. ``"my_package.records"``, ``"MyRecord"``).
    replacement
        The object to use for it (default ``None``: import ``module.name`` when a record
        first needs it).

    Raises
    ------
    ValueError
        ``module`` or ``name`` is empty.
    """
    if not module or not name:
        raise ValueError("allow_global: give the module and the name of the global, e.g. ('my_pkg.mod', 'MyClass')")
    key = (_canonical_module(module), name)
    _ALLOWED[key] = replacement if replacement is not None else _importer(module, name)
    _RESOLVED.clear()


def allowed_globals() -> list[str]:
    """The allowlist, as sorted ``"module.name"`` strings (``numpy.core`` names in their NumPy 2 form)."""
    return sorted(f"{module}.{name}" for module, name in _ALLOWED)


def _resolve(module: str, name: str) -> Any:
    key = (_canonical_module(module), name)
    obj = _RESOLVED.get(key)
    if obj is not None:
        return obj
    entry = _ALLOWED.get(key)
    if entry is None:
        return None
    obj = entry() if getattr(entry, "lazy_import", False) else entry
    _RESOLVED[key] = obj
    return obj


class _Refused(Exception):
    """Raised inside the unpickler; :func:`safe_loads` turns it into a message naming file and key."""

    def __init__(self, module: str, name: str, what: str = "global") -> None:
        super().__init__(module, name, what)
        self.module, self.name, self.what = module, name, what


def _refusal(where: str, refused: _Refused) -> DataError:
    module, name = refused.module, refused.name
    if refused.what == "persistent id":
        return UnsafeRecordError(f"{where}: the record uses a persistent id ({name!r}); such records are not read")
    if module == "dgl" or module.startswith("dgl."):
        return DataError(
            f"{where}: the record is a DGL graph ({module}.{name}); DGL graphs are not read (DGL is not used here, "
            "and unpickling them runs DGL code). Use the OCP LMDBs with PyG Data records, which are read, or export "
            "the structures to extended XYZ with the tool that wrote the file"
        )
    return UnsafeRecordError(
        f"{where}: the record refers to the global {module}.{name}, which the upstream reader does not load "
        "(unpickling it could run code); nothing was executed. Read only data you trust; if this class is safe, "
        f"allow it with matsciml.datasets.upstream.allow_global({module!r}, {name!r})"
    )


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns allowlisted globals.

    Use it through :func:`safe_loads`, which names the file and key in its errors. The
    constructor is ``pickle.Unpickler``'s, untouched: it is on the hot path.
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = _RESOLVED.get((module, name))
        if obj is None:
            obj = _resolve(module, name)
            if obj is None:
                raise _Refused(module, name)
            _RESOLVED[(module, name)] = obj
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("", repr(pid), "persistent id")


def _where(file: Any, key: Any) -> str:
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    return f"{file}: key {str(key)!r}"


def safe_loads(
    data: bytes | memoryview,
    file: str | Path = "<bytes>",
    key: Any = "?",
    _unpickler: type = SafeUnpickler,
    _buffer: type = io.BytesIO,
) -> Any:
    """Unpickle ``data`` with the allowlist.

    Parameters
    ----------
    data
        The pickled bytes (one LMDB value).
    file, key
        Where the bytes came from, for error messages.

    Raises
    ------
    UnsafeRecordError
        The record names a global that is not allowed (the message names the file, the key
        and the global; nothing was executed).
    DataError
        The bytes are not a readable pickle, the record is a DGL graph, or a class it needs
        is not installed.
    """
    try:
        return _unpickler(_buffer(data)).load()
    except _Refused as refused:
        raise _refusal(_where(file, key), refused) from None
    except DataError as err:
        raise type(err)(f"{_where(file, key)}: {err}") from None
    except Exception as err:
        raise DataError(
            f"{_where(file, key)}: cannot read the record ({type(err).__name__}: {err}); the file is corrupt or not "
            "an Open MatSciML Toolkit LMDB"
        ) from None
