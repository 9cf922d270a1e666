"""Tests of ``build_callbacks``: both YAML styles, short names, order, and every error message."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks.builder import ALIASES, build_callback, build_callbacks, resolve_kind
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks.metadata import MetadataLogger
from matsciml.lightning.callbacks.train_end import ExportOnTrainEnd

WHERE = "trainer.yaml: callbacks"


class Periodic(Callback):
    """Stand-in for a periodic callback: exactly one of the every_n_* arguments."""

    def __init__(self, every_n_epochs=None, every_n_updates=None, every_n_samples=None, name: str = "x") -> None:
        given = [v for v in (every_n_epochs, every_n_updates, every_n_samples) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of every_n_epochs, every_n_updates, every_n_samples")
        self.every = (every_n_epochs, every_n_updates, every_n_samples)
        self.name = name


PERIODIC = f"{Periodic.__module__}.Periodic"


def test_both_styles_in_list_order():
    specs = yaml.safe_load(
        f"""
        - kind: ema
          decay: 0.9
        - class_path: pytorch_lightning.callbacks.EarlyStopping
          init_args: {{monitor: val_loss, patience: 7}}
        - metadata
        - kind: {PERIODIC}
          every_n_updates: 10
          name: plots
        - kind: Model-Checkpoint
          monitor: val_loss
        - class_path: lightning.pytorch.callbacks.LearningRateMonitor
        - kind: export_on_train_end
          method: export
        """
    )
    built = build_callbacks(specs, WHERE)
    kinds = [ExponentialMovingAverageCallback, EarlyStopping, MetadataLogger, Periodic, ModelCheckpoint]
    kinds += [LearningRateMonitor, ExportOnTrainEnd]
    assert [type(cb) for cb in built] == kinds
    assert built[0].decay == 0.9
    assert built[1].patience == 7 and built[1].monitor == "val_loss"
    assert built[3].every == (None, 10, None) and built[3].name == "plots"
    assert built[4].monitor == "val_loss"
    assert built[6].method == "export"
    assert build_callbacks(None) == []
    instance = LearningRateMonitor()
    assert build_callbacks([instance])[0] is instance


def test_short_names_ignore_case_and_separators():
    for name in ("ema", "EMA", "Ema", "exponential_moving_average_callback", "ExponentialMovingAverageCallback"):
        assert resolve_kind(name) is ExponentialMovingAverageCallback
    assert resolve_kind("early-stopping") is EarlyStopping is resolve_kind("EarlyStopping")
    for alias in ALIASES:
        assert issubclass(resolve_kind(alias), Callback)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"kind": "ema", "decy": 0.9}, r"callbacks\[1\]: unknown key 'decy' for kind 'ema' .* did you mean 'decay'"),
        ({"kind": "emma"}, r"callbacks\[1\]: unknown callback kind 'emma'; did you mean 'ema'"),
        ({"kind": "ema", "every_n_epochs": 0}, r"callbacks\[1\]: .*every_n_epochs"),
        ({"kind": "ema", "use_dynamic_decay": True, "warmup": "none"}, r"callbacks\[1\]: give 'use_dynamic_decay' or"),
        (
            {"kind": PERIODIC, "every_n_epochs": 1, "every_n_samples": 64},
            r"callbacks\[1\]: give at most one of .* found every_n_epochs, every_n_samples",
        ),
        ({"kind": PERIODIC, "name": "p"}, r"callbacks\[1\]: Periodic refused its arguments .* exactly one"),
        (  # arguments passed on through **kwargs: the closest name among those of the classes they reach
            {"kind": "BestCheckpoint", "save_topk": 2},
            r"callbacks\[1\]: BestCheckpoint refused its arguments \['save_topk'\]: .* did you mean 'save_top_k'",
        ),
        (
            {
                "kind": "matsciml.lightning.callbacks.data_iterator.PeriodicDataIteratorCallback",
                "dataset": "test",
                "every_n_epoch": 2,
            },
            r"callbacks\[1\]: PeriodicDataIteratorCallback refused .* did you mean 'every_n_epochs'",
        ),
        (
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "monitor": "val_loss"},
            r"callbacks\[1\]: key 'monitor' next to class_path; put constructor arguments under init_args",
        ),
        (
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_arg": {}},
            r"callbacks\[1\]: unknown key 'init_arg' next to class_path; did you mean 'init_args'",
        ),
        (
            {"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitr": "x"}},
            r"'monitr' \(trainer.yaml: callbacks\[1\]\) is not an argument of EarlyStopping; did you mean 'monitor'",
        ),
        (
            {"class_path": "lightning.pytorch.callbacks.EarlyStoping"},
            r"callbacks\[1\]\): lightning.pytorch.callbacks has no 'EarlyStoping'; did you mean 'EarlyStopping'",
        ),
        ({"clas_path": "x"}, r"callbacks\[1\]: a callback entry needs class_path .* did you mean 'class_path'"),
        ({"class_path": "lightning.pytorch.callbacks.EarlyStopping", "kind": "ema"}, r"callbacks\[1\]: give either"),
        ({"kind": "ema", "decay": 2.0}, r"callbacks\[1\]: decay=2.0 must lie in \[0, 1\]"),
        (
            {"kind": "export_on_train_end", "method": "onnx"},
            r"callbacks\[1\]: ExportOnTrainEnd: method='onnx'",
        ),
        ({"class_path": "torch.nn.Identity"}, r"callbacks\[1\]: torch.nn.modules.linear.Identity is not a lightning"),
        (42, r"callbacks\[1\]: expected a mapping with class_path .* or kind"),
    ],
)
def test_errors_name_the_entry_the_key_and_the_closest_name(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_callbacks([{"kind": "ema"}, spec], WHERE)


def test_list_errors():
    with pytest.raises(ConfigError, match="trainer.yaml: callbacks: expected a list of callback entries, got dict"):
        build_callbacks({"kind": "ema"}, WHERE)
    with pytest.raises(ConfigError, match=r"^callbacks\[0\]: unknown callback kind"):
        build_callbacks(["nothing_like_this"])
    assert isinstance(build_callback("lightning.pytorch.callbacks.LearningRateMonitor"), LearningRateMonitor)


def test_class_names_of_the_package_modules_are_short_names():
    stopping = pytest.importorskip("matsciml.lightning.callbacks.stopping")
    built = build_callbacks(
        [
            {"kind": "metric_early_stopping", "monitor": "val_loss", "patience": 4},
            {"kind": "FixedBudgetStopping", "max_epochs": 3},
        ],
        WHERE,
    )
    assert type(built[0]) is stopping.MetricEarlyStopping and built[0].patience == 4
    assert type(built[1]) is stopping.FixedBudgetStopping
