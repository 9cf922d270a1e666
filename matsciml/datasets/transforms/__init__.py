"""Dataset transforms: periodic neighbour lists and graph construction.

A transform is a callable ``sample -> sample`` (see :mod:`matsciml.datasets.schema`),
applied in list order by the dataset.
"""

from __future__ import annotations

from matsciml.datasets.transforms.graph import PointCloudToGraphTransform
from matsciml.datasets.transforms.periodic import PeriodicPropertiesTransform
from matsciml.datasets.transforms.upstream import (
    COMShift,
    DistancesTransform,
    FrameAveraging,
    GraphVariablesTransform,
    MGLDataTransform,
)
from matsciml.registry import register_transform

__all__ = [
    "PeriodicPropertiesTransform",
    "PointCloudToGraphTransform",
    "MGLDataTransform",
    "DistancesTransform",
    "GraphVariablesTransform",
    "COMShift",
    "FrameAveraging",
]

for _cls in (
    PeriodicPropertiesTransform,
    PointCloudToGraphTransform,
    MGLDataTransform,
    DistancesTransform,
    GraphVariablesTransform,
    COMShift,
    FrameAveraging,
):
    register_transform(_cls)
