"""The processed-graph cache: cached batches equal uncached ones bit for bit, keys follow the
source and the settings, a killed build is never read, random transforms stay random."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Batch

from matsciml.common.errors import ConfigError, DataError
from matsciml.datasets import StructureDataset
from matsciml.datasets.cache import (
    GraphCacheConfig,
    attach_graph_cache,
    cache_boundary,
    cache_key,
    held_for_columns,
)
from matsciml.datasets.collate import batch_to_device, collate_graphs, collate_samples
from matsciml.datasets.disk_cache import DiskGraphStore
from matsciml.datasets.readers.lmdb_format import close_env
from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform

DATA = Path(__file__).resolve().parents[1] / "data"
HELPERS = Path(__file__).resolve().parent / "cache_helpers"
sys.path.insert(0, str(HELPERS))

from slow_transform import SlowMarker  # noqa: E402
from slow_transform import transforms as slow_transforms  # noqa: E402


def _transforms(cutoff: float = 4.0) -> list:
    return [PeriodicPropertiesTransform(cutoff_radius=cutoff, adaptive_cutoff=True), PointCloudToGraphTransform("pyg")]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included, which ``torch.equal`` would call different)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _assert_same_batch(got: dict, want: dict) -> None:
    """Bitwise equality of two collated batches: graph attributes, dtypes, slices, targets, ids."""
    g, w = got["graph"], want["graph"]
    assert sorted(g.keys()) == sorted(w.keys())
    for key in w.keys():
        a, b = g[key], w[key]
        if isinstance(b, torch.Tensor):
            assert _same_bits(a, b), key
        else:
            assert a == b, key
    assert g._slice_dict.keys() == w._slice_dict.keys()
    for key in w._slice_dict:
        assert torch.equal(g._slice_dict[key], w._slice_dict[key]) and torch.equal(g._inc_dict[key], w._inc_dict[key])
    assert got["targets"].keys() == want["targets"].keys()
    for key, value in want["targets"].items():
        assert _same_bits(got["targets"][key], value), key
    assert torch.equal(got["natoms"], want["natoms"]) and got["ids"] == want["ids"]


def _batches(dataset, size: int = 7) -> list[dict]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(5)).tolist()
    return [collate_samples([dataset[i] for i in order[k : k + size]]) for k in range(0, len(order), size)]


# ------------------------------------------------------------------ collate


def test_collate_graphs_equals_pyg_batch():
    """Oracle: PyG's own Batch.from_data_list, on real periodic graphs of different sizes."""
    dataset = StructureDataset(DATA / "oqmd_devset.extxyz", transforms=_transforms(5.0))
    graphs = [dataset[i]["graph"] for i in (3, 0, 17, 9, 42)]
    got, want = collate_graphs(graphs), Batch.from_data_list(graphs)
    assert type(got) is type(want) and got.num_graphs == want.num_graphs == 5
    _assert_same_batch(
        {"graph": got, "targets": {}, "natoms": torch.zeros(1), "ids": []},
        {"graph": want, "targets": {}, "natoms": torch.zeros(1), "ids": []},
    )
    for k, graph in enumerate(graphs):  # get_example undoes the offsets
        example = got.get_example(k)
        assert torch.equal(example.edge_index, graph.edge_index) and torch.equal(example.pos, graph.pos)
    edges = got._slice_dict["edge_index"]
    for k in range(5):  # every graph's edges point into its own block of nodes
        block = got.edge_index[:, int(edges[k]) : int(edges[k + 1])]
        assert int(block.min()) >= int(got.ptr[k]) and int(block.max()) < int(got.ptr[k + 1])


def test_collate_graphs_equals_pyg_batch_without_num_nodes_and_with_faces():
    """Graphs whose node count PyG infers (no num_nodes attribute), with face indices and scalar attributes."""
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(2)
    graphs = []
    for n in (4, 2, 5):
        graphs.append(
            Data(
                x=torch.randn(n, 3, generator=g),
                edge_index=torch.randint(0, n, (2, 2 * n), generator=g),
                face=torch.randint(0, n, (3, n), generator=g),
                y=torch.tensor(float(n)),
            )
        )
    got, want = collate_graphs(graphs), Batch.from_data_list(graphs)
    empty = {"targets": {}, "natoms": torch.zeros(1), "ids": []}
    _assert_same_batch({"graph": got, **empty}, {"graph": want, **empty})
    assert got.num_nodes == want.num_nodes == 11


