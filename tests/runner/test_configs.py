"""Config layer of the runner: loading by stem, ``-c`` overrides, experiment forms, error messages.

Nothing here trains; the data-dependent checks use a 40-structure devset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import write_dedented

from matsciml.common.errors import ConfigError
from matsciml.runner import build
from matsciml.runner.configs import (
    ConfigFile,
    apply_override,
    default_config_path,
    load_registry,
    load_trainer_config,
    merge_sections,
    parse_experiment,
    parse_value,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "experiments" / "configs"


def cfg(name: str, data: dict, path: str | None = None) -> ConfigFile:
    return ConfigFile(name, Path(path or f"{name}.yaml"), data)


# ----------------------------------------------------------------------------- loading


def test_registry_by_file_stem_recursive(tmp_path):
    write_dedented(tmp_path / "models" / "egnn_dgl.yaml", "lr: 0.1\n")
    write_dedented(tmp_path / "models" / "sub" / "e3nn.yaml", "lr: 0.2\n")
    write_dedented(tmp_path / "models" / "notes.txt", "not yaml")
    reg = load_registry(tmp_path / "models", "model")
    assert sorted(reg) == ["e3nn", "egnn_dgl"]
    assert reg["e3nn"].data == {"lr": 0.2}
    assert reg["e3nn"].path == tmp_path / "models" / "sub" / "e3nn.yaml"
    single = load_registry(tmp_path / "models" / "egnn_dgl.yaml", "model")
    assert list(single) == ["egnn_dgl"]


def test_registry_duplicate_stem_and_bad_yaml(tmp_path):
    write_dedented(tmp_path / "a" / "x.yaml", "lr: 1\n")
    write_dedented(tmp_path / "a" / "b" / "x.yaml", "lr: 2\n")
    with pytest.raises(ConfigError, match="two model configs are named 'x'"):
        load_registry(tmp_path / "a", "model")
    bad = write_dedented(tmp_path / "bad" / "y.yaml", "lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_registry(bad, "model")
    assert str(bad) in str(err.value) and "not valid YAML" in str(err.value) and "line" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_registry(tmp_path / "missing", "model")


def test_trainer_folder_rules(tmp_path):
    write_dedented(tmp_path / "one" / "mine.yaml", "generic: {max_epochs: 1}\n")
    assert load_trainer_config(tmp_path / "one").name == "mine"
    write_dedented(tmp_path / "two" / "trainer.yaml", "generic: {max_epochs: 2}\n")
    write_dedented(tmp_path / "two" / "other.yaml", "generic: {max_epochs: 3}\n")
    assert load_trainer_config(tmp_path / "two").data["generic"]["max_epochs"] == 2
    write_dedented(tmp_path / "three" / "a.yaml", "{}\n")
    write_dedented(tmp_path / "three" / "b.yaml", "{}\n")
    with pytest.raises(ConfigError, match="several configs"):
        load_trainer_config(tmp_path / "three")


def test_default_config_path_prefers_cwd(tmp_path):
    assert default_config_path("models", cwd=tmp_path) == REPO / "experiments" / "configs" / "models"
    (tmp_path / "experiments" / "configs" / "models").mkdir(parents=True)
    assert default_config_path("models", cwd=tmp_path) == tmp_path / "experiments" / "configs" / "models"


def test_merge_sections():
    file = cfg("t", {"generic": {"max_epochs": 10, "min_epochs": 1}, "debug": {"max_epochs": 2}})
    assert merge_sections(file, "debug") == {"max_epochs": 2, "min_epochs": 1}
    assert merge_sections(file, "experiment") == {"max_epochs": 10, "min_epochs": 1}


# ----------------------------------------------------------------------------- -c overrides


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16", 16), ("0.001", 0.001), ("1e-3", 1e-3), ("true", True), ("null", None), ("gpu", "gpu")],
)
def test_parse_value(text, expected):
    assert parse_value(text) == expected
    assert type(parse_value(text)) is type(expected)


def test_overrides_follow_existing_keys():
    configs = {
        "trainer": cfg("trainer", {"generic": {"max_epochs": 100}, "callbacks": [{"class_path": "x"}]}),
        "model": cfg("m", {"lr": 0.0001, "encoder_kwargs": {"cutoff": 5.0}}),
        "dataset": cfg("d", {"debug": {"batch_size": 4}}),
    }
    assert apply_override("dataset.debug.batch_size.16", configs) == ("dataset", ["debug", "batch_size"], 16)
    assert apply_override("trainer.generic.max_epochs.3", configs)[2] == 3
    assert apply_override("model.lr.0.001", configs)[2] == pytest.approx(0.001)
    assert apply_override("model.encoder_kwargs.cutoff.4.5", configs)[2] == pytest.approx(4.5)
    # new keys: the last word is the value, except a trailing number with a dot
    assert apply_override("dataset.debug.num_workers.2", configs)[1:] == (["debug", "num_workers"], 2)
    assert apply_override("model.weight_decay.0.01", configs)[1:] == (["weight_decay"], 0.01)
    assert apply_override("dataset.experiment.train_path./data/x", configs)[1:] == (
        ["experiment", "train_path"],
        "/data/x",
    )
    assert configs["dataset"].data["debug"] == {"batch_size": 16, "num_workers": 2}
    assert configs["model"].data["lr"] == pytest.approx(0.001)
    assert configs["trainer"].data["generic"]["max_epochs"] == 3


def test_override_errors():
    configs = {
        "trainer": cfg("trainer", {"callbacks": [{"class_path": "x"}], "generic": {"max_epochs": 1}}),
        "model": cfg("m", {}),
        "dataset": cfg("d", {}),
    }
    with pytest.raises(ConfigError) as err:
        apply_override("trainr.generic.max_epochs.3", configs)
    assert "did you mean 'trainer'" in str(err.value)
    with pytest.raises(ConfigError, match="not lists such as callbacks"):
        apply_override("trainer.callbacks.patience.3", configs)
    with pytest.raises(ConfigError, match="is a section"):
        apply_override("trainer.generic.3", configs)
    with pytest.raises(ConfigError, match="expected <config>"):
        apply_override("model.3", configs)


# ----------------------------------------------------------------------------- experiment config


def test_experiment_forms_new_and_old():
    models = {"egnn": cfg("egnn", {})}
    datasets = {"devset": cfg("devset", {})}
    new = parse_experiment(
        cfg("e", {"model": "egnn", "dataset": {"devset": [{"task": "ScalarRegressionTask", "targets": ["energy"]}]}}),
        models,
        datasets,
    )
    assert (new.model, new.dataset, new.task.task, new.task.targets) == (
        "egnn",
        "devset",
        "ScalarRegressionTask",
        ["energy"],
    )
    for old, cls in [
        ("scalar_regression", "ScalarRegressionTask"),
        ("binary_classification", "BinaryClassificationTask"),
        ("force_regression", "ForceRegressionTask"),
    ]:
        spec = parse_experiment(cfg("e", {"model": "egnn", "dataset": {"devset": {old: ["energy"]}}}), models, datasets)
        assert spec.task.task == cls and spec.task.targets == ["energy"]


def _exp_error(data: dict, **registries) -> str:
    models = registries.get("models", {"egnn_dgl": cfg("egnn_dgl", {}), "e3nn": cfg("e3nn", {})})
    datasets = registries.get("datasets", {"devset": cfg("devset", {}), "oqmd": cfg("oqmd", {})})
    with pytest.raises(ConfigError) as err:
        parse_experiment(cfg("exp", data, "cfgs/exp.yaml"), models, datasets)
    message = str(err.value)
    assert "\n" not in message
    assert "cfgs/exp.yaml" in message
    return message


def test_experiment_errors_name_file_key_and_suggestion():
    task = [{"task": "ScalarRegressionTask", "targets": ["energy"]}]
    msg = _exp_error({"model": "egnn_dlg", "dataset": {"devset": task}})
    assert "model" in msg and "did you mean 'egnn_dgl'" in msg
    msg = _exp_error({"model": "e3nn", "dataset": {"devst": task}})
    assert "dataset.devst" in msg and "did you mean 'devset'" in msg
    msg = _exp_error({"model": "e3nn", "dataset": {"devset": [{"task": "ScalarRegresionTask", "targets": ["e"]}]}})
    assert "dataset.devset[0].task" in msg and "did you mean 'ScalarRegressionTask'" in msg
    msg = _exp_error({"model": "e3nn", "dataset": {"devset": {"scalar_regresion": ["e"]}}})
    assert "dataset.devset.scalar_regresion" in msg and "'scalar_regression'" in msg
    msg = _exp_error({"model": "e3nn", "dataset": {"devset": task}, "load_weight": {}})
    assert "load_weight" in msg and "did you mean 'load_weights'" in msg
    msg = _exp_error({"model": "e3nn", "dataset": {"devset": [{"task": "ScalarRegressionTask", "target": ["e"]}]}})
    assert "dataset.devset[0].target" in msg and "did you mean 'targets'" in msg


def test_multi_task_specs_are_parsed_in_file_order():
    two_tasks = [
        {"task": "ScalarRegressionTask", "targets": ["energy"]},
        {"task": "BinaryClassificationTask", "targets": ["stable"]},
    ]
    one = [{"task": "ScalarRegressionTask", "targets": ["energy"]}]
    spec = parse_experiment(
        cfg("exp", {"model": "e3nn", "dataset": {"devset": two_tasks, "oqmd": one}}, "cfgs/exp.yaml"),
        {"e3nn": cfg("e3nn", {})},
        {"devset": cfg("devset", {}), "oqmd": cfg("oqmd", {})},
    )
    assert spec.is_multitask and spec.dataset == "devset" and spec.task.task == "ScalarRegressionTask"
    assert [(t.task, t.targets) for t in spec.tasks["devset"]] == [
        ("ScalarRegressionTask", ["energy"]),
        ("BinaryClassificationTask", ["stable"]),
    ]
    assert [t.task for t in spec.tasks["oqmd"]] == ["ScalarRegressionTask"]


def test_load_weights_spec_checks():
    base = {"model": "e3nn", "dataset": {"devset": [{"task": "ScalarRegressionTask", "targets": ["e"]}]}}
    msg = _exp_error({**base, "load_weights": {"method": "pretrain", "type": "local", "path": "x.ckpt"}})
    assert "load_weights.method" in msg and "did you mean 'pretrained'" in msg
    msg = _exp_error({**base, "load_weights": {"method": "checkpoint", "type": "local"}})
    assert "load_weights.path" in msg


# ----------------------------------------------------------------------------- trainer config


def test_trainer_unknown_argument_names_file_section_and_closest():
    file = cfg("trainer", {"generic": {"max_epoch": 3}}, "cfg/trainer.yaml")
    with pytest.raises(ConfigError) as err:
        build.check_trainer_config(file)
    msg = str(err.value)
    assert "cfg/trainer.yaml" in msg and "generic.max_epoch" in msg and "did you mean 'max_epochs'" in msg
    with pytest.raises(ConfigError, match="put it under 'generic'"):
        build.check_trainer_config(cfg("trainer", {"max_epochs": 3}))
    with pytest.raises(ConfigError, match="did you mean 'callbacks'"):
        build.check_trainer_config(cfg("trainer", {"callback": []}))


def test_callbacks_and_loggers_defaults_and_prefix_mapping(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    file = cfg(
        "trainer",
        {
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.EarlyStopping", "init_args": {"monitor": "val_loss"}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"monitor": "val_loss"}},
            ],
            "loggers": [{"class_path": "pytorch_lightning.loggers.CSVLogger"}],
        },
    )
    callbacks = build.build_callbacks(file, tmp_path)
    assert isinstance(callbacks[0], EarlyStopping) and isinstance(callbacks[1], ModelCheckpoint)
    assert Path(callbacks[1].dirpath) == tmp_path / "checkpoints"
    assert len(callbacks) == 2
    (logger,) = build.build_loggers(file, tmp_path)
    assert isinstance(logger, CSVLogger) and Path(logger.log_dir) == tmp_path
    # nothing configured: a ModelCheckpoint (save_last) and a CSVLogger are added
    (ckpt,) = build.build_callbacks(cfg("t", {}), tmp_path)
    assert isinstance(ckpt, ModelCheckpoint) and ckpt.save_last and Path(ckpt.dirpath) == tmp_path / "checkpoints"
    (csv,) = build.build_loggers(cfg("t", {}), tmp_path)
    assert Path(csv.log_dir) == tmp_path


def test_callback_spec_errors():
    bad_path = cfg("trainer", {"callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStoping"}]}, "t.yaml")
    with pytest.raises(ConfigError) as err:
        build.build_callbacks(bad_path, "/tmp")
    assert "t.yaml: callbacks[0]" in str(err.value) and "did you mean 'EarlyStopping'" in str(err.value)
    bad_arg = cfg(
        "trainer",
        {"callbacks": [{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"monitr": "x"}}]},
        "t.yaml",
    )
    with pytest.raises(ConfigError) as err:
        build.build_callbacks(bad_arg, "/tmp")
    assert "t.yaml: callbacks[0]" in str(err.value) and "did you mean 'monitor'" in str(err.value)


def test_trainer_refusal_becomes_config_error(tmp_path):
    file = cfg("trainer", {"experiment": {"accelerator": "tpu"}}, "t.yaml")
    with pytest.raises(ConfigError) as err:
        build.build_trainer(file, "experiment", tmp_path)
    assert "t.yaml" in str(err.value) and "generic + experiment" in str(err.value)


def test_trainer_gets_the_null_profiler_unless_the_config_names_one(tmp_path):
    from lightning.pytorch.profilers import PassThroughProfiler, SimpleProfiler

    from matsciml.lightning.profilers import NullProfiler

    quiet = {"accelerator": "cpu", "enable_progress_bar": False}
    trainer = build.build_trainer(cfg("trainer", {"experiment": quiet}, "t.yaml"), "experiment", tmp_path)
    assert isinstance(trainer.profiler, NullProfiler) and isinstance(trainer.profiler, PassThroughProfiler)
    with trainer.profiler.profile("a") as first, trainer.profiler.profile("b") as second:
        assert first is None and second is None  # records nothing, as the pass-through profiler
    assert trainer.profiler.profile("a") is trainer.profiler.profile("b")
    named = cfg("trainer", {"experiment": {**quiet, "profiler": "simple"}}, "t.yaml")
    assert isinstance(build.build_trainer(named, "experiment", tmp_path).profiler, SimpleProfiler)


# ----------------------------------------------------------------------------- model and dataset configs


def _model(**extra) -> ConfigFile:
    data = {
        "encoder_class": {"class_path": "matsciml.models.equivariant.E3NNEncoder"},
        "encoder_kwargs": {"num_layers": 1, "embedding_dim": 8},
        "lr": 0.001,
    }
    data.update(extra)
    return cfg("tiny", data, "models/tiny.yaml")


def test_task_arguments_merge_and_checks():
    from matsciml.models.base import ScalarRegressionTask

    dataset = cfg(
        "devset",
        {
            "dataset": "EMTAlloyDataset",
            "debug": {"batch_size": 4, "normalize_kwargs": {"energy_std": 2.0}},
            "task_args": {"normalize_kwargs": {"energy_mean": 1.0}, "task_loss_scaling": {"energy": 2.0}},
        },
        "datasets/devset.yaml",
    )
    kwargs = build.task_arguments(ScalarRegressionTask, _model(), dataset, "debug", ["energy"])
    assert kwargs["task_keys"] == ["energy"]
    assert kwargs["normalize_kwargs"] == {"energy_std": 2.0}  # the run-type section wins over task_args
    assert kwargs["task_loss_scaling"] == {"energy": 2.0}
    assert "transforms" not in kwargs
    with pytest.raises(ConfigError) as err:
        build.task_arguments(ScalarRegressionTask, _model(lr_rate=1), dataset, "debug", ["energy"])
    assert "models/tiny.yaml" in str(err.value) and "lr_rate" in str(err.value)
    bad_enc = _model(encoder_kwargs={"num_layer": 1})
    with pytest.raises(ConfigError) as err:
        build.task_arguments(ScalarRegressionTask, bad_enc, dataset, "debug", ["energy"])
    assert "models/tiny.yaml: encoder_kwargs" in str(err.value) and "did you mean 'num_layers'" in str(err.value)
    bad_cls = _model(encoder_class={"class_path": "matsciml.models.equivariant.E3NNEncodr"})
    with pytest.raises(ConfigError) as err:
        build.task_arguments(ScalarRegressionTask, bad_cls, dataset, "debug", ["energy"])
    assert "models/tiny.yaml: encoder_class" in str(err.value) and "did you mean 'E3NNEncoder'" in str(err.value)
    bad_args = cfg("devset", {**dataset.data, "task_args": {"normalise_kwargs": {}}}, "datasets/devset.yaml")
    with pytest.raises(ConfigError) as err:
        build.task_arguments(ScalarRegressionTask, _model(), bad_args, "debug", ["energy"])
    assert "datasets/devset.yaml: task_args.normalise_kwargs" in str(err.value)
    assert "did you mean 'normalize_kwargs'" in str(err.value)


def test_datamodule_config_errors():
    model = _model()
    base = {"dataset": "EMTAlloyDataset", "debug": {"batch_size": 4}, "target_keys": ["energy"]}
    with pytest.raises(ConfigError) as err:
        build.build_datamodule(cfg("d", {**base, "dataset": "EMTAloyDataset"}, "ds/d.yaml"), model, "debug", ["energy"])
    assert "ds/d.yaml: dataset" in str(err.value) and "did you mean 'EMTAlloyDataset'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build.build_datamodule(cfg("d", {**base, "debug": {"batch_sise": 4}}, "ds/d.yaml"), model, "debug", ["energy"])
    assert "ds/d.yaml: debug.batch_sise" in str(err.value) and "did you mean 'batch_size'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build.build_datamodule(cfg("d", {**base, "target_key": []}, "ds/d.yaml"), model, "debug", ["energy"])
    assert "ds/d.yaml: target_key" in str(err.value) and "did you mean 'target_keys'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build.build_datamodule(
            cfg("d", {**base, "experiment": {"train_path": ""}}, "ds/d.yaml"), model, "experiment", ["e"]
        )
    assert "ds/d.yaml: experiment.train_path" in str(err.value) and "--debug" in str(err.value)
    bad_tf = _model(
        transforms=[
            {"class_path": "matsciml.datasets.transforms.PeriodicPropertiesTransform", "init_args": {"cutoff": 4.0}}
        ]
    )
    with pytest.raises(ConfigError) as err:
        build.build_datamodule(cfg("d", base, "ds/d.yaml"), bad_tf, "debug", ["energy"])
    assert "models/tiny.yaml: transforms[0]" in str(err.value) and "did you mean 'cutoff_radius'" in str(err.value)


# ----------------------------------------------------------------------------- shipped configs


def test_shipped_configs_load_and_parse():
    models = load_registry(SHIPPED / "models", "model")
    datasets = load_registry(SHIPPED / "datasets", "dataset")
    assert {"egnn", "egnn_dgl", "e3nn", "e3nn_small"} <= set(models)
    assert {"devset", "extxyz", "oqmd_devset", "lips_devset"} <= set(datasets)
    assert set(datasets["devset"].data["target_keys"]) >= {
        "energy",
        "energy_per_atom",
        "forces",
        "stable",
        "mixing_energy_per_atom",
    }
    grep = [
        t["init_args"]["backend"] for t in models["egnn_dgl"].data["transforms"] if "backend" in t.get("init_args", {})
    ]
    assert grep == ["dgl"]
    for exp in sorted((SHIPPED / "experiments").glob("*.yaml")):
        spec = parse_experiment(ConfigFile(exp.stem, exp, yaml.safe_load(exp.read_text())), models, datasets)
        assert spec.task.targets
    for trainer in sorted((SHIPPED / "trainer").glob("*.yaml")):
        build.check_trainer_config(load_trainer_config(trainer))
    assert load_trainer_config(SHIPPED / "trainer").name == "trainer"
