"""Tests of the train-end pipeline (test, export, archive, metadata) on a short real run.

Oracles: a fresh task loaded from the checkpoint file and tested by a fresh trainer; the
checkpoint files themselves (tensor equality of the archived ``state_dict``); the
config file written before the run; the order the stages saw the shared context in.
"""

from __future__ import annotations

import json
import logging
import tarfile
import warnings

import lightning.pytorch as pl
import pytest
import torch
import yaml
from _callback_toys import ToyTask
from _callback_toys import make_datamodule as toy_datamodule
from _callback_toys import make_trainer as toy_trainer
from helpers import tiny_egnn_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks import train_end
from matsciml.lightning.callbacks._base.train_end import (
    SkipStage,
    TrainEndCallback,
    choose_checkpoint,
    find_checkpoints,
)
from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback
from matsciml.lightning.callbacks.metadata import MetadataLogger
from matsciml.lightning.callbacks.train_end import ArchiveOnTrainEnd, ExportOnTrainEnd
from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.lightning.export import load_exported
from matsciml.models.tasks.scalar import ScalarRegressionTask

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

TARGET = "energy_per_atom"
EGNN_KWARGS = tiny_egnn_kwargs(depth=2, cutoff=6.0)


class Probe(TrainEndCallback):
    """Records what the shared context held when its turn came."""

    def __init__(self, order: int, fail: bool = False) -> None:
        super().__init__()
        self.order = order
        self.fail = fail
        self.seen: dict | None = None

    def run_train_end(self, trainer, pl_module, context):
        self.best_k_models = dict(trainer.checkpoint_callback.best_k_models)
        self.seen = {
            "tested": bool(context.test_metrics),
            "exported": context.export_path is not None,
            "archived": context.archive_path is not None,
            "metadata": context.metadata_path is not None,
        }
        if self.fail:
            raise RuntimeError("probe failure")


def make_datamodule() -> MatSciMLDataModule:
    return MatSciMLDataModule.from_devset(
        dset_kwargs={"n": 24}, val_split=0.25, test_split=0.25, target_keys=[TARGET], batch_size=4
    )


@pytest.fixture(scope="module")
def run(devset_cache, tmp_path_factory):
    """One 3-epoch run with every stage, listed in reverse order, plus EMA and probes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    config = {"model": {"lr": 0.01, "encoder_class": "PLEGNNBackbone"}, "run": {"seed": 7}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    pl.seed_everything(7, verbose=False)
    dm = make_datamodule()
    task = ScalarRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=EGNN_KWARGS,
        task_keys=[TARGET],
        output_kwargs={"hidden_dim": 16},
        lr=0.01,
    )
    # the "best" checkpoint by this monitor is the first epoch's: certainly not the last one (every epoch is
    # kept, so that last.ckpt, which Lightning only writes next to a top-k save, holds the final weights)
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", monitor="epoch", mode="min", save_top_k=-1, save_last=True
    )
    probes = {
        "fails_first": Probe(5, fail=True),
        "after_test": Probe(15),
        "after_archive": Probe(35),
        "last": Probe(50),
    }
    stages = {
        "metadata": MetadataLogger(keys=["model.lr", "trainer.max_epochs"]),
        "archive": ArchiveOnTrainEnd(),
        "export": ExportOnTrainEnd(method="torchscript"),
        "test": train_end.TestOnTrainEnd(),
    }
    callbacks = [*stages.values(), *probes.values(), ExponentialMovingAverageCallback(decay=0.5), checkpoint]
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=CSVLogger(root, name="", version=""),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, datamodule=dm)
    state = {"best": checkpoint.best_model_path, "last": checkpoint.last_model_path}
    yield {
        "root": root,
        "trainer": trainer,
        "task": task,
        "dm": dm,
        "stages": stages,
        "probes": probes,
        "checkpoint": state,
        "warnings": [str(w.message) for w in caught],
    }
    torch.set_num_threads(threads)


def fresh_test(path: str, dm) -> dict[str, float]:
    task = ScalarRegressionTask.load_from_checkpoint(path, map_location="cpu")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.test(task, datamodule=dm, verbose=False)[0].items()}


# ----------------------------------------------------------------------------- pipeline
def test_stages_run_in_fixed_order_and_a_failure_does_not_stop_them(run):
    probes = run["probes"]
    assert probes["fails_first"].seen == {"tested": False, "exported": False, "archived": False, "metadata": False}
    assert probes["after_test"].seen == {"tested": True, "exported": False, "archived": False, "metadata": False}
    assert probes["after_archive"].seen == {"tested": True, "exported": True, "archived": True, "metadata": False}
    assert probes["last"].seen == {"tested": True, "exported": True, "archived": True, "metadata": True}
    context = run["stages"]["test"].context
    assert context is probes["last"].context
    assert context.errors == {"Probe": "RuntimeError: probe failure"}
    assert any("Probe failed at the end of training" in w for w in run["warnings"])


def test_checkpoint_state_is_restored_after_the_test(run):
    """trainer.test(ckpt_path=...) reloads ModelCheckpoint's state from the old checkpoint; it is put back."""
    trainer, state = run["trainer"], run["checkpoint"]
    assert state["best"] != state["last"] and state["last"].endswith("last.ckpt")
    before = run["probes"]["fails_first"].best_k_models
    assert len(before) == 3
    assert run["probes"]["after_test"].best_k_models == before
    assert trainer.checkpoint_callback.best_k_models == before
    assert trainer.state.fn == "fit" and trainer.state.finished


