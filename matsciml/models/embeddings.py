"""The output of every encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Embeddings"]


@dataclass
class Embeddings:
    """Embeddings produced by an encoder for a batch of structures.

    Attributes
    ----------
    system_embedding
        ``[num_graphs, embedding_dim]``: one invariant vector per structure.
    point_embedding
        ``[num_nodes, embedding_dim]``: one invariant vector per atom.
    """

    system_embedding: torch.Tensor
    point_embedding: torch.Tensor
