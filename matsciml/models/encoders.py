"""The toolkit's encoders, registered by class name in :mod:`matsciml.registry`.

Every encoder follows the same contract: ``forward(batch)`` takes a batch dict (with
``"graph"``) or a graph, computes edge vectors from positions, and returns
:class:`~matsciml.models.embeddings.Embeddings` (invariant ``system_embedding``
``[num_graphs, D]`` and ``point_embedding`` ``[num_nodes, D]``); ``embedding_dim`` is ``D``.
"""

from __future__ import annotations

# the wrappers of optional libraries (matgl, mace-torch) register themselves on import; the
# libraries themselves load only when a model is built
from matsciml.models import matgl as _matgl  # noqa: F401
from matsciml.models import unavailable as _unavailable  # noqa: F401
from matsciml.models.egnn import PLEGNNBackbone
from matsciml.models.equivariant import E3NNEncoder, NequIPEncoder
from matsciml.models.pyg import mace as _mace  # noqa: F401
from matsciml.registry import lookup, register_encoder

__all__ = ["get_encoder_class"]

register_encoder(PLEGNNBackbone)
register_encoder(E3NNEncoder, aliases=["NequIPEncoder"] if NequIPEncoder is E3NNEncoder else ())
if NequIPEncoder is not E3NNEncoder:  # pragma: no cover - kept as an alias today
    register_encoder(NequIPEncoder)


def get_encoder_class(name: str | type) -> type:
    """Return the encoder class called ``name``.

    Parameters
    ----------
    name
        A registered name (``"PLEGNNBackbone"``, ``"E3NNEncoder"``, ...; see
        :func:`matsciml.registry.names` ``("encoder")``), a dotted import path
        (``"matsciml.models.PLEGNNBackbone"``, or any importable class), or a class (returned unchanged).

    Raises
    ------
    ConfigError
        Unknown name (the message lists the closest registered names) or unimportable path.
    """
    return lookup("encoder", name, "encoder class")
