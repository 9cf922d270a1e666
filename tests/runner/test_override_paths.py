"""``-c`` overrides whose value holds dots (file paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from matsciml.common.errors import ConfigError
from matsciml.runner.configs import ConfigFile, apply_override


def _configs() -> dict[str, ConfigFile]:
    return {
        "trainer": ConfigFile("trainer", Path("trainer.yaml"), {"generic": {"max_epochs": 3}}),
        "model": ConfigFile("m", Path("m.yaml"), {"lr": 0.001}),
        "dataset": ConfigFile("d", Path("d.yaml"), {"experiment": {"train_path": "", "batch_size": 4}}),
    }


def test_equals_form_keeps_dots_in_the_value():
    configs = _configs()
    result = apply_override("dataset.experiment.train_path=../data/my.set.extxyz", configs)
    assert result == ("dataset", ["experiment", "train_path"], "../data/my.set.extxyz")
    assert configs["dataset"].data["experiment"]["train_path"] == "../data/my.set.extxyz"


def test_dotted_form_with_a_relative_path_value():
    configs = _configs()
    apply_override("dataset.experiment.train_path.../data/train.extxyz", configs)
    assert configs["dataset"].data["experiment"]["train_path"] == "../data/train.extxyz"


def test_equals_form_types_the_value():
    configs = _configs()
    assert apply_override("dataset.experiment.batch_size=16", configs)[2] == 16


def test_equals_form_rejects_empty_keys():
    with pytest.raises(ConfigError, match="empty key"):
        apply_override("dataset.experiment..x=1", _configs())
