"""Tests of the output heads, the loss builders and the target normaliser."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from matsciml.common.errors import ConfigError
from matsciml.models.heads import OutputHead, build_activation, build_norm
from matsciml.models.losses import build_loss, masked_loss
from matsciml.models.tasks.normalization import TargetNormalizer


def test_head_equals_hand_written_mlp():
    torch.manual_seed(0)
    head = OutputHead(output_dim=2, hidden_dim=5, num_hidden=2, input_dim=3, activation="silu", residual=True)
    x = torch.randn(4, 3)
    blocks = head.blocks
    act = torch.nn.functional.silu
    h = act(x @ blocks[0].linear.weight.T + blocks[0].linear.bias)
    for block in blocks[1:3]:
        h = act(h @ block.linear.weight.T + block.linear.bias) + h  # residual hidden blocks
    expected = h @ blocks[3].linear.weight.T + blocks[3].linear.bias
    torch.testing.assert_close(head(x), expected)


def test_identity_activation_gives_an_affine_head():
    torch.manual_seed(1)
    head = OutputHead(output_dim=1, hidden_dim=6, input_dim=4, activation=None)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    zero = torch.zeros(1, 4)
    torch.testing.assert_close(head(x + y) - head(y), head(x) - head(zero))


@pytest.mark.parametrize(
    "spec",
    ["torch.nn.LayerNorm", "LayerNorm", nn.LayerNorm, {"class_path": "torch.nn.LayerNorm"}, nn.LayerNorm(8)],
)
def test_norm_specs_give_separate_layers(spec):
    head = OutputHead(hidden_dim=8, input_dim=3, num_hidden=2, norm=spec)
    norms = [block.norm for block in head.blocks[:3]]
    assert all(isinstance(n, nn.LayerNorm) and n.normalized_shape == (8,) for n in norms)
    assert len({id(n.weight) for n in norms}) == 3  # not shared
    assert isinstance(head.blocks[3].norm, nn.Identity)  # no norm on the output layer


@pytest.mark.parametrize("spec", ["torch.nn.SiLU", "silu", "SiLU", nn.SiLU, {"class_path": "torch.nn.SiLU"}, nn.SiLU()])
def test_activation_specs(spec):
    assert isinstance(build_activation(spec), nn.SiLU)


def test_lazy_head_infers_input_width():
    head = OutputHead(hidden_dim=4, lazy=True)
    assert head(torch.randn(2, 7)).shape == (2, 1)
    assert head.blocks[0].linear.weight.shape == (4, 7)


def test_head_errors():
    with pytest.raises(ConfigError, match="normalises 16 features but .* 8"):
        OutputHead(
            hidden_dim=8, input_dim=3, norm={"class_path": "torch.nn.LayerNorm", "init_args": {"normalized_shape": 16}}
        )
    with pytest.raises(ConfigError, match="needs input_dim"):
        OutputHead(hidden_dim=8)
    with pytest.raises(ConfigError, match="block_type"):
        OutputHead(hidden_dim=8, input_dim=3, block_type="IrrepOutputBlock")
    with pytest.raises(ConfigError, match="did you mean 'SiLU'"):
        build_activation("SiLUU")
    with pytest.raises(ConfigError, match="hidden_dim"):
        OutputHead(hidden_dim=0, input_dim=3)
    head = OutputHead(hidden_dim=8, input_dim=3)
    with pytest.raises(ValueError, match="width 3"):
        head(torch.randn(2, 5))
    assert isinstance(build_norm(None, 4), nn.Identity)


def test_loss_specs():
    assert isinstance(build_loss(None, nn.MSELoss), nn.MSELoss)
    assert isinstance(build_loss("L1Loss", nn.MSELoss), nn.L1Loss)
    assert isinstance(build_loss(nn.HuberLoss, nn.MSELoss), nn.HuberLoss)
    huber = build_loss({"class_path": "torch.nn.HuberLoss", "init_args": {"delta": 0.1}}, nn.MSELoss)
    assert huber.delta == 0.1
    with pytest.raises(ConfigError, match="did you mean 'L1Loss'"):
        build_loss("L1Los", nn.MSELoss)


def test_masked_loss_skips_missing_targets():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    target = torch.tensor([1.5, float("nan"), 2.0, float("inf")])
    loss, count = masked_loss(nn.MSELoss(), pred, target)
    assert count == 2
    assert loss.item() == pytest.approx(((1.0 - 1.5) ** 2 + (3.0 - 2.0) ** 2) / 2)
    empty, count = masked_loss(nn.MSELoss(), pred, torch.full((4,), float("nan")))
    assert count == 0 and empty.item() == 0.0
    empty.backward()  # still part of the graph
    assert pred.grad is not None


def test_normalizer():
    norm = TargetNormalizer(
        {"energy_mean": -3.0, "energy_std": 2.0, "gap_std": 0.5}, ["energy", "gap"], {"forces": "energy"}
    )
    x = torch.tensor([1.0, -5.0])
    torch.testing.assert_close(norm.norm("energy", x), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(norm.denorm("energy", norm.norm("energy", x)), x)
    assert (norm.mean("gap"), norm.std("gap")) == (0.0, 0.5)
    assert (norm.mean("forces"), norm.std("forces")) == (0.0, 2.0)
    assert (norm.mean("other"), norm.std("other")) == (0.0, 1.0)
    with pytest.raises(ConfigError, match="'<target>_mean' or '<target>_std'"):
        TargetNormalizer({"energy_scale": 2.0}, ["energy"])
    with pytest.raises(ConfigError, match="> 0"):
        TargetNormalizer({"energy_std": 0.0}, ["energy"])