# ------------------------------------------------------------------ bitwise equality


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_batches_equal_uncached_devset(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("MATSCIML_CACHE", str(tmp_path / "cache"))
    plain = StructureDataset.from_devset(transforms=_transforms(3.3), n=60)
    cached = StructureDataset.from_devset(transforms=_transforms(3.3), n=60)
    cache = attach_graph_cache(cached, {"mode": mode, "progress": False})
    want = _batches(plain)
    for _ in range(2):  # the first pass fills a memory cache, the second reads it
        for got, ref in zip(_batches(cached), want):
            _assert_same_batch(got, ref)
    assert cache.hits >= len(plain)
    if mode == "memory":
        assert len(cache.memory) == len(plain) and cache.misses == len(plain)
    else:
        assert cache.misses == 0 and list((tmp_path / "cache" / "graphs").glob("*.lmdb"))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_batches_equal_uncached_real_file(mode, tmp_path):
    """A real LiPS file (periodic, 83 atoms, forces per atom); records dropped by on_invalid keep their keys."""
    path = DATA / "lips_devset.extxyz"
    plain = StructureDataset(path, transforms=_transforms(4.0), target_keys=["energy", "forces"])
    cached = StructureDataset(path, transforms=_transforms(4.0), target_keys=["energy", "forces"])
    attach_graph_cache(cached, {"mode": mode, "cache_dir": str(tmp_path), "progress": False, "eager": True})
    for got, want in zip(_batches(cached), _batches(plain)):
        _assert_same_batch(got, want)


@pytest.mark.slow
def test_parallel_build_equals_serial(tmp_path):
    path = DATA / "oqmd_devset.extxyz"
    plain = StructureDataset(path, transforms=_transforms(5.0))
    for name, workers in (("serial", 0), ("parallel", 2)):
        cached = StructureDataset(path, transforms=_transforms(5.0))
        attach_graph_cache(cached, {"mode": "disk", "cache_dir": str(tmp_path / name), "workers": workers})
        for got, want in zip(_batches(cached, 16), _batches(plain, 16)):
            _assert_same_batch(got, want)
    memory = StructureDataset(path, transforms=_transforms(5.0))
    attach_graph_cache(memory, {"mode": "memory", "eager": True, "workers": 2, "progress": False})
    assert len(memory.graph_cache.memory) == len(memory)
    for got, want in zip(_batches(memory, 16), _batches(plain, 16)):
        _assert_same_batch(got, want)


# ------------------------------------------------------------------ invalidation


def test_key_follows_cutoff_and_file_content(tmp_path):
    source = tmp_path / "oqmd.extxyz"
    shutil.copy(DATA / "oqmd_devset.extxyz", source)
    base = cache_key(source, _transforms(5.0))
    assert cache_key(source, _transforms(5.0)) == base
    assert cache_key(source, _transforms(5.5)) != base
    assert cache_key(source, [PeriodicPropertiesTransform(5.0, backend="vesin"), _transforms()[1]]) != base
    text = source.read_text()
    source.write_text(text.replace("0.0", "0.1", 1))
    assert cache_key(source, _transforms(5.0)) != base


def test_changed_cutoff_or_file_rebuilds(tmp_path):
    source = tmp_path / "oqmd.extxyz"
    cache_dir = tmp_path / "cache"
    shutil.copy(DATA / "oqmd_devset.extxyz", source)
    options = {"mode": "disk", "cache_dir": str(cache_dir), "progress": False}

    def check(cutoff: float) -> Path:
        cached = StructureDataset(source, transforms=_transforms(cutoff))
        cache = attach_graph_cache(cached, options)
        plain = StructureDataset(source, transforms=_transforms(cutoff))
        for got, want in zip(_batches(cached, 20), _batches(plain, 20)):
            _assert_same_batch(got, want)
        return cache.disk.path

    first = check(5.0)
    assert check(5.0) == first  # reused
    second = check(6.0)
    assert second != first  # another cutoff, another file, whose edges are those of 6 Å
    lines = source.read_text().splitlines()
    # move one atom of the first structure (line 3: first atom after the count and the comment)
    fields = lines[2].split()
    fields[1] = f"{float(fields[1]) + 0.25:.8f}"
    lines[2] = " ".join(fields)
    source.write_text("\n".join(lines) + "\n")
    third = check(6.0)
    assert third not in (first, second)


# ------------------------------------------------------------------ killed builds


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_build_killed_mid_write_is_rebuilt_never_read(tmp_path):
    source = DATA / "oqmd_devset.extxyz"
    cache_dir, marker = tmp_path / "cache", tmp_path / "marker"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(HELPERS / "slow_build.py"), str(source), str(cache_dir), str(marker)], env=env
    )
    try:
        # 64 records per write transaction: kill after more than one has been committed to the temporary file
        assert _wait_for(lambda: marker.exists() and marker.stat().st_size >= 100, 120), "the build never started"
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = list(cache_dir.glob(".partial-*.lmdb.tmp"))
    assert leftovers and not list(cache_dir.glob("*.lmdb")), "only the temporary file may exist after the kill"

    SlowMarker.marker = None
    cached = StructureDataset(source, transforms=slow_transforms())
    cache = attach_graph_cache(cached, {"mode": "disk", "cache_dir": str(cache_dir), "progress": False})
    assert not any(p.exists() for p in leftovers)  # the rebuild removed the torn temporary file
    assert cache.disk.length == len(cached) == 200
    plain = StructureDataset(source, transforms=slow_transforms())
    for got, want in zip(_batches(cached, 25), _batches(plain, 25)):
        _assert_same_batch(got, want)


