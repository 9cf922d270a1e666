"""Collate samples into a batch (the batch layout of :mod:`matsciml.datasets.schema`)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import get_worker_info
from torch_geometric.data import Batch, Data

from matsciml.common.errors import DataError
from matsciml.datasets import schema
from matsciml.datasets.neighbors import describe_structure

__all__ = ["collate_samples", "collate_graphs", "batch_to_device", "is_per_atom", "STACKED_TARGETS"]

#: Targets that are one array per structure whatever their shape: always stacked to ``[B, ...]``.
STACKED_TARGETS = ("stress", "virial", "dipole", "dipole_moment")


def is_per_atom(key: str, values: Sequence[torch.Tensor], natoms: Sequence[int]) -> bool:
    """Whether ``values`` (one per structure) of ``key`` are per atom (see :func:`collate_samples`)."""
    if key in schema.PER_ATOM_TARGETS:
        return True
    if key in STACKED_TARGETS:
        return False
    return all(v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, natoms))


def _cat(values: list[torch.Tensor], dim: int, shared: bool, stack: bool = False) -> torch.Tensor:
    """``torch.cat`` (``torch.stack`` of 0-d values) into one tensor (in shared memory inside a loader worker)."""
    join = torch.stack if stack else torch.cat
    if not shared:
        return join(values, dim=dim)
    shape = list(values[0].shape)
    if stack:
        shape.insert(dim, len(values))
    else:
        shape[dim] = sum(int(v.shape[dim]) for v in values)
    out = torch.empty(shape, dtype=values[0].dtype).share_memory_()
    return join(values, dim=dim, out=out)


def _plain_graphs(graphs: Sequence[Any]) -> list[str] | None:
    """The common attribute names when every graph is a plain ``Data`` of dense CPU tensors; else ``None``."""
    first = graphs[0]
    if type(first) is not Data:
        return None
    keys = list(first._store._mapping)
    for key in keys:
        if key == "num_nodes":
            continue
        if "batch" in key or key == "ptr":
            return None  # PyG gives these increments of their own
        value = first._store._mapping[key]
        if type(value) is not torch.Tensor or value.is_sparse or value.device.type != "cpu":
            return None
    names = first._store._mapping.keys()
    for graph in graphs[1:]:
        if type(graph) is not Data or graph._store._mapping.keys() != names:  # the same set of attributes
            return None
    return keys


_DATA_BATCH: type | None = None


def _empty_batch() -> Batch:
    """An empty ``DataBatch``, without the signature inspection ``Batch(_base_cls=Data)`` does per call."""
    global _DATA_BATCH
    if _DATA_BATCH is None:
        _DATA_BATCH = type(Batch(_base_cls=Data))
    out = _DATA_BATCH.__new__(_DATA_BATCH)
    out.__init__()
    return out


def _offsets(sizes: tuple[int, ...], memo: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """``(sizes, [0, s0, s0 + s1, ...])`` as int64 tensors, computed once per distinct ``sizes``."""
    if sizes not in memo:
        memo[sizes] = (torch.tensor(sizes, dtype=torch.long), torch.tensor([0, *accumulate(sizes)], dtype=torch.long))
    return memo[sizes]


def collate_graphs(graphs: Sequence[Any]) -> Batch:
    """Batch PyG graphs exactly as ``Batch.from_data_list`` does, with one concatenation per attribute.

    For plain :class:`~torch_geometric.data.Data` graphs of dense CPU tensors with the
    same attributes, the result equals ``Batch.from_data_list(graphs)`` bitwise: the same
    attributes, dtypes and values, the ``batch`` and ``ptr`` vectors, and the
    ``_slice_dict`` / ``_inc_dict`` that ``get_example`` needs. Index attributes
    (``edge_index``: names containing ``"index"``) are offset by the node counts of the
    graphs before them, in one vectorised addition instead of one per graph. Inside a
    ``DataLoader`` worker every attribute is written straight into shared memory, so
    handing the batch to the main process copies nothing. Other graphs (subclasses,
    sparse tensors, differing attributes, DGL graphs) go to ``Batch.from_data_list``.

    Parameters
    ----------
    graphs
        Graphs of one batch, at least one.

    Returns
    -------
    torch_geometric.data.Batch
        The batched graph.
    """
    keys = _plain_graphs(graphs)
    if keys is None:
        return Batch.from_data_list(list(graphs))
    shared = get_worker_info() is not None
    stores = [graph._store for graph in graphs]
    given = "num_nodes" in keys  # else PyG infers the count from the node attributes
    num_nodes = tuple([int((store._mapping["num_nodes"] if given else store.num_nodes) or 0) for store in stores])
    memo: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    node_counts, node_slices = _offsets(num_nodes, memo)
    out = _empty_batch()
    out_store = out._store
    slice_dict: dict[str, torch.Tensor] = {}
    inc_dict: dict[str, torch.Tensor] = {}
    zeros = torch.zeros(len(graphs), dtype=torch.long)
    for key in keys:
        values = [store._mapping[key] for store in stores]
        if key == "num_nodes":
            out_store._num_nodes = values
            out_store.num_nodes = sum(values)
            continue
        elem = values[0]
        # Data.__cat_dim__ and Data.__inc__ of a plain Data of dense tensors without "batch" keys:
        # index attributes are concatenated along their last dimension and offset by the node counts
        index = "index" in key or key == "face"
        scalar = elem.dim() == 0  # concatenated as if unsqueezed: stacked
        cat_dim = 0 if scalar else (-1 if index else 0)
        sizes = (1,) * len(values) if scalar else tuple([value.shape[cat_dim] for value in values])
        counts, slices = _offsets(sizes, memo)
        slice_dict[key] = slices
        value = _cat(values, cat_dim, shared, stack=scalar)
        inc_dict[key] = offset_index(value, cat_dim, node_slices, counts) if index else zeros
        out_store[key] = value
    return finish_batch(out, len(graphs), node_counts, node_slices, slice_dict, inc_dict)


def offset_index(value: torch.Tensor, dim: int, node_slices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Shift the node indices in ``value`` (in place) by each graph's first node; return the increments.

    ``counts[g]`` entries along ``dim`` belong to graph ``g``, whose nodes start at ``node_slices[g]``.
    """
    shape = [1] * value.dim()
    shape[dim] = -1
    value += torch.repeat_interleave(node_slices[:-1], counts).to(value.dtype).view(shape)
    return node_slices[:-1]


