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
from test_encoders import random_crystal, to_graph  # noqa: E402

from matsciml.common.config import instantiate  # noqa: E402
from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.models import MACEWrapper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
R_MAX = 4.0
GRAPH_CUTOFF = R_MAX + 0.5  # wider than r_max: the wrapper must drop the longer edges
TOL = 1e-8


def small_kwargs(**overrides) -> dict:
    kwargs = instantiate(
        {
            "mace_module": {"class_instance": "mace.modules.ScaleShiftMACE"},
            "interaction_cls": {"class_instance": "mace.modules.blocks.RealAgnosticResidualInteractionBlock"},
            "interaction_cls_first": {"class_instance": "mace.modules.blocks.RealAgnosticResidualInteractionBlock"},
            "gate": {"class_path": "torch.nn.SiLU"},
            "MLP_irreps": {"class_path": "e3nn.o3.Irreps", "init_args": {"irreps": "4x0e"}},
        }
    )
    kwargs.update(
        atom_embedding_dim=8,
        hidden_irreps="8x0e + 8x1o",
        atomic_inter_scale=0.8,
        atomic_inter_shift=0.1,
        avg_num_neighbors=20.0,
        correlation=2,
        max_ell=2,
        num_atom_embedding=30,
        num_bessel=4,
        num_interactions=2,
        num_polynomial_cutoff=5,
        r_max=R_MAX,
        radial_type="bessel",
        distance_transform="None",
    )
    kwargs.update(overrides)
    return kwargs


_BUILT: dict[str, torch.nn.Module] = {}


@pytest.fixture
def model():
    if "mace" not in _BUILT:
        torch.manual_seed(0)
        _BUILT["mace"] = MACEWrapper(**small_kwargs()).double()
    return copy.deepcopy(_BUILT["mace"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("reflect", [False, True])
def test_invariance_and_force_equivariance(model, reflect):
    checks.check_invariance_and_equivariance(model, GRAPH_CUTOFF, TOL, reflect)


def test_permutation_invariance(model):
    checks.check_permutation(model, GRAPH_CUTOFF, TOL)


def test_supercell_energy_is_twice_the_cell(model):
    checks.check_supercell(model, GRAPH_CUTOFF, TOL)


def test_forces_match_finite_differences(model):
    checks.check_forces_finite_differences(model, GRAPH_CUTOFF, rel=1e-6)


def test_every_parameter_gets_a_gradient(model):
    checks.check_all_parameters_get_gradients(model, GRAPH_CUTOFF)


def test_embedding_is_the_scalar_channels_of_every_layer(model):
    # hidden 8x0e + 8x1o: layer 1 gives 8x0e + 8x1o (32 values), the last layer 8x0e; 16 scalars in all
    assert model.embedding_dim == 16
    assert model.scalar_index.tolist() == list(range(8)) + list(range(32, 40))


def test_state_dict_round_trip_through_weights_only_load(model, tmp_path):
    path = tmp_path / "mace.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(99)
    fresh = MACEWrapper(**small_kwargs()).double()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    graph = to_graph(random_crystal(3), GRAPH_CUTOFF)
    with torch.no_grad():
        assert torch.equal(fresh(graph).point_embedding, model(graph).point_embedding)


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
