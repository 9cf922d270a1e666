"""Collate samples into a batch (the batch layout of :mod:`matsciml.datasets.schema`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch_geometric.data import Batch

from matsciml.common.errors import DataError
from matsciml.datasets import schema
from matsciml.datasets.neighbors import describe_structure

__all__ = ["collate_samples", "is_per_atom", "STACKED_TARGETS"]

#: Targets that are one array per structure whatever their shape: always stacked to ``[B, ...]``.
STACKED_TARGETS = ("stress", "virial", "dipole", "dipole_moment")


def _natoms(sample: dict[str, Any]) -> int:
    if schema.NATOMS in sample:
        return int(sample[schema.NATOMS])
    return int(sample[schema.GRAPH].num_nodes)


def is_per_atom(key: str, values: Sequence[torch.Tensor], natoms: Sequence[int]) -> bool:
    """Whether ``values`` (one per structure) of ``key`` are per atom (see :func:`collate_samples`)."""
    if key in schema.PER_ATOM_TARGETS:
        return True
    if key in STACKED_TARGETS:
        return False
    return all(v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, natoms))


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
    if len(samples) == 0:
        raise DataError("collate_samples got an empty list of samples; the dataset or its split is empty.")
    for sample in samples:
        if schema.GRAPH not in sample:
            raise DataError(
                f"{describe_structure(sample)}: the sample has no 'graph' (keys: {sorted(sample)}). Add "
                "matsciml.datasets.transforms.PointCloudToGraphTransform at the end of the dataset transforms "
                "(after PeriodicPropertiesTransform for periodic structures)."
            )
    graph = Batch.from_data_list([sample[schema.GRAPH] for sample in samples])
    natoms = [_natoms(sample) for sample in samples]

    targets: dict[str, torch.Tensor] = {}
    per_sample = [sample.get(schema.TARGETS) or {} for sample in samples]
    common = [key for key in per_sample[0] if all(key in t for t in per_sample[1:])]
    for key in common:
        values = [torch.as_tensor(t[key]) for t in per_sample]
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
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            shown = ", ".join(
                f"{s.get(schema.ID, k)}: {list(v.shape)}" for k, (s, v) in enumerate(zip(samples, values))
            )
            raise DataError(
                f"target {key!r} has different shapes across the batch ({shown}); a per-structure target must "
                "have one shape. Fix the records, or add the key to PER_ATOM_TARGETS if it is per atom."
            )
        targets[key] = torch.stack(values, dim=0)

    return {
        schema.GRAPH: graph,
        schema.TARGETS: targets,
        schema.NATOMS: torch.tensor(natoms, dtype=torch.long),
        "ids": [str(sample.get(schema.ID, k)) for k, sample in enumerate(samples)],
        "batch_size": len(samples),
    }
