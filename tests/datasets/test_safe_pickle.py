"""The restricted unpickler: refused globals run nothing; allowed ones read as plain pickle would."""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matsciml.common.errors import DataError
from matsciml.datasets import OQMDDataset, StructureDataset
from matsciml.datasets.upstream import safe_pickle
from matsciml.datasets.upstream.safe_pickle import UnsafeRecordError, allow_global, safe_loads

UP = Path(__file__).resolve().parents[1] / "data" / "upstream"


class _RunsCommand:
    """Pickles as a call of ``os.system(command)``, as a malicious record would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def _write_lmdb(path: Path, records: dict[int, bytes]) -> Path:
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 22, lock=False)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(str(key).encode(), value)
    env.close()
    return path


def _oqmd_like(extra=None) -> dict:
    record = {"cart_coords": [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], "cell": np.eye(3).tolist(), "atomic_numbers": [3, 9],
              "delta_e": -1.0, "band_gap": 1.0, "stability": 0.0, "entry_id": 7}  # fmt: skip
    if extra is not None:
        record["payload"] = extra
    return record


def test_a_record_calling_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    command = f"touch {marker}"
    bad = pickle.dumps(_oqmd_like(_RunsCommand(command)), protocol=5)
    assert b"system" in bad  # the crafted record really names os.system (posix.system on Linux)
    good = pickle.dumps(_oqmd_like(), protocol=5)
    path = _write_lmdb(tmp_path / "data.lmdb", {0: good, 3: bad})
    dataset = OQMDDataset(tmp_path)
    assert len(dataset) == 2 and float(dataset[0]["targets"]["band_gap"]) == 1.0
    with pytest.raises(UnsafeRecordError) as info:
        dataset[1]
    message = str(info.value)
    module = os.system.__module__  # 'posix' on Linux, 'nt' on Windows
    assert str(path) in message and "key '3'" in message and f"{module}.system" in message
    assert "allow_global" in message and "\n" not in message
    assert not marker.exists()
    # the oracle: plain pickle really would have run the command
    pickle.loads(bad)
    assert marker.exists()


def test_builtins_eval_and_unknown_classes_are_refused():
    with pytest.raises(UnsafeRecordError, match=r"f.lmdb: key '9'.*builtins\.eval"):
        safe_loads(pickle.dumps({"x": _CallsEval()}), "f.lmdb", b"9")
    with pytest.raises(UnsafeRecordError, match="subprocess.Popen"):
        safe_loads(pickle.dumps(__import__("subprocess").Popen), "f.lmdb", 0)
    with pytest.raises(UnsafeRecordError, match="builtins.getattr"):
        safe_loads(pickle.dumps(getattr), "f.lmdb", 0)


def test_object_arrays_and_persistent_ids_are_refused():
    with pytest.raises(DataError, match="Python objects"):
        safe_loads(pickle.dumps(np.array([{"a": 1}], dtype=object)), "f", 0)

    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "pid" if obj == "secret" else None

    buf = io.BytesIO()
    WithPid(buf, protocol=5).dump({"v": "secret"})
    with pytest.raises(UnsafeRecordError, match="persistent id"):
        safe_loads(buf.getvalue(), "f", 0)


def test_allowed_content_equals_plain_unpickling():
    value = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.float64(2.5),
        "t": torch.arange(4, dtype=torch.int64),
        "n": None,
        "set": {1, 2},
    }
    data = pickle.dumps(value, protocol=5)
    ours, plain = safe_loads(data), pickle.loads(data)
    np.testing.assert_array_equal(ours["a"], plain["a"])
    assert ours["s"] == plain["s"] and ours["set"] == plain["set"] and ours["n"] is None
    assert torch.equal(ours["t"], plain["t"])


def test_numpy_1_names_resolve_to_numpy_2():
    from matsciml.datasets.readers.lmdb_format import shared_env

    with shared_env(UP / "alexandria" / "data_000.lmdb", False).begin() as txn:
        data = bytes(txn.get(b"0"))
    assert b"numpy.core.numeric" in data  # written by NumPy 1
    ours = safe_loads(data)
    with pytest.warns(DeprecationWarning):
        plain = pickle.loads(data)  # the oracle, through NumPy's own compatibility shim
    assert isinstance(ours["force"], np.ndarray) and ours["force"].dtype == plain["force"].dtype
    np.testing.assert_array_equal(ours["force"], plain["force"])
    np.testing.assert_array_equal(ours["magmoms"], plain["magmoms"])


def test_nested_storage_blobs_equal_torch_load_weights_only():
    import lmdb

    blobs = []
    original = safe_pickle._load_from_bytes

    def capture(blob):
        blobs.append(blob)
        return original(blob)

    key = ("torch.storage", "_load_from_bytes")
    saved = safe_pickle._ALLOWED[key]
    safe_pickle._ALLOWED[key] = capture
    safe_pickle._RESOLVED.clear()
    try:
        from matsciml.datasets.readers.lmdb_format import close_env

        close_env(UP / "colabfit" / "data.lmdb")  # an earlier test's reader may hold it open in this process
        env = lmdb.open(str(UP / "colabfit" / "data.lmdb"), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            for _, value in txn.cursor():
                safe_loads(value)
        env.close()
    finally:
        safe_pickle._ALLOWED[key] = saved
        safe_pickle._RESOLVED.clear()
    assert len(blobs) >= 40
    for blob in blobs:
        ours = safe_pickle._legacy_storage(blob)
        oracle = torch.load(io.BytesIO(blob), weights_only=True)
        assert ours.dtype == oracle.dtype and ours.size() == oracle.size()
        assert bytes(ours._untyped_storage) == bytes(oracle._untyped_storage)


def test_allow_global_extends_the_allowlist_explicitly(tmp_path):
    module = type(sys)("matsciml_test_records")
    exec("class Point:\n    def __init__(self, x=0):\n        self.x = x\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        data = pickle.dumps(module.Point(3), protocol=5)
        with pytest.raises(UnsafeRecordError, match="matsciml_test_records.Point"):
            safe_loads(data, "f", 0)
        allow_global("matsciml_test_records", "Point")
        assert safe_loads(data, "f", 0).x == 3
        assert "matsciml_test_records.Point" in safe_pickle.allowed_globals()
    finally:
        del sys.modules[module.__name__]
        safe_pickle._ALLOWED.pop(("matsciml_test_records", "Point"), None)
        safe_pickle._RESOLVED.clear()


def test_a_dgl_graph_record_gets_a_clear_error():
    # a pickle naming dgl.heterograph.DGLGraph, as the toolkit's OCP devsets hold (DGL itself is not needed)
    module = type(sys)("dgl.heterograph")
    exec("class DGLGraph:\n    pass\n", module.__dict__)
    module.DGLGraph.__module__ = "dgl.heterograph"
    package = type(sys)("dgl")
    package.heterograph = module
    saved = {name: sys.modules.get(name) for name in ("dgl", "dgl.heterograph")}
    sys.modules.update({"dgl": package, "dgl.heterograph": module})
    try:
        data = pickle.dumps({"graph": module.DGLGraph()}, protocol=5)
    finally:
        for name, old in saved.items():
            if old is None:
                del sys.modules[name]
            else:
                sys.modules[name] = old
    with pytest.raises(DataError, match=r"f: key '4': the record is a DGL graph \(dgl.heterograph.DGLGraph\)"):
        safe_loads(data, "f", 4)


def test_matsciml_lmdb_is_not_mistaken_for_an_upstream_one(tmp_path):
    from matsciml.datasets import write_lmdb
    from matsciml.datasets.readers.formats import detect_format

    out = write_lmdb(OQMDDataset(UP / "oqmd"), tmp_path / "ours.lmdb")
    assert detect_format(out) == "lmdb"
    ours, theirs = StructureDataset(out), OQMDDataset(UP / "oqmd")
    assert torch.equal(ours[5]["pos"], theirs[5]["pos"])
    assert ours[5]["targets"].keys() == theirs[5]["targets"].keys()
