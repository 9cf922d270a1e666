"""Pack a sample's atoms and edges into a graph container."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch
from torch_geometric.data import Data

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets import schema
from matsciml.datasets.neighbors import describe_structure, periodic_neighbor_list

__all__ = ["PointCloudToGraphTransform"]

_BACKENDS = ("pyg", "dgl")

# One warning per process each (a dataset calls the transform once per sample).
_DGL_WARNED = False
_NON_PERIODIC_WARNED = False

# Keys the graph always carries; node_keys naming them add nothing.
_BUILT_IN = ("pos", "atomic_numbers", "edge_index", "cell_shifts", "cell", "natoms")


def _dgl_available() -> bool:
    try:
        import dgl  # noqa: F401
    except Exception:  # an ImportError, or a DGL build that fails against this torch
        return False
    return True


def _warn_dgl_missing() -> None:
    global _DGL_WARNED
    if _DGL_WARNED:
        return
    _DGL_WARNED = True
    warnings.warn(
        "PointCloudToGraphTransform(backend='dgl'): DGL is not installed (or does not import with this "
        "torch); graphs are built as PyG Data containers instead. Models read graphs through "
        "matsciml.common.graph, so the configuration runs unchanged; set backend: pyg to silence this.",
        UserWarning,
        stacklevel=3,
    )


def _fail(sample: dict[str, Any], message: str) -> NoReturn:
    raise DataError(f"{describe_structure(sample)}: {message}")


def _tensor(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


def _rows(sample: dict[str, Any], kind: str, key: str, value: Any, count: int) -> torch.Tensor:
    """``value`` as a tensor with one row per node or edge (``kind``: ``"node"`` or ``"edge"``).

    Parameters
    ----------
    sample
        The sample being converted (named in the error).
    kind
        ``"node"`` (one row per atom) or ``"edge"`` (one row per edge).
    key
        The key of ``value`` in ``node_keys`` or ``edge_keys``.
    value
        The array to store on the graph.
    count
        Number of nodes or edges.

    Raises
    ------
    DataError
        ``value`` is a scalar or its first dimension is not ``count``.
    """
    value = _tensor(value)
    if value.dim() == 0 or value.shape[0] != count:
        row = "atom" if kind == "node" else "edge"
        _fail(
            sample,
            f"{kind} key {key!r} has shape {list(value.shape)}, expected first dimension {count} "
            f"(one row per {row}); remove it from {kind}_keys.",
        )
    return value


class PointCloudToGraphTransform:
    """Build ``sample["graph"]``, a PyG ``Data`` holding the structure and its edges.

    The graph carries (conventions of :mod:`matsciml.common.graph`):

    ========================= ===================== ==================================
    attribute                 shape, dtype          from
    ========================= ===================== ==================================
    ``pos``                   ``[N, 3]`` float32    ``sample["pos"]`` (Å)
    ``atomic_numbers``        ``[N]`` int64         ``sample["atomic_numbers"]``
    ``edge_index``            ``[2, E]`` int64      ``sample["edge_index"]``
    ``cell_shifts``           ``[E, 3]`` float32    ``sample["cell_shifts"]``
    ``cell``                  ``[1, 3, 3]`` float32 ``sample["cell"]`` (zeros if absent)
    ``natoms``                ``[1]`` int64         ``N``
    ========================= ===================== ==================================

    plus every other name of ``node_keys`` found in the sample (top level first,
    then ``sample["targets"]``; names not found are skipped, so upstream lists
    such as ``[pos, atomic_numbers, force]`` work on data without forces) and
    every name of ``edge_keys`` found at the top level of the sample.

    When the sample has no ``edge_index`` (no
    :class:`~matsciml.datasets.transforms.PeriodicPropertiesTransform` before
    this transform), a non-periodic radius graph is built: all pairs closer than
    ``cutoff_dist``, with zero ``cell_shifts``. If the sample is periodic a
    warning (once per process) says that periodic images are then ignored.

    Parameters
    ----------
    backend
        ``"pyg"`` (default) or ``"dgl"``. ``"dgl"`` is accepted so that upstream
        configs run: graphs are PyG containers in both cases (models read them
        through :mod:`matsciml.common.graph`). When DGL is not installed, one
        warning per process says so.
    cutoff_dist
        Cutoff radius in Å of the non-periodic radius graph (default 20.0); not
        used when the sample already has ``edge_index``.
    node_keys
        Per-atom keys to copy onto the graph (default ``("pos", "atomic_numbers")``,
        which are always present anyway). Each must have first dimension ``N``.
    edge_keys
        Per-edge keys to copy onto the graph (default none). Each must have first
        dimension ``E``.

    Raises
    ------
    ConfigError
        An unknown ``backend`` (the message lists the valid names) or a
        non-positive ``cutoff_dist``.
    DataError
        (when called) a sample without ``pos`` or ``atomic_numbers``, or a
        node/edge key whose first dimension is not ``N``/``E``. The message
        names the structure (``id``, file, record) and the key.

    Example
    -------
    In a model config (``transforms`` list)::

        transforms:
          - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
            init_args: {cutoff_radius: 6.5, adaptive_cutoff: true}
          - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
            init_args: {backend: pyg, cutoff_dist: 20.0, node_keys: [pos, atomic_numbers]}
    """

    #: Same sample in, same output out: the graph cache may store the result (see :mod:`matsciml.datasets.cache`).
    deterministic = True

    def __init__(
        self,
        backend: str = "pyg",
        cutoff_dist: float = 20.0,
        node_keys: Sequence[str] = ("pos", "atomic_numbers"),
        edge_keys: Sequence[str] | None = None,
    ) -> None:
        if backend not in _BACKENDS:
            raise ConfigError(
                f"PointCloudToGraphTransform: unknown backend {backend!r}; valid names: "
                f"{', '.join(repr(b) for b in _BACKENDS)} ({closest(str(backend), _BACKENDS)})"
            )
        try:
            cutoff = float(cutoff_dist)
        except (TypeError, ValueError):
            cutoff = float("nan")
        if not cutoff > 0 or not np.isfinite(cutoff):
            raise ConfigError(
                f"PointCloudToGraphTransform: cutoff_dist must be a positive number of Å, got {cutoff_dist!r}."
            )
        if isinstance(node_keys, str) or (edge_keys is not None and isinstance(edge_keys, str)):
            raise ConfigError(
                "PointCloudToGraphTransform: node_keys and edge_keys are lists of names, e.g. "
                "node_keys: [pos, atomic_numbers]."
            )
        self.backend = backend
        self.cutoff_dist = cutoff
        # keep the order given, drop duplicates
        self.node_keys = list(dict.fromkeys(node_keys))
        self.edge_keys = list(dict.fromkeys(edge_keys or ()))
        if backend == "dgl" and not _dgl_available():
            _warn_dgl_missing()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, cutoff_dist={self.cutoff_dist:g}, "
            f"node_keys={self.node_keys}, edge_keys={self.edge_keys})"
        )

    def _edges(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if schema.EDGE_INDEX in sample:
            edge_index = _tensor(sample[schema.EDGE_INDEX], torch.long)
            shifts = sample.get(schema.CELL_SHIFTS)
            if shifts is None:
                cell_shifts = torch.zeros(edge_index.shape[1], 3)
            else:
                cell_shifts = _tensor(shifts, torch.float32)
            return edge_index, cell_shifts
        pbc = sample.get(schema.PBC)
        if pbc is not None and bool(_tensor(pbc).bool().any()):
            global _NON_PERIODIC_WARNED
            if not _NON_PERIODIC_WARNED:
                _NON_PERIODIC_WARNED = True
                warnings.warn(
                    f"PointCloudToGraphTransform: {describe_structure(sample)} is periodic but has no 'edge_index'; "
                    f"building a non-periodic radius graph (cutoff_dist={self.cutoff_dist:g} Å) that ignores periodic "
                    "images. Put PeriodicPropertiesTransform before this transform to include them.",
                    UserWarning,
                    stacklevel=3,
                )
        return periodic_neighbor_list(sample[schema.POS], None, False, self.cutoff_dist, structure=sample)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Add ``graph`` to ``sample`` and return it (other keys are left as they are)."""
        for key in (schema.POS, schema.ATOMIC_NUMBERS):
            if key not in sample:
                raise DataError(
                    f"{describe_structure(sample)}: the sample has no {key!r} key (keys: {sorted(sample)}); "
                    "PointCloudToGraphTransform needs 'pos' [N, 3] and 'atomic_numbers' [N]."
                )
        pos = _tensor(sample[schema.POS], torch.float32)
        numbers = _tensor(sample[schema.ATOMIC_NUMBERS], torch.long).reshape(-1)
        num_atoms = int(pos.shape[0])
        if numbers.shape[0] != num_atoms:
            _fail(sample, f"'atomic_numbers' has {numbers.shape[0]} entries but 'pos' has {num_atoms} rows.")
        edge_index, cell_shifts = self._edges(sample)
        if edge_index.dim() != 2 or edge_index.shape[0] != 2 or cell_shifts.shape != (edge_index.shape[1], 3):
            _fail(
                sample,
                f"'edge_index' must be [2, E] and 'cell_shifts' [E, 3], got {list(edge_index.shape)} and "
                f"{list(cell_shifts.shape)}.",
            )
        if edge_index.numel() and int(edge_index.max()) >= num_atoms:
            _fail(
                sample,
                f"'edge_index' refers to atom {int(edge_index.max())} but the structure has {num_atoms} atoms; "
                "recompute the edges after changing the atoms (PeriodicPropertiesTransform last).",
            )
        cell = sample.get(schema.CELL)
        cell = torch.zeros(1, 3, 3) if cell is None else _tensor(cell, torch.float32).reshape(1, 3, 3)

        graph = Data(
            pos=pos,
            atomic_numbers=numbers,
            edge_index=edge_index,
            cell_shifts=cell_shifts,
            cell=cell,
            natoms=torch.tensor([num_atoms], dtype=torch.long),
            num_nodes=num_atoms,
        )
        targets = sample.get(schema.TARGETS) or {}
        for key in self.node_keys:
            if key in _BUILT_IN:
                continue
            value = sample[key] if key in sample else targets.get(key)
            if value is None:
                continue
            graph[key] = _rows(sample, "node", key, value, num_atoms)
        num_edges = int(edge_index.shape[1])
        for key in self.edge_keys:
            if key in _BUILT_IN or key not in sample:
                continue
            graph[key] = _rows(sample, "edge", key, sample[key], num_edges)
        sample[schema.GRAPH] = graph
        return sample
