"""Encoders on PyG graphs that wrap external libraries (upstream path ``matsciml.models.pyg``).

``matsciml.models.pyg.mace.MACEWrapper`` wraps mace-torch. The toolkit's other PyG
encoders are not part of this package; importing one raises an ``ImportError`` naming
the encoder to use instead (this package's encoders all run on PyG graphs).
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []

#: The toolkit's PyG encoders that are not here -> what to use.
_INSTEAD = {
    "EGNN": "matsciml.models.PLEGNNBackbone (the E(n)-equivariant GNN; see docs/coming_from_upstream.rst for its "
    "arguments)",
    "FAENet": "matsciml.models.PLEGNNBackbone or matsciml.models.E3NNEncoder",
    "MACE": "matsciml.models.pyg.mace.MACEWrapper (mace-torch) or matsciml.models.E3NNEncoder",
}


def __getattr__(name: str) -> Any:
    if name in _INSTEAD:
        raise ImportError(f"matsciml.models.pyg.{name} is not part of this matsciml; use {_INSTEAD[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
