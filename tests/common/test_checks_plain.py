"""The shared argument check and the plain-data converter."""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError
from matsciml.common.plain import to_plain


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "3"])
def test_check_int_refuses_with_owner_and_name(bad):
    with pytest.raises(ConfigError, match=rf"^Owner: n={bad!r} must be an integer >= 1 \(steps\)$"):
        check_int(bad, "n", "Owner", hint=" (steps)")


def test_check_int_accepts_and_optional():
    assert check_int(3, "n", "Owner") == 3
    assert check_int(0, "n", "Owner", minimum=0) == 0
    assert check_int(None, "n", "Owner", optional=True) is None
    with pytest.raises(ConfigError, match="or null"):
        check_int(0, "n", "Owner", optional=True)


def test_to_plain_gives_data_yaml_can_dump():
    class Colour(enum.IntEnum):
        RED = 1

    value = {
        1: (Colour.RED, Path("/a/b"), torch.tensor(2.5), torch.ones(2), np.float32(0.5)),
        "cls": torch.nn.Linear,
        "set": {3},
        "other": object,
    }
    plain = to_plain(value, other=str)
    assert plain == {
        "1": [1, "/a/b", 2.5, [1.0, 1.0], 0.5],
        "cls": "torch.nn.modules.linear.Linear",
        "set": [3],
        "other": "builtins.object",
    }
    assert type(plain["1"][0]) is int
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert to_plain(slice(1), other=repr) == "slice(None, 1, None)"
