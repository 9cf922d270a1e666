"""The runner end to end on a 40-structure devset with a tiny EGNN: run folder, summary, load_weights, CLI errors."""

from __future__ import annotations

import csv
import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cli_error, tiny_egnn_yaml, write_dedented

from matsciml.common.errors import ConfigError
from matsciml.runner.cli import main
from matsciml.runner.experiment import prepare_experiment

N_STRUCTURES = 40

TINY_MODEL = """\
encoder_class: {class_path: matsciml.models.egnn.PLEGNNBackbone}
encoder_kwargs: ENCODER_KWARGS
output_kwargs: {hidden_dim: 8, num_hidden: 1}
lr: 0.01
transforms:
  - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
    init_args: {cutoff_radius: 3.3, adaptive_cutoff: true}
  - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
    init_args: {backend: BACKEND}
""".replace("ENCODER_KWARGS", tiny_egnn_yaml(readout="mean", node_projection_hidden_dim="WIDTH"))


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    """A config tree: trainer.yaml, models/{tiny,tiny_dgl,wide}.yaml, datasets/small.yaml, experiments."""
    root = tmp_path_factory.mktemp("configs")
    write_dedented(root / "models" / "tiny.yaml", TINY_MODEL.replace("BACKEND", "pyg").replace("WIDTH", "8"))
    write_dedented(root / "models" / "tiny_dgl.yaml", TINY_MODEL.replace("BACKEND", "dgl").replace("WIDTH", "8"))
    write_dedented(root / "models" / "wide.yaml", TINY_MODEL.replace("BACKEND", "pyg").replace("WIDTH", "16"))
    write_dedented(
        root / "datasets" / "small.yaml",
        f"""\
        dataset: EMTAlloyDataset
        debug:
          batch_size: 8
          val_split: 0.25
          dset_kwargs: {{n: {N_STRUCTURES}}}
        target_keys: [energy, energy_per_atom, forces, stable, band_gap]
        task_args:
          normalize_kwargs: {{energy_per_atom_mean: 0.03, energy_per_atom_std: 0.05}}
        """,
    )
    write_dedented(
        root / "trainer.yaml",
        """\
        generic: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
        debug: {accelerator: cpu, limit_train_batches: 3, limit_val_batches: 2}
        callbacks:
          - class_path: pytorch_lightning.callbacks.ModelCheckpoint
            init_args: {monitor: val_loss, save_last: true}
        loggers:
          - class_path: lightning.pytorch.loggers.CSVLogger
        """,
    )
    experiment(root, "energy", model="tiny", targets=["energy_per_atom"])
    return root


def experiment(root: Path, name: str, model: str = "tiny", targets=("energy_per_atom",), extra: str = "") -> Path:
    body = f"model: {model}\ndataset:\n  small:\n    - task: ScalarRegressionTask\n      targets: {list(targets)}\nseed: 0\n"
    return write_dedented(root / "experiments" / f"{name}.yaml", body + textwrap.dedent(extra))


