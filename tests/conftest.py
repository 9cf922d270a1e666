"""Fixtures shared by every test module; shared helper functions are in ``tests/helpers.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # ``import helpers`` from any test module
    sys.path.insert(0, str(TESTS))

#: Small real data files shipped with the tests (see tests/data/README.md).
DATA = TESTS / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``tests/data``: the real devsets the tests read (never a path outside the repository)."""
    return DATA
