"""MACEWrapper (mace-torch) passes the encoder checks in float64, on upstream's arguments.

Needs the ``mace`` extra (installed by ``make test``); skipped with the reason otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mace.modules", reason="the mace extra is not installed (see docs/encoders.rst)")

import encoder_checks as checks  # noqa: E402
from helpers import small_mace_kwargs  # noqa: E402
from test_encoders import random_crystal, to_graph  # noqa: E402

from matsciml.common.config import instantiate  # noqa: E402
from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.models import MACEWrapper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
R_MAX = 4.0
GRAPH_CUTOFF = R_MAX + 0.5  # wider than r_max: the wrapper must drop the longer edges
TOL = 1e-8


def small_kwargs(**overrides) -> dict:
    """The shared small MACE, as ``ScaleShiftMACE`` with upstream's argument forms, built."""
    upstream = {
        "mace_module": {"class_instance": "mace.modules.ScaleShiftMACE"},
        "MLP_irreps": {"class_path": "e3nn.o3.Irreps", "init_args": {"irreps": "4x0e"}},
        "atomic_inter_scale": 0.8,
        "atomic_inter_shift": 0.1,
        "avg_num_neighbors": 20.0,
        "num_atom_embedding": 30,
        "r_max": R_MAX,
        "radial_type": "bessel",
        "distance_transform": "None",
    }
    return instantiate(small_mace_kwargs(**{**upstream, **overrides}))


_BUILT: dict[str, torch.nn.Module] = {}


@pytest.fixture
def model():
    if "mace" not in _BUILT:
        torch.manual_seed(0)
        _BUILT["mace"] = MACEWrapper(**small_kwargs()).double()
    return copy.deepcopy(_BUILT["mace"])


class TestMACEWrapper(checks.EncoderChecks):
    GRAPH_CUTOFF, TOL = GRAPH_CUTOFF, TOL

    def rebuild(self, model):
        return MACEWrapper(**small_kwargs()).double()


def test_embedding_is_the_scalar_channels_of_every_layer(model):
    # hidden 8x0e + 8x1o: layer 1 gives 8x0e + 8x1o (32 values), the last layer 8x0e; 16 scalars in all
    assert model.embedding_dim == 16
    assert model.scalar_index.tolist() == list(range(8)) + list(range(32, 40))


def test_upstream_config_builds_with_its_widths():
    config = yaml.safe_load((REPO / "experiments/configs/models/mace_pyg.yaml").read_text())
    encoder = MACEWrapper(**instantiate(config["encoder_kwargs"]))
    assert encoder.embedding_dim == config["output_kwargs"]["input_dim"] == 256


def test_errors_are_clear(model):
    with pytest.raises(ConfigError, match="did you mean 'num_bessel'"):
        MACEWrapper(**small_kwargs(num_bessels=4))
    with pytest.raises(ConfigError, match="30 values|has 3 values"):
        MACEWrapper(**small_kwargs(atomic_energies=[1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match="disable_forces must be true"):
        MACEWrapper(**small_kwargs(disable_forces=False))
    atoms = random_crystal(3)
    atoms.numbers[0] = 50
    with pytest.raises(DataError, match="raise num_atom_embedding"):
        model(to_graph(atoms, GRAPH_CUTOFF))