def test_torn_file_under_final_name_is_rebuilt(tmp_path):
    """A file that is not a complete cache (cut in half) is never read: it is replaced."""
    source = DATA / "alexandria_devset.extxyz"
    options = {"mode": "disk", "cache_dir": str(tmp_path), "progress": False}
    first = StructureDataset(source, transforms=_transforms(5.0))
    path = attach_graph_cache(first, options).disk.path
    data = path.read_bytes()
    close_env(path)  # as a fresh process would find it
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a graph cache"):
        DiskGraphStore(path, first.graph_cache.disk.key)
    again = StructureDataset(source, transforms=_transforms(5.0))
    attach_graph_cache(again, options)
    plain = StructureDataset(source, transforms=_transforms(5.0))
    for got, want in zip(_batches(again), _batches(plain)):
        _assert_same_batch(got, want)


# ------------------------------------------------------------------ boundary, random transforms, budget


class Rattle:
    """A random transform (no ``deterministic`` flag): moves the atoms in place."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, sample: dict) -> dict:
        noise = 0.01 * torch.randn(sample["pos"].shape, generator=self.generator)
        sample["pos"] += noise
        sample["graph"].pos += noise
        return sample


def test_random_transform_after_the_cache_stays_random_and_leaves_it_intact():
    path = DATA / "oqmd_devset.extxyz"
    transforms = [*_transforms(5.0), Rattle()]
    assert cache_boundary(transforms) == 2
    assert cache_boundary([Rattle(), *_transforms()]) == 0
    cached = StructureDataset(path, transforms=transforms)
    attach_graph_cache(cached, "memory")
    plain = StructureDataset(path, transforms=_transforms(5.0))
    first, second = cached[4], cached[4]
    assert not torch.equal(first["pos"], second["pos"])  # drawn anew on each access
    stored = cached.graph_cache.memory[4]
    reference = plain[4]
    assert torch.equal(stored["pos"], reference["pos"]) and torch.equal(stored["graph"].pos, reference["graph"].pos)
    assert torch.equal(second["edge_index"], reference["edge_index"])


def test_leading_random_transform_disables_the_cache():
    dataset = StructureDataset(DATA / "oqmd_devset.extxyz", transforms=[Rattle(), *_transforms()])
    assert attach_graph_cache(dataset, "memory") is None and dataset.graph_cache is None


def test_memory_budget_stops_caching_with_a_warning():
    path = DATA / "oqmd_devset.extxyz"
    cached = StructureDataset(path, transforms=_transforms(5.0))
    cache = attach_graph_cache(cached, {"mode": "memory", "memory_budget_mb": 0.05})
    with pytest.warns(UserWarning, match="budget of 0 MiB after"):
        batches = _batches(cached, 20)
    assert 0 < len(cache.memory) < len(cached) and cache.memory_bytes <= 0.05 * 2**20
    for got, want in zip(batches, _batches(StructureDataset(path, transforms=_transforms(5.0)), 20)):
        _assert_same_batch(got, want)


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="did you mean 'memory'|'memory'"):
        GraphCacheConfig.parse("memroy")
    with pytest.raises(ConfigError, match="cache_dir"):
        GraphCacheConfig.parse({"cache_dri": "/tmp"})
    with pytest.raises(ConfigError, match="workers"):
        GraphCacheConfig.parse({"workers": -1})
    assert GraphCacheConfig.parse(None).mode == "off" and GraphCacheConfig.parse(True).mode == "memory"


def test_batch_to_device_keeps_values_and_types():
    dataset = StructureDataset(DATA / "alexandria_devset.extxyz", transforms=_transforms(5.0))
    batch = collate_samples([dataset[0], dataset[1]])
    moved = batch_to_device(batch, "cpu")
    _assert_same_batch(moved, batch)
    assert moved["batch_size"] == 2 and isinstance(moved["graph"], Batch)
    # already on the device: the same objects, nothing copied
    assert moved["graph"] is batch["graph"] and moved["natoms"] is batch["natoms"] and moved["ids"] is batch["ids"]
    assert all(moved["targets"][k] is v for k, v in batch["targets"].items())
    elsewhere = batch_to_device(batch, "meta")  # another device: every tensor moves, the graph's included
    assert elsewhere["graph"].pos.device.type == "meta" and elsewhere["graph"].edge_index.device.type == "meta"
    assert all(v.device.type == "meta" for v in elsewhere["targets"].values())


def _build_in_child(cache_dir: str, start, queue) -> None:
    dataset = StructureDataset(DATA / "alexandria_devset.extxyz", transforms=_transforms(4.0))
    start.wait()
    cache = attach_graph_cache(dataset, {"mode": "disk", "cache_dir": cache_dir, "progress": False})
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    queue.put((str(cache.disk.path), batch["graph"].edge_index.sum().item(), batch["graph"].num_edges))


def test_concurrent_builders_share_one_file(tmp_path):
    """Two processes (as two DDP ranks) start building the same cache at once: one builds, the other waits."""
    import multiprocessing

    # fresh interpreters, as two ranks are: a forked child can inherit the state of a thread pool or an
    # open LMDB environment of an earlier test in this process and hang
    context = multiprocessing.get_context("spawn")
    start, queue = context.Barrier(2), context.Queue()
    procs = [context.Process(target=_build_in_child, args=(str(tmp_path), start, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.glob("*.lmdb")] == [Path(results[0][0]).name]
    assert not list(tmp_path.glob(".partial-*"))
    plain = StructureDataset(DATA / "alexandria_devset.extxyz", transforms=_transforms(4.0))
    want = collate_samples([plain[i] for i in range(len(plain))])["graph"]
    assert results[0][1:] == (want.edge_index.sum().item(), want.num_edges)


# ------------------------------------------------------------------ columns


def _cached_devset(n: int = 60, **config) -> StructureDataset:
    dataset = StructureDataset.from_devset(transforms=_transforms(3.3), n=n)
    attach_graph_cache(dataset, {"mode": "memory", "progress": False, **config})
    for i in range(len(dataset)):
        dataset[i]
    return dataset


def test_batches_gathered_from_columns_equal_the_per_sample_collate():
    """Oracle: collate_samples on the samples one by one; every target kind of the devset (scalars, forces, stress)."""
    from matsciml.datasets.cache import prepare_columns_for
    from matsciml.datasets.columns import RecordBatch

    dataset = _cached_devset()
    split = torch.utils.data.Subset(torch.utils.data.Subset(dataset, list(range(50, 0, -1))), list(range(3, 40)))
    assert not isinstance(split.__getitems__([0, 1]), RecordBatch)  # no columns yet: plain samples
    assert prepare_columns_for(split)
    assert set(dataset[0]["targets"]) >= {"energy", "forces", "stress", "energy_per_atom"}
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(3)).tolist()
    for k in range(0, len(order), 7):
        indices = order[k : k + 7]
        gathered = split.__getitems__(indices)
        assert isinstance(gathered, RecordBatch) and len(gathered) == len(indices)
        _assert_same_batch(collate_samples(gathered), collate_samples([split[i] for i in indices]))
        # any other collate function reads the samples one by one
        assert [s["id"] for s in gathered] == [split[i]["id"] for i in indices]
    # indices outside the columns' samples: the per-sample path
    assert not isinstance(dataset.__getitems__([0, 55]), RecordBatch)


def test_a_loader_pass_lays_its_samples_out_and_later_passes_equal_the_first():
    from matsciml.lightning.loaders import ResumableDataLoader

    dataset = StructureDataset.from_devset(transforms=_transforms(3.3), n=40)
    attach_graph_cache(dataset, {"mode": "memory", "progress": False})
    loader = ResumableDataLoader(dataset, batch_size=6, shuffle=True, seed=2, collate_fn=collate_samples)
    first = list(loader)  # fills the cache; its last batch lays the samples out as columns
    assert dataset.graph_cache.batch_columns(list(range(40))) is not None
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        reference = [collate_samples([dataset[i] for i in idx]) for idx in loader.batch_sampler]
        got = list(loader)
        for a, b in zip(got, reference):
            _assert_same_batch(a, b)
        if epoch == 0:
            for a, b in zip(got, first):
                _assert_same_batch(a, b)


def test_samples_that_do_not_fit_one_layout_keep_the_per_sample_collate(monkeypatch):
    from matsciml.datasets import columns as cols

    dataset = _cached_devset(n=12)
    samples = [dataset.graph_cache.memory[i] for i in range(12)]
    assert cols.Columns.build(samples) is not None

    def changed(k: int, edit) -> list:
        copies = [dict(s, targets=dict(s["targets"])) for s in samples]
        edit(copies[k])
        return copies

    no_id = changed(3, lambda s: s.pop("id"))
    partial_target = changed(5, lambda s: s["targets"].pop("stable"))
    other_dtype = changed(2, lambda s: s["targets"].update(energy=s["targets"]["energy"].double()))
    ambiguous = [dict(s, targets={"v": torch.zeros(s["natoms"] if k < 6 else 2)}) for k, s in enumerate(samples)]
    for bad in (no_id, partial_target, other_dtype, ambiguous):
        assert cols.Columns.build(bad) is None
    graph = samples[4]["graph"].clone()
    graph.pos = graph.pos.double()
    assert cols.Columns.build([*samples[:4], dict(samples[4], graph=graph)]) is None
    # a random transform after the cache, or a cache larger than the limit: no columns
    rattled = StructureDataset.from_devset(transforms=[*_transforms(3.3), Rattle()], n=12)
    cache = attach_graph_cache(rattled, {"mode": "memory", "progress": False})
    for i in range(12):
        rattled[i]
    assert not cache.prepare_columns(rattled, range(12))
    monkeypatch.setattr(cols, "COLUMNS_MAX_BYTES", 1)
    assert not dataset.graph_cache.prepare_columns(dataset, range(12))


def test_held_for_columns_needs_every_structure_no_tail_transform_and_the_size_limit(monkeypatch):
    from matsciml.datasets import columns

    dataset = StructureDataset.from_devset(transforms=_transforms(3.3), n=10)
    assert not held_for_columns(dataset)  # no cache yet
    attach_graph_cache(dataset, {"mode": "memory", "progress": False})
    dataset[0]
    assert not held_for_columns(dataset)  # one structure of ten
    dataset.graph_cache.fill(dataset, progress=False)
    assert held_for_columns(dataset)
    monkeypatch.setattr(columns, "COLUMNS_MAX_BYTES", dataset.graph_cache.memory_bytes - 1)
    assert not held_for_columns(dataset)
    rattled = StructureDataset.from_devset(transforms=[*_transforms(3.3), Rattle()], n=10)
    attach_graph_cache(rattled, {"mode": "memory", "eager": True, "progress": False})
    assert len(rattled.graph_cache.memory) == 10 and not held_for_columns(rattled)
