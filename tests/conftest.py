"""Fixtures shared by every test module; shared helper functions are in ``tests/helpers.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # ``import helpers`` from any test module
    sys.path.insert(0, str(TESTS))

#: Small real data files shipped with the tests (see tests/data/README.md).
DATA = TESTS / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``tests/data``: the real devsets the tests read (never a path outside the repository)."""
    return DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the tests of a module, restored after them.

    The tensors of the model tests are tiny: further threads only add overhead (and contend
    with the other processes of the machine). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def devset_cache(tmp_path_factory):
    """``MATSCIML_CACHE`` set to a fresh folder for the tests of a module, restored after them.

    The devset's processed copy and the graph caches go there, never to the user's cache.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("MATSCIML_CACHE", str(tmp_path_factory.mktemp("devset")))
    yield
    mp.undo()
