"""Encoders that wrap the models of matgl (``pip install 'matsciml[matgl]'``).

matgl is imported when a model is built, not when this package is imported.
"""

from __future__ import annotations

from matsciml.models.matgl.chgnet import CHGNet
from matsciml.models.matgl.m3gnet import M3GNet
from matsciml.models.matgl.megnet import MEGNet
from matsciml.models.matgl.tensornet import TensorNet

__all__ = ["M3GNet", "CHGNet", "MEGNet", "TensorNet"]
