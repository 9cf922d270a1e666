"""The sample and batch layout shared by readers, transforms, collate and models.

A **sample** (one structure, as returned by a reader and by
``StructureDataset.__getitem__``) is a ``dict``:

============== ================================ ==========================================
key            value                            notes
============== ================================ ==========================================
``pos``        float32 ``[N, 3]``               Cartesian positions, Å
``atomic_numbers`` int64 ``[N]``
``cell``       float32 ``[1, 3, 3]``            lattice vectors as rows, Å; zeros if none
``pbc``        bool ``[3]``
``natoms``     ``int``                          ``N``
``id``         ``str``                          ``"<file name>:<record index>"`` unless the
                                                record names itself (``id``/``*_id`` info)
``source``     ``{"file": str, "index": int}``  where the record came from (error messages)
``targets``    ``dict[str, Tensor]``            every label found: scalars are 0-d float
                                                tensors; per-atom arrays ``[N, ...]``
                                                (``forces`` ``[N, 3]``); ``stress`` ``[3, 3]``
============== ================================ ==========================================

Transforms add to it:

* :class:`~matsciml.datasets.transforms.PeriodicPropertiesTransform`:
  ``edge_index`` int64 ``[2, E]`` (row 0 centre ``i``, row 1 neighbour ``j``) and
  ``cell_shifts`` float32 ``[E, 3]`` (integer lattice shifts ``S``;
  ``r_ij = pos[j] - pos[i] + S @ cell``).
* :class:`~matsciml.datasets.transforms.PointCloudToGraphTransform`: ``graph``, a
  PyG ``Data`` with ``pos``, ``atomic_numbers``, ``edge_index``, ``cell_shifts``,
  ``cell`` ``[1, 3, 3]`` and ``natoms``.

A **batch** (``matsciml.datasets.collate.collate_samples``) is a ``dict``:

* ``graph``: PyG ``Batch`` (``batch`` vector, ``cell`` ``[B, 3, 3]``),
* ``targets``: ``dict[str, Tensor]``: scalars stacked to ``[B]``, per-atom arrays
  concatenated to ``[sum N, ...]``, ``stress`` stacked to ``[B, 3, 3]``,
* ``natoms``: int64 ``[B]``, ``ids``: ``list[str]``, ``batch_size``: ``int``.

Graph content is read through :mod:`matsciml.common.graph`.
"""

from __future__ import annotations

POS = "pos"
ATOMIC_NUMBERS = "atomic_numbers"
CELL = "cell"
PBC = "pbc"
NATOMS = "natoms"
ID = "id"
SOURCE = "source"
TARGETS = "targets"
EDGE_INDEX = "edge_index"
CELL_SHIFTS = "cell_shifts"
GRAPH = "graph"

#: Target keys holding one row per atom (concatenated, not stacked, when batching).
PER_ATOM_TARGETS = ("forces",)

#: Other names of targets (the Open MatSciML Toolkit's), accepted wherever target keys are
#: given (dataset ``target_keys``, task ``task_keys``, experiment ``targets``).
TARGET_ALIASES = {"force": "forces"}


def canonical_target(key: str) -> str:
    """This package's name of a target key (``"force"`` -> ``"forces"``; other keys unchanged)."""
    return TARGET_ALIASES.get(key, key)


def canonical_targets(keys: list[str] | tuple[str, ...] | None) -> list[str] | None:
    """:func:`canonical_target` of each key, duplicates dropped, order kept (``None`` stays ``None``)."""
    if keys is None:
        return None
    if isinstance(keys, str):
        keys = [keys]
    return list(dict.fromkeys(canonical_target(str(k)) for k in keys))