def finish_batch(
    out: Batch, count: int, node_counts: torch.Tensor, node_slices: torch.Tensor, slice_dict: dict, inc_dict: dict
) -> Batch:
    """Set the fields a PyG ``Batch`` of ``count`` graphs needs besides its attributes (``batch``, ``ptr``, slices)."""
    store = out._store
    store.batch = torch.repeat_interleave(torch.arange(count), node_counts)
    store.ptr = node_slices.clone()
    out._num_graphs = count
    out._slice_dict = slice_dict
    out._inc_dict = inc_dict
    return out


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate graph samples into one batch.

    Use as the ``collate_fn`` of a :class:`torch.utils.data.DataLoader` over a
    dataset whose transforms end with
    :class:`~matsciml.datasets.transforms.PointCloudToGraphTransform`.

    Parameters
    ----------
    samples
        Samples (see :mod:`matsciml.datasets.schema`), each with a ``graph``.

    Returns
    -------
    dict
        * ``graph``: PyG ``Batch`` of the sample graphs (``batch`` vector
          ``[sum N]``, ``cell`` ``[B, 3, 3]``, ``edge_index`` offset per graph,
          ``cell_shifts`` ``[sum E, 3]``, ``natoms`` ``[B]``);
        * ``targets``: ``dict[str, Tensor]`` of the targets present in **every**
          sample (a target missing from one sample is left out of the batch);
          per-atom targets are concatenated to ``[sum N, ...]``, the others
          stacked to ``[B, ...]`` (scalars to ``[B]``, ``stress`` to ``[B, 3, 3]``);
        * ``natoms``: int64 ``[B]``; ``ids``: ``list[str]``; ``batch_size``: ``int``.

    A target is **per-atom** when its key is in
    :data:`matsciml.datasets.schema.PER_ATOM_TARGETS` (``forces``), or when it is
    not in :data:`STACKED_TARGETS` (``stress``, ``virial``, ``dipole``,
    ``dipole_moment``) and its first dimension equals the structure's number
    of atoms in every sample of the batch. A vector target of length 3 under
    another name would be taken as per-atom in a batch of 3-atom structures
    only; give such keys to one of the two lists.

    Raises
    ------
    DataError
        An empty list, a sample without ``graph`` (the message points at
        ``PointCloudToGraphTransform``), or a stacked target whose shape differs
        between samples (the message names the key and the structures).

    Example
    -------
    >>> loader = DataLoader(dataset, batch_size=32, collate_fn=collate_samples)
    """
    gather = getattr(samples, "collate_from_columns", None)  # a batch held as columns (matsciml.datasets.columns)
    batch = gather() if gather is not None else None
    if batch is not None:
        return batch
    if len(samples) == 0:
        raise DataError("collate_samples got an empty list of samples; the dataset or its split is empty.")
    for sample in samples:
        if schema.GRAPH not in sample:
            raise DataError(
                f"{describe_structure(sample)}: the sample has no 'graph' (keys: {sorted(sample)}). Add "
                "matsciml.datasets.transforms.PointCloudToGraphTransform at the end of the dataset transforms "
                "(after PeriodicPropertiesTransform for periodic structures)."
            )
    graph = collate_graphs([sample[schema.GRAPH] for sample in samples])
    natoms = [int(s[schema.NATOMS]) if schema.NATOMS in s else int(s[schema.GRAPH].num_nodes) for s in samples]

    targets: dict[str, torch.Tensor] = {}
    per_sample = [sample.get(schema.TARGETS) or {} for sample in samples]
    everywhere = set(per_sample[0]).intersection(*per_sample[1:])
    common = [key for key in per_sample[0] if key in everywhere]
    for key in common:
        values = [t[key] if type(t[key]) is torch.Tensor else torch.as_tensor(t[key]) for t in per_sample]
        if is_per_atom(key, values, natoms):
            for value, n, sample in zip(values, natoms, samples):
                if value.dim() == 0 or value.shape[0] != n:
                    raise DataError(
                        f"{describe_structure(sample)}: per-atom target {key!r} has shape {list(value.shape)}, "
                        f"expected first dimension {n} (the number of atoms)."
                    )
            targets[key] = torch.cat(values, dim=0)
            continue
        if key == "stress" and all(v.numel() == 9 for v in values):
            values = [v.reshape(3, 3) for v in values]
        try:
            targets[key] = torch.stack(values, dim=0)
        except RuntimeError:
            if len({tuple(v.shape) for v in values}) == 1:
                raise
            shown = ", ".join(
                f"{s.get(schema.ID, k)}: {list(v.shape)}" for k, (s, v) in enumerate(zip(samples, values))
            )
            raise DataError(
                f"target {key!r} has different shapes across the batch ({shown}); a per-structure target must "
                "have one shape. Fix the records, or add the key to PER_ATOM_TARGETS if it is per atom."
            ) from None

    return {
        schema.GRAPH: graph,
        schema.TARGETS: targets,
        schema.NATOMS: torch.tensor(natoms, dtype=torch.long),
        "ids": [str(sample.get(schema.ID, k)) for k, sample in enumerate(samples)],
        "batch_size": len(samples),
    }


def batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move a batch (dicts, lists, tensors, PyG graphs) to ``device``, without blocking on a GPU.

    Tensors and PyG ``Data``/``Batch`` graphs are copied with ``non_blocking=True`` when
    ``device`` is an accelerator (from pinned memory the copy then overlaps the
    computation); on the CPU and MPS copies block, as Lightning's own transfer does. Lightning
    moves PyG graphs (which are not tensors) with blocking copies, hence this function.
    Tensors and graphs already on ``device`` are returned as they are (no copy, no call).

    Parameters
    ----------
    batch
        A batch as returned by :func:`collate_samples`, or any nesting of dicts, lists
        and tuples of tensors and graphs; other values are returned as they are.
    device
        Target device.
    """
    device = torch.device(device)
    non_blocking = device.type not in ("cpu", "mps")

    def there(graph: Data) -> bool:  # every tensor of the graph already on ``device`` (a CPU batch for a CPU run)
        return all(
            not isinstance(v, torch.Tensor) or v.device == device for store in graph.stores for v in store.values()
        )

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value if value.device == device else value.to(device, non_blocking=non_blocking)
        if isinstance(value, Data):
            return value if there(value) else value.to(device, non_blocking=non_blocking)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and not isinstance(value, str):
            if value and set(map(type, value)) == {str}:  # ids
                return value
            moved = [move(v) for v in value]
            return type(value)(moved) if not hasattr(value, "_fields") else type(value)(*moved)
        if hasattr(value, "to") and hasattr(value, "num_nodes"):  # a DGL graph
            return value.to(device)
        return value

    return move(batch)
