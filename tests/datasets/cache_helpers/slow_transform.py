"""A deterministic transform that takes its time and leaves a trace (for the kill test)."""

from __future__ import annotations

import time

from matsciml.datasets.transforms import PeriodicPropertiesTransform, PointCloudToGraphTransform


class SlowMarker:
    """Identity transform that sleeps ``delay`` seconds and appends a byte to ``marker`` (class settings:
    they are not part of the cache key, so the killed build and the rebuild share one cache file)."""

    deterministic = True
    delay = 0.0
    marker: str | None = None

    def __call__(self, sample: dict) -> dict:
        time.sleep(SlowMarker.delay)
        if SlowMarker.marker:
            with open(SlowMarker.marker, "ab") as handle:
                handle.write(b".")
        return sample


def transforms() -> list:
    return [SlowMarker(), PeriodicPropertiesTransform(cutoff_radius=4.0), PointCloudToGraphTransform("pyg")]
