"""Processed samples held as columns, so that a batch is gathered with a few tensor calls.

When the in-memory graph cache (:mod:`matsciml.datasets.cache`) holds every structure of
a dataset and no transform runs after it, the cache lays each graph attribute and each
target of all the structures end to end in one tensor, a *column* (with the offset and
size of every structure in it). A batch is then assembled with one ``index_select`` per
column, whatever the batch size, instead of one Python step per structure and
attribute: for small structures (tens of atoms) the per-structure steps cost more than
the copies, and they ran once per training step.

The batch is bitwise the one :func:`~matsciml.datasets.collate.collate_samples` gives for
the same samples, graph attributes, ``_slice_dict`` / ``_inc_dict``, targets, ``natoms``
and ``ids`` included. Datasets whose samples do not fit one layout keep the per-sample
collate: graphs that are not plain ``Data`` of dense tensors with the same attributes and
dtypes, targets that only some structures carry or whose layout (per atom or per
structure) would depend on the batch, structures without an id. Columns are built only
for caches up to :data:`COLUMNS_MAX_BYTES` (they hold a second copy of the tensors).

The loader asks the dataset for a whole batch (``Dataset.__getitems__``); the dataset
returns a :class:`RecordBatch`, a sequence of its samples that ``collate_samples``
assembles from the columns and that any other collate function reads sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from matsciml.datasets import schema
from matsciml.datasets.collate import STACKED_TARGETS, _empty_batch, _plain_graphs, finish_batch, offset_index

__all__ = ["COLUMNS_MAX_BYTES", "Columns", "RecordBatch"]

#: Largest cache (bytes of tensors) laid out as columns.
COLUMNS_MAX_BYTES = 256 * 2**20


class _Column:
    """The values of one attribute for every structure: ``data`` and, when concatenated, offsets and sizes.

    ``dim`` is ``None`` for one row per structure (0-d values stacked, or values whose
    size along the concatenation dimension is 1 for every structure); ``sizes`` /
    ``starts`` are shared by the columns with the same sizes (one layout per batch each).
    """

    def __init__(self, values: list[Tensor], dim: int | None, layouts: list[tuple[Tensor, Tensor]]) -> None:
        self.dim = dim
        self.starts = self.sizes = None
        if dim is None:
            self.data = torch.stack(values)
            return
        sizes = torch.tensor([value.shape[dim] for value in values], dtype=torch.long)
        self.data = torch.cat(values, dim=dim)
        if bool((sizes == 1).all()) and self.data.dim() > 0 and dim % self.data.dim() == 0:
            self.dim = None  # one row per structure: [R, ...] as stacked
            return
        for known_sizes, known_starts in layouts:
            if torch.equal(known_sizes, sizes):
                self.sizes, self.starts = known_sizes, known_starts
                return
        self.sizes, self.starts = sizes, torch.cumsum(sizes, 0) - sizes
        layouts.append((self.sizes, self.starts))


def _same_layout(values: list[Tensor], dim: int | None) -> bool:
    """Tensors of one dtype, and of one shape apart from the concatenation dimension."""
    if any(type(v) is not Tensor for v in values):
        return False
    first = values[0]
    if dim is None:
        return all(v.dtype == first.dtype and v.shape == first.shape for v in values)
    if first.dim() == 0:
        return False
    axis = dim % first.dim()
    rest = first.shape[:axis] + first.shape[axis + 1 :]
    return all(
        v.dtype == first.dtype and v.dim() == first.dim() and v.shape[:axis] + v.shape[axis + 1 :] == rest
        for v in values
    )


class Columns:
    """Every sample of a dataset as columns; :meth:`collate` gathers a batch of them. Build with :meth:`build`."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.graph: dict[str, _Column] = {}
        self.index_keys: set[str] = set()
        self.node_counts = torch.zeros(0, dtype=torch.long)
        self.targets: dict[str, _Column] = {}
        self.natoms = torch.zeros(0, dtype=torch.long)
        self.ids: list[str] = []

    @classmethod
    def build(cls, samples: Sequence[dict[str, Any]]) -> Columns | None:
        """Columns of ``samples`` (in their order), or ``None`` when they do not fit one layout (see the module)."""
        if not samples or any(schema.GRAPH not in s or schema.ID not in s for s in samples):
            return None
        graphs = [s[schema.GRAPH] for s in samples]
        keys = _plain_graphs(graphs)
        if keys is None:
            return None
        out = cls()
        out.keys = keys
        layouts: list[tuple[Tensor, Tensor]] = []
        stores = [graph._store for graph in graphs]
        counts = [int((s._mapping["num_nodes"] if "num_nodes" in keys else s.num_nodes) or 0) for s in stores]
        out.node_counts = torch.tensor(counts, dtype=torch.long)
        for key in keys:
            values = [store._mapping[key] for store in stores]
            if key == "num_nodes":
                if any(type(v) is not int for v in values):
                    return None  # the batch lists them as they are stored: ints only here
                continue
            index = "index" in key or key == "face"
            dim = None if values[0].dim() == 0 else (-1 if index else 0)
            if not _same_layout(values, dim):
                return None
            out.graph[key] = _Column(values, dim, layouts)
            if index:
                out.index_keys.add(key)
        natoms = [int(s[schema.NATOMS]) if schema.NATOMS in s else n for s, n in zip(samples, counts)]
        out.natoms = torch.tensor(natoms, dtype=torch.long)
        if not out._build_targets(samples, natoms, layouts):
            return None
        out.ids = [str(s[schema.ID]) for s in samples]
        return out

    def _build_targets(
        self, samples: Sequence[dict[str, Any]], natoms: list[int], layouts: list[tuple[Tensor, Tensor]]
    ) -> bool:
        """Target columns with the layout ``collate_samples`` gives every batch; ``False`` when it depends on the batch."""
        per_sample = [s.get(schema.TARGETS) or {} for s in samples]
        order = list(per_sample[0])
        if any(list(t) != order for t in per_sample[1:]):
            return False  # the keys of a batch would depend on its samples
        for key in order:
            values = [t[key] if type(t[key]) is Tensor else torch.as_tensor(t[key]) for t in per_sample]
            first_dims = [v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, natoms)]
            if key in schema.PER_ATOM_TARGETS or (key not in STACKED_TARGETS and all(first_dims)):
                if not all(first_dims) or not _same_layout(values, 0):
                    return False  # collate_samples raises for such a batch: let it
                self.targets[key] = _Column(values, 0, layouts)
                continue
            if key not in STACKED_TARGETS and any(first_dims):
                return False  # per atom in some batches, per structure in others
            if key == "stress":
                nine = [v.numel() == 9 for v in values]
                if all(nine):
                    values = [v.reshape(3, 3) for v in values]
                elif any(nine):
                    return False
            if not _same_layout(values, None):
                return False
            self.targets[key] = _Column(values, None, layouts)
        return True

    def collate(self, positions: Sequence[int]) -> dict[str, Any]:
        """The batch of the samples at ``positions`` (their order), as ``collate_samples`` would give it."""
        rows = torch.tensor(positions, dtype=torch.long)
        count = len(positions)
        layouts: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

        def layout(column: _Column) -> tuple[Tensor, Tensor, Tensor]:
            """``(sizes, [0, cumulative sizes], rows of the batch in the column)``, once per size list."""
            key = id(column.sizes)
            if key not in layouts:
                sizes = column.sizes.index_select(0, rows)
                slices = _slices(sizes)
                starts = column.starts.index_select(0, rows) - slices[:-1]
                picked = torch.repeat_interleave(starts, sizes) + torch.arange(int(slices[-1]))
                layouts[key] = (sizes, slices, picked)
            return layouts[key]

        node_counts = self.node_counts.index_select(0, rows)
        node_slices = _slices(node_counts)
        ones = torch.ones(count, dtype=torch.long)
        unit_slices = _slices(ones)
        zeros = torch.zeros(count, dtype=torch.long)
        out = _empty_batch()
        store = out._store
        slice_dict: dict[str, Tensor] = {}
        inc_dict: dict[str, Tensor] = {}
        for key in self.keys:
            if key == "num_nodes":
                values = node_counts.tolist()  # the stored counts (ints, checked at build)
                store._num_nodes = values
                store.num_nodes = sum(values)
                continue
            column = self.graph[key]
            if column.dim is None:
                sizes, slice_dict[key] = ones, unit_slices
                value = column.data.index_select(0, rows)
                dim = 0
            else:
                sizes, slice_dict[key], picked = layout(column)
                value = column.data.index_select(column.dim, picked)
                dim = column.dim
            inc_dict[key] = offset_index(value, dim, node_slices, sizes) if key in self.index_keys else zeros
            store[key] = value
        finish_batch(out, count, node_counts, node_slices, slice_dict, inc_dict)
        targets = {}
        for key, column in self.targets.items():
            if column.dim is None:
                targets[key] = column.data.index_select(0, rows)
            else:
                targets[key] = column.data.index_select(0, layout(column)[2])
        return {
            schema.GRAPH: out,
            schema.TARGETS: targets,
            schema.NATOMS: self.natoms.index_select(0, rows),
            "ids": [self.ids[p] for p in positions],
            "batch_size": count,
        }


def _slices(sizes: Tensor) -> Tensor:
    """``[0, s0, s0 + s1, ...]`` (int64)."""
    out = torch.zeros(sizes.numel() + 1, dtype=torch.long)
    torch.cumsum(sizes, 0, out=out[1:])
    return out


class RecordBatch(Sequence):
    """The samples of one batch of a dataset: gathered from columns by ``collate_samples``, else read one by one.

    Parameters
    ----------
    dataset
        The dataset (``dataset[i]`` reads sample ``i``).
    indices
        Indices of the batch's samples in ``dataset``.
    columns, positions
        The :class:`Columns` holding these samples, and their positions in it.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], columns: Columns, positions: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.columns = columns
        self.positions = list(positions)
        self._samples: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: Any) -> Any:
        if self._samples is None:
            self._samples = [self.dataset[i] for i in self.indices]
        return self._samples[k]

    def collate_from_columns(self) -> dict[str, Any] | None:
        """The collated batch (:meth:`Columns.collate`), or ``None`` for an empty batch."""
        return self.columns.collate(self.positions) if self.positions else None
