"""Encoders on PyG graphs that wrap external libraries (upstream path ``matsciml.models.pyg``)."""

from __future__ import annotations

__all__: list[str] = []