# ----------------------------------------------------------------------------- test
def test_tested_metrics_are_those_of_the_best_checkpoint(run):
    test = run["stages"]["test"]
    state = run["checkpoint"]
    assert test.context.used["TestOnTrainEnd"].path.as_posix() == state["best"]
    expected = fresh_test(state["best"], run["dm"])
    assert set(expected) == set(test.results) and f"test_{TARGET}_mae" in expected
    for key, value in expected.items():
        assert test.results[key] == pytest.approx(value, rel=1e-6, abs=1e-7)
    # the values reached the run's logger
    rows = (run["root"] / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, r.split(","))) for r in rows[1:] if r.split(",")[header.index("test_loss")]]
    assert len(logged) == 1
    assert float(logged[0]["test_loss"]) == pytest.approx(expected["test_loss"], rel=1e-6)
    # and they are not those of the last weights (which differ)
    last = fresh_test(state["last"], run["dm"])
    assert abs(last["test_loss"] - expected["test_loss"]) > 1e-6


def test_checkpoints_hold_ema_weights(run):
    """The tested state_dict is the EMA, not the raw weights kept in the callback state."""
    checkpoint = torch.load(run["checkpoint"]["best"], map_location="cpu", weights_only=True)
    raw = checkpoint["callbacks"]["ExponentialMovingAverageCallback"]["raw"]
    name = next(k for k in raw if k.startswith("encoder.") and raw[k].is_floating_point())
    assert not torch.equal(raw[name], checkpoint["state_dict"][name])


