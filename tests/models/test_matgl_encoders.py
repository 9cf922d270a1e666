"""The matgl wrappers (M3GNet, CHGNet, MEGNet, TensorNet) pass the encoder checks in float64.

Needs the ``matgl`` extra (installed by ``make test``); skipped with the reason otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("matgl", reason="the matgl extra is not installed (pip install 'matsciml[matgl]')")

import encoder_checks as checks  # noqa: E402
from test_encoders import random_crystal, to_graph  # noqa: E402

from matsciml.common.errors import ConfigError, DataError  # noqa: E402
from matsciml.models import CHGNet, M3GNet, MEGNet, TensorNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CUTOFF = 4.0  # the models' cutoff; graphs are built 0.5 Å wider, so the wrappers must drop edges
GRAPH_CUTOFF = CUTOFF + 0.5
TOL = 1e-8

MODELS = {
    "M3GNet": lambda: M3GNet(
        cutoff=CUTOFF, threebody_cutoff=3.0, nblocks=2, dim_node_embedding=16, dim_edge_embedding=16, units=16
    ),
    "CHGNet": lambda: CHGNet(
        cutoff=CUTOFF,
        threebody_cutoff=3.0,
        num_blocks=2,
        dim_atom_embedding=16,
        dim_bond_embedding=16,
        dim_angle_embedding=16,
        atom_conv_hidden_dims=(16,),
        bond_conv_hidden_dims=(16,),
        final_hidden_dims=(16,),
    ),
    "MEGNet": lambda: MEGNet(
        edge_feat_dim=8,
        node_feat_dim=8,
        graph_feat_dim=9,
        num_blocks=2,
        hiddens=[16, 8],
        conv_hiddens=[16, 8],
        s2s_num_layers=1,
        s2s_num_iters=2,
        cutoff=CUTOFF,
    ),
    "TensorNet": lambda: TensorNet(cutoff=CUTOFF, units=16, nblocks=2, num_rbf=8),
}
_BUILT: dict[str, torch.nn.Module] = {}


@pytest.fixture(params=list(MODELS))
def model(request):
    if request.param not in _BUILT:
        torch.manual_seed(0)
        _BUILT[request.param] = MODELS[request.param]().double()
    return copy.deepcopy(_BUILT[request.param])


class TestMatglEncoders(checks.EncoderChecks):
    GRAPH_CUTOFF, TOL = GRAPH_CUTOFF, TOL

    def rebuild(self, model):
        return MODELS[type(model).__name__]().double()


def test_unknown_element_and_argument_errors_are_clear():
    with pytest.raises(ConfigError, match=r"nblock.*did you mean 'nblocks'"):
        M3GNet(nblock=2)
    with pytest.raises(ConfigError, match="element symbols"):
        TensorNet(element_types=["Cu", "Xx"])
    with pytest.raises(ConfigError, match="graph_feat_dim: 9"):
        MEGNet(2, 8, 5, 1, [8], [8], 1, 1)
    model = TensorNet(element_types=["H"], units=8, nblocks=1)
    with pytest.raises(DataError, match="not in the model's element_types"):
        model(to_graph(random_crystal(3), GRAPH_CUTOFF))


def test_upstream_m3gnet_arguments_and_widths():
    from matsciml.common.config import instantiate

    kwargs = instantiate(
        {"element_types": {"class_path": "matsciml.datasets.utils.element_types"}, "return_all_layer_output": True}
    )
    assert (
        kwargs["element_types"][0] == "H"
        and kwargs["element_types"][78] == "Au"
        and len(kwargs["element_types"]) == 118
    )
    assert M3GNet(**kwargs).embedding_dim == 64  # upstream's output_kwargs.input_dim
    assert TensorNet(num_rbf=32, max_n=3, max_l=3).embedding_dim == 64
    megnet = MEGNet(2, 128, 9, 4, [256, 256, 128], [128, 128, 128], 5, 4, output_hiddens=[64, 64], encoder_only=True)
    assert megnet.embedding_dim == 640