def argv(root: Path, exp: Path, run_dir: Path, *more: str) -> list[str]:
    return [
        "-e", str(exp), "-t", str(root / "trainer.yaml"), "-m", str(root / "models"), "-d", str(root / "datasets"),
        "--debug", "--run_dir", str(run_dir), *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(configs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "energy"
    result = main(argv(configs, configs / "experiments" / "energy.yaml", run_dir, "-c", "model.lr.0.005"))
    return result


# ----------------------------------------------------------------------------- a full (tiny) run


def test_run_folder_layout(trained):
    run = trained.run_dir
    assert (run / "config.yaml").is_file() and trained.config_path == run / "config.yaml"
    assert trained.metrics_csv == run / "metrics.csv" and (run / "metrics.csv").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(trained.best_checkpoint).parent == run / "checkpoints"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert set(config) == {"experiment", "trainer", "model", "dataset", "run"}
    assert config["model"]["lr"] == pytest.approx(0.005)  # the -c override is what ran
    assert trained.task.lr == pytest.approx(0.005)
    assert config["run"]["run_type"] == "debug" and config["run"]["targets"] == ["energy_per_atom"]
    assert config["run"]["cli_args"] == ["model.lr.0.005"]
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert any(row.get("val_energy_per_atom_mae") for row in rows)


def test_summary_numbers_match_independent_oracles(trained):
    """Mean-predictor MAE from ASE's reading of the file; model MAE = the task's own logged val MAE."""
    import ase.io

    (summary,) = trained.targets
    dm = trained.datamodule
    base = dm.datasets["train"].dataset
    frames = ase.io.read(base.path, ":")
    y = np.array([a.info["energy_per_atom"] for a in frames])
    train_idx, val_idx = dm.datasets["train"].indices, dm.datasets["val"].indices
    expected = np.abs(y[val_idx] - y[train_idx].mean()).mean()
    assert summary.mean_mae == pytest.approx(expected, rel=1e-6)
    assert summary.count == len(val_idx)
    with open(trained.metrics_csv) as fh:
        logged = [float(r["val_energy_per_atom_mae"]) for r in csv.DictReader(fh) if r.get("val_energy_per_atom_mae")]
    assert summary.model_mae == pytest.approx(logged[-1], rel=1e-4)
    assert summary.ratio == pytest.approx(summary.mean_mae / summary.model_mae)
    assert "mean predictor" in trained.summary_text and str(trained.run_dir) in trained.summary_text


def test_ema_run_summary_gives_ema_and_raw_mae(configs, tmp_path):
    """With the EMA callback the summary gives the EMA weights' MAE and the raw weights' MAE, each
    equal to a hand-computed MAE of the checkpoint's EMA state_dict and of its saved raw weights."""
    from matsciml.runner.weights import read_raw_weights

    trainer = write_dedented(
        tmp_path / "trainer_ema.yaml",
        """\
        generic: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1}
        debug: {accelerator: cpu, limit_train_batches: 3}
        callbacks:
          - class_path: matsciml.lightning.callbacks.ExponentialMovingAverageCallback
            init_args: {decay: 0.9, evaluate_raw: true}
          - class_path: lightning.pytorch.callbacks.ModelCheckpoint
            init_args: {monitor: val_loss}
        loggers:
          - class_path: lightning.pytorch.loggers.CSVLogger
        """,
    )
    args = argv(configs, configs / "experiments" / "energy.yaml", tmp_path / "run")
    args[args.index("-t") + 1] = str(trainer)
    result = main(args)
    (summary,) = result.targets
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    raw = read_raw_weights(result.best_checkpoint)
    assert raw is not None and set(raw) <= set(ckpt["state_dict"])
    assert any(not torch.equal(raw[k], ckpt["state_dict"][k]) for k in raw)  # EMA and raw weights differ
    task, loader = result.task, result.datamodule.eval_dataloader("val")

    def hand_mae(state: dict) -> float:
        task.load_state_dict({**ckpt["state_dict"], **state})
        task.eval()
        errors = []
        with torch.no_grad():
            for batch in loader:
                pred = task(batch)["energy_per_atom"].reshape(-1).double()
                errors.append((pred - batch["targets"]["energy_per_atom"].reshape(-1).double()).abs())
        return float(torch.cat(errors).mean())

    # the task is left holding the EMA weights after the raw ones were evaluated
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in task.state_dict().items())
    assert summary.model_mae == pytest.approx(hand_mae({}), rel=1e-6)
    assert summary.raw_mae == pytest.approx(hand_mae(raw), rel=1e-6)
    assert summary.raw_mae != pytest.approx(summary.model_mae, rel=1e-6)
    line = next(line for line in result.summary_text.splitlines() if "energy_per_atom" in line)
    assert f"EMA weights {summary.model_mae:.6g}" in line and f"raw weights {summary.raw_mae:.6g}" in line


def test_summary_without_ema_has_no_raw_mae(trained):
    from matsciml.runner.weights import read_raw_weights

    assert read_raw_weights(trained.best_checkpoint) is None
    assert trained.targets[0].raw_mae is None and "raw weights" not in trained.summary_text


def test_load_weights_checkpoint_and_pretrained(configs, trained, tmp_path):
    ckpt = trained.run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    whole = experiment(configs, "resume", extra=f"load_weights: {{method: checkpoint, type: local, path: {ckpt}}}\n")
    task = _prepare(configs, whole, tmp_path / "a").task
    state = task.state_dict()
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    # encoder only: a task on another target keeps the checkpoint's encoder and fresh heads
    enc = experiment(
        configs,
        "finetune",
        targets=["energy"],
        extra=f"load_weights: {{method: pretrained, type: local, path: {ckpt}}}\n",
    )
    task = _prepare(configs, enc, tmp_path / "b").task
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    assert encoder_keys
    for key in encoder_keys:
        assert torch.equal(task.state_dict()[key], saved[key]), key
    head = "output_heads.energy_per_atom."
    assert not any(k.startswith(head) for k in task.state_dict())
    assert any(k.startswith("output_heads.energy.") for k in task.state_dict())


def test_load_weights_mismatch_and_wandb(configs, trained, tmp_path):
    ckpt = trained.run_dir / "checkpoints" / "last.ckpt"
    wide = experiment(configs, "wide", model="wide", extra=f"load_weights: {{method: checkpoint, path: {ckpt}}}\n")
    with pytest.raises(ConfigError) as err:
        _prepare(configs, wide, tmp_path / "c")
    assert "load_weights" in str(err.value) and "does not match" in str(err.value) and "shape" in str(err.value)
    assert not (tmp_path / "c").exists()  # a failed configuration leaves no run folder
    wandb = experiment(configs, "wandb", extra="load_weights: {method: checkpoint, type: wandb, path: me/run:v1}\n")
    with pytest.raises(ConfigError, match="not available offline; download the artifact"):
        _prepare(configs, wandb, tmp_path / "d")


def _prepare(root: Path, exp: Path, run_dir: Path):
    return prepare_experiment(
        exp, root / "trainer.yaml", root / "models", root / "datasets", debug=True, run_dir=run_dir
    )


@pytest.mark.skipif(importlib.util.find_spec("dgl") is not None, reason="DGL is installed")
def test_backend_dgl_runs_without_dgl(configs, tmp_path):
    exp = experiment(configs, "dgl", model="tiny_dgl")
    result = main(argv(configs, exp, tmp_path / "run", "-c", "trainer.debug.limit_train_batches.1"))
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    batch = next(iter(result.datamodule.val_dataloader()))
    from torch_geometric.data import Batch

    assert isinstance(batch["graph"], Batch)


# ----------------------------------------------------------------------------- errors from the command line


def test_cli_unknown_model_stem(configs, capsys, tmp_path):
    exp = write_dedented(
        configs / "experiments" / "typo.yaml",
        "model: tiny_dlg\ndataset:\n  small:\n    - task: ScalarRegressionTask\n      targets: [energy]\n",
    )
    err = cli_error(capsys, main, argv(configs, exp, tmp_path / "r"))
    assert "typo.yaml: model" in err and "did you mean 'tiny_dgl'" in err
    assert not (tmp_path / "r").exists()


def test_cli_target_not_listed_in_dataset_config(configs, capsys, tmp_path):
    exp = experiment(configs, "notlisted", targets=["energy_per_atm"])
    err = cli_error(capsys, main, argv(configs, exp, tmp_path / "r"))
    assert "notlisted.yaml: dataset.small[0].targets" in err and "small.yaml" in err
    assert "did you mean 'energy_per_atom'" in err


def test_cli_target_missing_from_data(configs, capsys, tmp_path):
    exp = experiment(configs, "nodata", targets=["band_gap"])
    err = cli_error(capsys, main, argv(configs, exp, tmp_path / "r"))
    assert "small.yaml: target_keys" in err and "'band_gap'" in err and "no record has this target" in err


def test_cli_unknown_monitor(configs, capsys, tmp_path):
    trainer = write_dedented(
        tmp_path / "t.yaml",
        """\
        callbacks:
          - class_path: lightning.pytorch.callbacks.EarlyStopping
            init_args: {monitor: val_energy_per_atom_mea}
        """,
    )
    args = argv(configs, configs / "experiments" / "energy.yaml", tmp_path / "r")
    args[args.index("-t") + 1] = str(trainer)
    err = cli_error(capsys, main, args)
    assert "t.yaml: callbacks[0].init_args.monitor" in err and "did you mean 'val_energy_per_atom_mae'" in err


def test_cli_bad_override_and_options(configs, capsys, tmp_path):
    args = argv(configs, configs / "experiments" / "energy.yaml", tmp_path / "r", "-c", "trainer.callbacks.x.1")
    err = cli_error(capsys, main, args)
    assert "callbacks" in err and "not lists" in err
    assert main(["-o", "-m", str(configs / "models"), "-d", str(configs / "datasets")]) == 0
    out = capsys.readouterr().out
    assert "tiny_dgl" in out and "small" in out and "energy_per_atom" in out and "ScalarRegressionTask" in out


# ----------------------------------------------------------------------------- shipped experiments

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO / "tests" / "data"


@pytest.mark.parametrize(
    ("name", "trainer", "data_file"),
    [
        ("devset_energy", "devset_cpu", None),
        ("devset_forces", "devset_cpu", None),
        ("oqmd_band_gap", "trainer", "oqmd_devset.extxyz"),
        ("lips_forces", "trainer", "lips_devset.extxyz"),
    ],
)
def test_shipped_experiments_prepare(name, trainer, data_file, monkeypatch, tmp_path):
    """Every bundled experiment builds (configs, data read and validated, task, trainer) without training."""
    if data_file is not None and not (SHARED_DATA / data_file).is_file():
        pytest.skip(f"{SHARED_DATA / data_file} is absent (tests/data)")
    monkeypatch.chdir(REPO)  # dataset configs give tests/data relative to the repository root
    configs = REPO / "experiments" / "configs"
    prepared = prepare_experiment(
        configs / "experiments" / f"{name}.yaml", configs / "trainer" / f"{trainer}.yaml", run_dir=tmp_path / "run"
    )
    assert prepared.run_type == "experiment"
    datasets = prepared.datamodule.datasets
    assert len(datasets["train"]) > len(datasets["val"]) > 0
    if name == "oqmd_band_gap":  # the record with a NaN band_gap is dropped, not trained on
        assert len(datasets["train"]) + len(datasets["val"]) == 199
    assert prepared.task.task_keys == prepared.experiment.task.targets
