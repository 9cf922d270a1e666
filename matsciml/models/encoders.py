"""Registry of the encoders, by class name.

Every encoder follows the same contract: ``forward(batch)`` takes a batch dict (with
``"graph"``) or a graph, computes edge vectors from positions, and returns
:class:`~matsciml.models.embeddings.Embeddings` (invariant ``system_embedding``
``[num_graphs, D]`` and ``point_embedding`` ``[num_nodes, D]``); ``embedding_dim`` is ``D``.
"""

from __future__ import annotations

from matsciml.common.errors import ConfigError, closest
from matsciml.models.egnn import PLEGNNBackbone
from matsciml.models.equivariant import E3NNEncoder, NequIPEncoder

__all__ = ["ENCODERS", "get_encoder_class"]

#: Encoder classes by name.
ENCODERS: dict[str, type] = {
    "PLEGNNBackbone": PLEGNNBackbone,
    "E3NNEncoder": E3NNEncoder,
    "NequIPEncoder": NequIPEncoder,
}


def get_encoder_class(name: str | type) -> type:
    """Return the encoder class called ``name``.

    Parameters
    ----------
    name
        A registered name (``"PLEGNNBackbone"``, ``"E3NNEncoder"``, ``"NequIPEncoder"``), a dotted
        import path (``"matsciml.models.PLEGNNBackbone"``, or any importable class), or a class
        (returned unchanged).

    Raises
    ------
    ConfigError
        Unknown name (the message lists the closest registered names) or unimportable path.
    """
    if isinstance(name, type):
        return name
    if name in ENCODERS:
        return ENCODERS[name]
    if "." in name:
        from matsciml.common.config import resolve_class

        return resolve_class(name, "encoder class")
    raise ConfigError(f"unknown encoder {name!r}; {closest(name, ENCODERS)}")