# ----------------------------------------------------------------------------- export
def test_export_reproduces_the_checkpoint(run):
    export = run["stages"]["export"]
    assert export.path == run["root"] / "export" / "model.pt"
    model = load_exported(export.path)
    assert model.metadata["checkpoint"]["path"] == run["checkpoint"]["best"]
    reference = ScalarRegressionTask.load_from_checkpoint(run["checkpoint"]["best"], map_location="cpu").eval()
    batch = next(iter(run["dm"].test_dataloader()))
    with torch.no_grad():
        expected = reference(batch)[TARGET]
    torch.testing.assert_close(model(batch)[TARGET], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- archive
def test_archive_members_and_checkpoint(run, tmp_path):
    archive_path = run["stages"]["archive"].path
    root = run["root"]
    assert archive_path == root / f"{root.name}.tar.gz"
    assert not list(root.glob(".*.tmp"))
    with tarfile.open(archive_path) as archive:
        assert sorted(archive.getnames()) == ["config.yaml", "export/model.pt", "metadata.json", "model.ckpt"]
        assert archive.extractfile("config.yaml").read() == (root / "config.yaml").read_bytes()
        metadata = json.loads(archive.extractfile("metadata.json").read())
        archive.extract("model.ckpt", tmp_path, filter="data")
    assert metadata["archived_checkpoint"]["path"] == run["checkpoint"]["best"]
    assert metadata["config"] == {"model.lr": 0.01, "trainer.max_epochs": 3}
    assert metadata["train_end"]["test_metrics"] == pytest.approx(run["stages"]["test"].results)
    inside = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=True)
    original = torch.load(run["checkpoint"]["best"], map_location="cpu", weights_only=True)
    assert inside["state_dict"].keys() == original["state_dict"].keys()
    assert all(torch.equal(inside["state_dict"][k], v) for k, v in original["state_dict"].items())
    task = ScalarRegressionTask.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu")
    assert task.task_keys == [TARGET]


def test_metadata_written_last_records_the_outputs(run):
    metadata = json.loads((run["root"] / "metadata.json").read_text())
    end = metadata["train_end"]
    assert end["export"]["path"] == str(run["stages"]["export"].path)
    assert end["archive"] == str(run["stages"]["archive"].path)
    assert end["checkpoints"]["TestOnTrainEnd"]["kind"] == "metric"
    assert metadata["seed"] == 7
    assert metadata["trainer"]["global_step"] == run["trainer"].global_step


# ----------------------------------------------------------------------------- checkpoint choice
def _records(tmp_path, monitors):
    out = []
    for i, monitor in enumerate(monitors):
        best = tmp_path / f"best{i}.ckpt"
        best.write_bytes(b"x")
        out.append(
            {"monitor": monitor, "best_model_path": str(best), "best_model_score": 0.1 * i, "last_model_path": ""}
        )
    return out


def test_checkpoint_choice_and_fallbacks(tmp_path):
    records = _records(tmp_path, ["val_energy_mae", "val_loss"])
    found = find_checkpoints(records)
    assert choose_checkpoint(found, "metric").path.name == "best0.ckpt"
    assert choose_checkpoint(found, "loss").path.name == "best1.ckpt"
    assert choose_checkpoint(find_checkpoints(records, loss_monitor="val_energy_mae"), "loss").path.name == "best0.ckpt"

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"x")
    only_metric = _records(tmp_path, ["val_energy_mae"])
    only_metric[0]["last_model_path"] = str(last)
    # the preferred kind is missing: the other best checkpoint comes before the last one
    with pytest.warns(UserWarning, match="no ModelCheckpoint monitors the validation loss; using the metric"):
        choice = choose_checkpoint(find_checkpoints(only_metric), "loss", "ExportOnTrainEnd")
    assert choice.path.name == "best0.ckpt" and choice.kind == "metric" and choice.fallback
    only_loss = _records(tmp_path, ["val_loss"])
    only_loss[0]["last_model_path"] = str(last)
    found_loss = {k: v for k, v in find_checkpoints(only_loss).items() if k != "metric"}
    with pytest.warns(UserWarning, match="no ModelCheckpoint with a monitor saved a checkpoint; using the loss"):
        assert choose_checkpoint(found_loss, "metric").path.name == "best0.ckpt"
    only_last = {k: v for k, v in find_checkpoints(only_metric).items() if k == "last"}
    with pytest.warns(UserWarning, match="using the last checkpoint"):
        choice = choose_checkpoint(only_last, "loss", "ExportOnTrainEnd")
    assert choice.path == last and choice.kind == "last" and choice.fallback

    unmonitored = _records(tmp_path, [None])  # a ModelCheckpoint without monitor keeps the newest file
    with pytest.warns(UserWarning, match="using the last checkpoint"):
        assert choose_checkpoint(find_checkpoints(unmonitored), "metric").path.name == "best0.ckpt"
    # no checkpoint at all: the stage is skipped, unless the weights in memory are asked for
    with pytest.raises(SkipStage, match="stage skipped"):
        choose_checkpoint({}, "metric")
    assert choose_checkpoint(found, "current").kind == "current" and choose_checkpoint(found, "current").path is None


