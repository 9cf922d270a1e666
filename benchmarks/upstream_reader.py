"""Records per second: the restricted upstream reader against plain ``pickle.loads``, on the same LMDB.

For each Open MatSciML Toolkit devset under ``tests/data/upstream`` (or the folders given),
the stored values are read into memory once, then decoded repeatedly in one process by

* ``pickle``: plain ``pickle.loads`` (what the toolkit does; it would run any callable a
  record names, and it reads NumPy 1 names through NumPy's deprecation shim);
* ``safe``: :func:`matsciml.datasets.upstream.safe_loads` (the allowlist unpickler; nested
  tensor blobs parsed without running code).

The ratio is ``pickle`` records/s divided by ``safe`` records/s (the goal is at most 1.3:
the restricted reader costs at most 30 % more than plain unpickling). Each figure is the
best of ``--repeats`` passes. Mapping to samples is not timed (it is the same work for any
decoder). Run::

    python benchmarks/upstream_reader.py              # a few seconds
    python benchmarks/upstream_reader.py --repeats 20 path/to/lmdb/folder ...
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matsciml.datasets.readers.lmdb_format import lmdb_files, shared_env  # noqa: E402
from matsciml.datasets.upstream.reader import integer_keys  # noqa: E402
from matsciml.datasets.upstream.safe_pickle import safe_loads  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1] / "tests" / "data" / "upstream"


def stored_values(folder: Path) -> list[bytes]:
    values = []
    for file, subdir in lmdb_files(folder):
        env = shared_env(file, subdir)
        with env.begin() as txn:
            for key in integer_keys(env):
                values.append(bytes(txn.get(str(key).encode())))
    return values


def rate(decode, values: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for value in values:
            decode(value)
        best = min(best, time.perf_counter() - start)
    return len(values) / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="toolkit LMDB folders (default: tests/data/upstream/*)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    folders = args.folders or sorted(p for p in DEFAULT.iterdir() if p.is_dir())
    print(f"{'dataset':<20s} {'records':>8s} {'pickle rec/s':>13s} {'safe rec/s':>11s} {'ratio':>6s}")
    for folder in folders:
        values = stored_values(folder)
        safe = rate(safe_loads, values, args.repeats)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPy 1 names through plain pickle warn
            try:
                plain = rate(pickle.loads, values, args.repeats)
            except ImportError as err:  # Materials Project records name emmet classes
                print(f"{folder.name:<20s} {len(values):>8d} {'n/a':>13s} {safe:>11.0f}   (plain pickle: {err})")
                continue
        print(f"{folder.name:<20s} {len(values):>8d} {plain:>13.0f} {safe:>11.0f} {plain / safe:>6.2f}")
    print(
        f"(one process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; ratio = safe time per record "
        "/ plain pickle time per record: above 1 means the safe reader is slower)"
    )


if __name__ == "__main__":
    main()
