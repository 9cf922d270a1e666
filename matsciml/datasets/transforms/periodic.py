"""Periodic neighbour lists as a dataset transform."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.datasets import schema
from matsciml.datasets.neighbors import BACKENDS, DEFAULT_BACKEND, describe_structure, periodic_neighbor_list

__all__ = ["PeriodicPropertiesTransform"]


class PeriodicPropertiesTransform:
    """Add the periodic neighbour list (``edge_index``, ``cell_shifts``) to a sample.

    For every pair of atoms closer than ``cutoff_radius`` (periodic images
    included, along the directions where ``sample["pbc"]`` is True) it adds

    * ``edge_index`` int64 ``[2, num_edges]``: row 0 centre ``i``, row 1 neighbour ``j``;
    * ``cell_shifts`` float32 ``[num_edges, 3]``: integer lattice shifts ``S`` with
      ``r_ij = pos[j] - pos[i] + S @ cell``.

    The list is full (both directions), excludes an atom paired with itself in
    the home cell, and is sorted by ``(i, j, S)`` (see
    :func:`matsciml.datasets.neighbors.periodic_neighbor_list`). Other keys of the
    sample are left as they are; the sample is returned (modified in place).

    Parameters
    ----------
    cutoff_radius
        Cutoff radius in Å (default 6.0).
    adaptive_cutoff
        If True (default False), a structure with an atom that has no neighbour
        within ``cutoff_radius`` is recomputed with the cutoff raised in steps of
        0.5 Å until every atom has at least one neighbour, up to 30 Å (upstream
        matsciml's rule). Only such structures get a larger cutoff. A structure
        that still has an isolated atom at 30 Å raises ``DataError``, except a
        single atom without periodic direction, which can have no neighbour and
        keeps zero edges.
    max_neighbors_per_atom
        Raise ``DataError`` when the average number of edges per atom exceeds
        this (default 300; ``None`` disables). A dense metal at 6 Å has about
        80. The check guards against cells in wrong units or absurd cutoffs,
        which would otherwise exhaust memory.
    backend
        Neighbour-list kernel: ``"pymatgen"`` (default: pymatgen's compiled cell
        list, called on arrays), ``"vesin"`` or ``"ase"``. All three give the
        same edges; see :mod:`matsciml.datasets.neighbors` for their speed.
    allow_self_loops
        Upstream name: also add the edges ``(i, i, S=0)`` (default False).
    max_neighbors, is_cartesian, convert_to_unit_cell, is_undirected
        Upstream arguments, accepted so that upstream configs load, and ignored:
        edges are never truncated per atom (upstream's ``max_neighbors`` drops
        edges and breaks the symmetry of the list; the guard above replaces it),
        positions are always Cartesian Å and need no wrapping, and the list is
        always full (both directions), as the models expect. A warning says so
        when one of them is set to a value that would change upstream's result.

    Raises
    ------
    ConfigError
        An unknown ``backend`` or a non-positive ``cutoff_radius``.
    DataError
        (when called) a sample without ``pos``, bad positions or cell, too many
        neighbours per atom, or an isolated atom with ``adaptive_cutoff``. The
        message names the structure (``id``, file, record).

    Example
    -------
    In a model config (``transforms`` list)::

        transforms:
          - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
            init_args: {cutoff_radius: 6.0, adaptive_cutoff: true}
          - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
            init_args: {backend: pyg}

    In Python::

        >>> transform = PeriodicPropertiesTransform(cutoff_radius=5.0)
        >>> sample = transform(sample)  # adds sample["edge_index"], sample["cell_shifts"]
    """

    #: Same sample in, same output out: the graph cache may store the result (see :mod:`matsciml.datasets.cache`).
    deterministic = True

    #: Step (Å) and ceiling (Å) of the adaptive cutoff.
    ADAPTIVE_STEP = 0.5
    ADAPTIVE_MAX = 30.0

    def __init__(
        self,
        cutoff_radius: float = 6.0,
        adaptive_cutoff: bool = False,
        max_neighbors_per_atom: float | None = 300,
        backend: str = DEFAULT_BACKEND,
        allow_self_loops: bool = False,
        max_neighbors: int | None = None,
        is_cartesian: bool | None = None,
        convert_to_unit_cell: bool = False,
        is_undirected: bool = False,
    ) -> None:
        try:
            cutoff = float(cutoff_radius)
        except (TypeError, ValueError):
            cutoff = float("nan")
        if not cutoff > 0 or not np.isfinite(cutoff):
            raise ConfigError(
                f"PeriodicPropertiesTransform: cutoff_radius must be a positive number of Å, got {cutoff_radius!r}."
            )
        if backend not in BACKENDS:
            raise ConfigError(
                f"PeriodicPropertiesTransform: unknown backend {backend!r}; {closest(str(backend), BACKENDS)}"
            )
        if max_neighbors_per_atom is not None and not max_neighbors_per_atom > 0:
            raise ConfigError(
                "PeriodicPropertiesTransform: max_neighbors_per_atom must be positive or null, "
                f"got {max_neighbors_per_atom!r}."
            )
        ignored = []
        if max_neighbors is not None:
            ignored.append(f"max_neighbors={max_neighbors!r} (edges are never truncated)")
        if is_cartesian is False:
            ignored.append("is_cartesian=False (positions are always Cartesian Å)")
        if convert_to_unit_cell:
            ignored.append("convert_to_unit_cell=True (not needed: images are found wherever atoms are)")
        if is_undirected:
            ignored.append("is_undirected=True (the edge list is always full, both directions)")
        if ignored:
            warnings.warn(
                "PeriodicPropertiesTransform ignores the upstream argument(s) " + "; ".join(ignored) + ".",
                UserWarning,
                stacklevel=2,
            )
        self.cutoff_radius = cutoff
        self.adaptive_cutoff = bool(adaptive_cutoff)
        self.max_neighbors_per_atom = max_neighbors_per_atom
        self.backend = backend
        self.allow_self_loops = bool(allow_self_loops)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cutoff_radius={self.cutoff_radius:g}, adaptive_cutoff={self.adaptive_cutoff}, "
            f"max_neighbors_per_atom={self.max_neighbors_per_atom}, backend={self.backend!r})"
        )

    def _neighbors(self, sample: dict[str, Any], cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
        return periodic_neighbor_list(
            sample[schema.POS],
            sample.get(schema.CELL),
            sample.get(schema.PBC, False),
            cutoff,
            self_interaction=self.allow_self_loops,
            max_neighbors_per_atom=self.max_neighbors_per_atom,
            structure=sample,
            backend=self.backend,
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Add ``edge_index`` and ``cell_shifts`` to ``sample`` and return it.

        Parameters
        ----------
        sample
            A sample dict with ``pos`` ``[N, 3]`` and, for periodic structures,
            ``cell`` ``[1, 3, 3]`` and ``pbc`` ``[3]`` (missing ``pbc``: not periodic).
        """
        if schema.POS not in sample:
            raise DataError(
                f"{describe_structure(sample)}: the sample has no {schema.POS!r} key (keys: {sorted(sample)}); "
                "PeriodicPropertiesTransform needs Cartesian positions [N, 3] in Å."
            )
        cutoff = self.cutoff_radius
        edge_index, cell_shifts = self._neighbors(sample, cutoff)
        if self.adaptive_cutoff:
            edge_index, cell_shifts = self._adapt(sample, edge_index, cell_shifts)
        sample[schema.EDGE_INDEX] = edge_index
        sample[schema.CELL_SHIFTS] = cell_shifts
        return sample

    def _adapt(
        self, sample: dict[str, Any], edge_index: torch.Tensor, cell_shifts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_atoms = int(sample[schema.POS].shape[0])
        pbc = np.broadcast_to(np.asarray(sample.get(schema.PBC, False), dtype=bool).reshape(-1), (3,))
        if num_atoms == 0 or (num_atoms == 1 and not pbc.any()):
            return edge_index, cell_shifts
        cutoff = self.cutoff_radius
        while True:
            degree = torch.bincount(edge_index[0], minlength=num_atoms)
            isolated = torch.nonzero(degree == 0).flatten()
            if isolated.numel() == 0:
                return edge_index, cell_shifts
            if cutoff >= self.ADAPTIVE_MAX:
                shown = str(isolated[:10].tolist()) + (" ..." if isolated.numel() > 10 else "")
                raise DataError(
                    f"{describe_structure(sample)}: atom(s) {shown} have no neighbour within {cutoff:g} Å, the "
                    "ceiling of adaptive_cutoff. Check the positions and cell (units: Å), or drop this record."
                )
            cutoff = min(cutoff + self.ADAPTIVE_STEP, self.ADAPTIVE_MAX)
            edge_index, cell_shifts = self._neighbors(sample, cutoff)
