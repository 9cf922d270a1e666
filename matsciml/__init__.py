"""matsciml: a PyTorch Lightning toolkit for machine learning on materials."""

from __future__ import annotations

__version__ = "0.1.0"
