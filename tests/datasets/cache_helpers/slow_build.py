"""Builds a disk graph cache slowly, so that a test can kill the process mid-write.

Usage: ``python slow_build.py <data file> <cache dir> <marker file>``. Every processed
structure appends one byte to the marker file; the test kills the process with SIGKILL
once a few commits have been written to the temporary LMDB file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slow_transform import SlowMarker, transforms  # noqa: E402

from matsciml.datasets import StructureDataset  # noqa: E402
from matsciml.datasets.cache import attach_graph_cache  # noqa: E402

if __name__ == "__main__":
    data, cache_dir, marker = sys.argv[1:4]
    SlowMarker.marker, SlowMarker.delay = marker, 0.02
    dataset = StructureDataset(data, transforms=transforms())
    attach_graph_cache(dataset, {"mode": "disk", "cache_dir": cache_dir, "progress": False})
    time.sleep(60)  # never reached before the kill in the test