def test_a_stage_without_checkpoint_is_skipped_with_a_warning(tmp_path):
    stage = ExportOnTrainEnd()
    trainer = toy_trainer(tmp_path, [stage], max_epochs=1)  # no ModelCheckpoint: no checkpoint on disk
    trainer.fit(ToyTask(), datamodule=toy_datamodule(n=8))
    assert stage.context.export_path is None and not (tmp_path / "export").exists()
    assert stage.context.errors["ExportOnTrainEnd"].startswith("skipped:")
    assert "stage skipped" in stage.context.errors["ExportOnTrainEnd"]


def test_constructor_errors():
    with pytest.raises(ConfigError, match="did you mean 'metric'"):
        train_end.TestOnTrainEnd(preferred_checkpoint="metrics")
    with pytest.raises(ConfigError, match="did you mean 'export'"):
        ExportOnTrainEnd(method="exprt")


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    """The runnable example of docs/callbacks.rst ("Writing your own callback") runs and its assertion holds."""
    import ast
    import tempfile
    from pathlib import Path

    rst = Path(__file__).resolve().parents[3] / "docs" / "callbacks.rst"
    if not rst.exists():
        pytest.skip(f"{rst} not found")
    text = rst.read_text()
    start = text.index(".. code-block:: python", text.index("Writing your own callback"))
    lines = []
    for line in text[start:].splitlines()[1:]:
        if line and not line.startswith("   "):
            break
        lines.append(line[3:])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.warns(UserWarning, match="WriteSummary: preferred_checkpoint='metric' but no ModelCheckpoint"):
        exec(compile("\n".join(lines), str(rst), "exec"), {"__name__": "doc_example"})
    summary = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the printed dict
    assert summary["kind"] == "last" and Path(summary["checkpoint"]).is_file()
    assert Path(summary["checkpoint"]).is_relative_to(tmp_path)


def test_export_falls_back_to_the_other_method(run, tmp_path):
    """method='export' fails on PLEGNNBackbone today; the stage then writes the TorchScript file."""
    from matsciml.lightning.callbacks._base.train_end import TrainEndContext, checkpoint_records

    trainer = run["trainer"]
    stage = ExportOnTrainEnd(method="export", preferred_checkpoint="loss", dirpath=tmp_path)
    context = TrainEndContext(run_dir=tmp_path, checkpoints=checkpoint_records(trainer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage.run_train_end(trainer, run["task"], context)
    messages = [str(w.message) for w in caught]
    # no checkpoint monitors val_loss in this run: the other best checkpoint (by the metric) is used
    assert context.used["ExportOnTrainEnd"].kind == "metric"
    assert context.used["ExportOnTrainEnd"].path.as_posix() == run["checkpoint"]["best"]
    model = load_exported(stage.path)
    if model.method == "export":  # the encoder became export-friendly
        return
    assert any("method='export' failed" in m for m in messages)
    assert stage.path == tmp_path / "model.pt" and context.export_info["method"] == "torchscript"
    reference = ScalarRegressionTask.load_from_checkpoint(run["checkpoint"]["best"], map_location="cpu").eval()
    batch = next(iter(run["dm"].val_dataloader()))
    with torch.no_grad():
        expected = reference(batch)[TARGET]
    torch.testing.assert_close(model(batch)[TARGET], expected, rtol=1e-6, atol=1e-6)
