"""UploadCheckpoint against real trackers: a local MLflow server and W&B in offline mode.

Oracles: the EMA callback's averaged weights, captured by a probe at the moment each
checkpoint was written (and at the failure), compared tensor by tensor with the
``state_dict`` of the file downloaded from the MLflow server; the files on disk (bytes,
MD5 and size) against what the server holds and what W&B's transaction log records; the
PNG written by the attribution callback against the image MLflow stored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from helpers import make_trainer, tiny_egnn_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from matsciml.common.errors import ConfigError
from matsciml.common.optional import require
from matsciml.lightning.callbacks import (
    AtomAttributionCallback,
    CallbackError,
    ExponentialMovingAverageCallback,
    IsolatedCallback,
    TrainingDynamicsReport,
    UploadCheckpoint,
)
from matsciml.lightning.callbacks.builder import build_callbacks
from matsciml.lightning.datamodule import MatSciMLDataModule
from matsciml.models.tasks.scalar import ScalarRegressionTask

mlflow = pytest.importorskip("mlflow", reason="pip install 'matsciml[tracking]'")
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

TARGET = "energy_per_atom"
CONFIG = {"model": {"lr": 0.01, "encoder_class": "PLEGNNBackbone"}, "run": {"seed": 3}}


# ----------------------------------------------------------------------------- fixtures
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def quiet_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mp.setenv("DO_NOT_TRACK", "true")
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, quiet_env):
    """A local MLflow tracking server (SQLite store, local artifact folder); its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # about 10 s on an idle machine, minutes on a loaded one
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def make_task() -> ScalarRegressionTask:
    return ScalarRegressionTask(
        encoder_class="PLEGNNBackbone",
        encoder_kwargs=tiny_egnn_kwargs(depth=2, cutoff=6.0),
        task_keys=[TARGET],
        output_kwargs={"hidden_dim": 16},
        lr=0.01,
    )


def make_datamodule() -> MatSciMLDataModule:
    return MatSciMLDataModule.from_devset(dset_kwargs={"n": 16}, val_split=0.25, target_keys=[TARGET], batch_size=4)


def clone(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class EMAProbe(Callback):
    """Copies the EMA callback's averaged weights whenever a checkpoint may be written, and the raw weights."""

    def __init__(self, ema: ExponentialMovingAverageCallback, fail_at_step: int | None = None) -> None:
        self.ema = ema
        self.fail_at_step = fail_at_step
        self.at_step: dict[int, dict] = {}
        self.raw: dict = {}
        self.train_end: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw = clone(pl_module.state_dict())
        if self.fail_at_step is not None and trainer.global_step == self.fail_at_step:
            self.at_step[trainer.global_step] = clone(self.ema.ema_state_dict())
            raise RuntimeError(f"planted failure at step {trainer.global_step}")

    def on_validation_end(self, trainer, pl_module):
        # ModelCheckpoint (always the last callback) saves right after this, with no EMA update between
        self.at_step[trainer.global_step] = clone(self.ema.ema_state_dict())

    def on_train_end(self, trainer, pl_module):
        self.train_end = clone(self.ema.ema_state_dict())


def assert_same_weights(state: dict, reference: dict) -> None:
    assert sorted(state) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{key}")


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()  # noqa: S324 - W&B's digest


def download(client: MlflowClient, run_id: str, artifact: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, artifact, str(dest)))


# ----------------------------------------------------------------------------- MLflow: a finished run
@pytest.fixture(scope="module")
def mlflow_run(mlflow_server, devset_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_mlflow")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    pl.seed_everything(3, verbose=False)
    ema = ExponentialMovingAverageCallback(decay=0.6)
    probe = EMAProbe(ema)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="val_loss", save_top_k=1, save_last=True)
    upload = UploadCheckpoint(upload_last=True)
    attribution = AtomAttributionCallback(every_n_epochs=2, max_structures=1, steps=8)
    logger = MLFlowLogger(experiment_name="upload-test", tracking_uri=mlflow_server)
    callbacks = [ema, probe, TrainingDynamicsReport(), attribution, upload, checkpoint]
    trainer = make_trainer(root, callbacks, logger=logger, max_epochs=2, log_every_n_steps=1)
    trainer.fit(make_task(), datamodule=make_datamodule())
    yield {"root": root, "trainer": trainer, "logger": logger, "probe": probe, "checkpoint": checkpoint,
           "upload": upload, "attribution": attribution, "client": MlflowClient(mlflow_server)}  # fmt: skip


@pytest.mark.slow
def test_mlflow_gets_the_ema_weights_config_report_and_metadata(mlflow_run, tmp_path):
    client, run_id = mlflow_run["client"], mlflow_run["logger"].run_id
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert names == {"best.ckpt", "last.ckpt", "config.yaml", "training_dynamics.png", "metadata.json"}
    assert client.get_run(run_id).info.status == "FINISHED"
    checkpoint, probe = mlflow_run["checkpoint"], mlflow_run["probe"]

    best = download(client, run_id, "model/best.ckpt", tmp_path / "best")
    assert best.read_bytes() == Path(checkpoint.best_model_path).read_bytes()
    state = torch.load(best, map_location="cpu", weights_only=True)
    assert_same_weights(state["state_dict"], probe.at_step[state["global_step"]])

    last = download(client, run_id, "model/last.ckpt", tmp_path / "last")
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert_same_weights(state["state_dict"], probe.train_end)
    # the EMA weights are not the raw ones (decay 0.6 over 6 steps): the test tells them apart
    assert any(not torch.equal(probe.train_end[k], probe.raw[k]) for k in probe.raw)

    config = download(client, run_id, "model/config.yaml", tmp_path / "config")
    assert yaml.safe_load(config.read_text()) == CONFIG
    report = download(client, run_id, "model/training_dynamics.png", tmp_path / "report")
    assert report.read_bytes() == (mlflow_run["root"] / "training_dynamics.png").read_bytes()
    metadata = json.loads(download(client, run_id, "model/metadata.json", tmp_path / "meta").read_text())
    assert metadata["upload"]["checkpoints"]["best.ckpt"]["path"] == checkpoint.best_model_path
    assert metadata["upload"]["checkpoints"]["best.ckpt"]["monitor"] == "val_loss"
    assert metadata["hyperparameters"]["lr"] == 0.01
    assert [r["kind"] for r in mlflow_run["upload"].uploads] == ["mlflow"]


@pytest.mark.slow
def test_mlflow_gets_the_attribution_images(mlflow_run, tmp_path):
    client, run_id = mlflow_run["client"], mlflow_run["logger"].run_id
    pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    local = mlflow_run["attribution"].images
    assert len(local) == 1 and len(pngs) == 1
    assert Path(pngs[0]).name.startswith("attributions~")
    import matplotlib.image as mpimg

    sent = mpimg.imread(download(client, run_id, pngs[0], tmp_path / "img"))
    drawn = mpimg.imread(local[0])[..., :3]
    assert sent.shape[:2] == drawn.shape[:2]
    # the same drawing: the logged canvas and the file written with savefig at the same dpi
    assert np.abs(sent[..., :3].astype(np.float32) - drawn).mean() < 0.02


# ----------------------------------------------------------------------------- MLflow: a failed run
class FailingIsolated(IsolatedCallback):
    def __init__(self, step: int, probe: EMAProbe) -> None:
        super().__init__()
        self.step = step
        self.probe = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.probe.at_step[trainer.global_step] = clone(self.probe.ema.ema_state_dict())
            raise ValueError("planted callback failure")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["training", "isolated_callback"])
def test_failed_run_uploads_the_error_checkpoint(where, mlflow_server, devset_cache, tmp_path):
    root = tmp_path / "run"
    ema = ExponentialMovingAverageCallback(decay=0.6)
    probe = EMAProbe(ema, fail_at_step=3 if where == "training" else None)
    extra = [FailingIsolated(3, probe)] if where == "isolated_callback" else []
    upload = UploadCheckpoint()
    logger = MLFlowLogger(experiment_name="upload-failures", tracking_uri=mlflow_server)
    trainer = make_trainer(root, [ema, probe, *extra, upload], logger=logger, max_epochs=3)
    expected = RuntimeError if where == "training" else CallbackError
    with pytest.raises(expected, match="planted"):
        trainer.fit(make_task(), datamodule=make_datamodule())

    client, run_id = MlflowClient(mlflow_server), logger.run_id
    assert client.get_run(run_id).info.status == "FAILED"
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    assert names == {"error.ckpt", "metadata.json"}
    local = upload.error_checkpoint
    if where == "training":  # written by UploadCheckpoint itself
        assert local == root / "checkpoints" / "error-step3.ckpt"
    else:  # the one the failure isolation wrote, not a second one
        assert local.name == "error-FailingIsolated-step3.ckpt"
        assert not (root / "checkpoints" / "error-step3.ckpt").exists()
    sent = download(client, run_id, "model/error.ckpt", tmp_path / "err")
    assert sent.read_bytes() == local.read_bytes()
    state = torch.load(sent, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert_same_weights(state["state_dict"], probe.at_step[3])
    metadata = json.loads(download(client, run_id, "model/metadata.json", tmp_path / "meta").read_text())
    assert "planted" in metadata["upload"]["error"]


# ----------------------------------------------------------------------------- W&B offline
def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``).

    Layout: a 7-byte header (``:W&B``, magic, version), then LevelDB-style log blocks of
    32 KiB, each record in chunks with a 7-byte header (CRC32, length, type: 1 full,
    2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


@pytest.mark.slow
def test_wandb_offline_run_records_the_checkpoint_artifact(devset_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'matsciml[tracking]'")
    import wandb

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "run"
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", monitor="val_loss", save_top_k=1)
    upload = UploadCheckpoint()
    logger = WandbLogger(project="matsciml-upload", save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(root, [upload, checkpoint], logger=logger, max_epochs=2)
    try:
        trainer.fit(make_task(), datamodule=make_datamodule())
        run_id = logger.experiment.id
    finally:
        wandb.finish()
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in read_wandb_records(log) if r.WhichOneof("record_type") == "artifact"]
    (artifact,) = [a for a in artifacts if a.name == f"model-{run_id}"]
    assert artifact.type == "model"
    assert set(artifact.aliases) >= {"best"}
    entries = {e.path: e for e in artifact.manifest.contents}
    assert set(entries) == {"best.ckpt", "metadata.json"}
    best = Path(checkpoint.best_model_path)
    assert entries["best.ckpt"].size == best.stat().st_size
    assert entries["best.ckpt"].digest == md5_b64(best)
    assert json.loads(artifact.metadata)["checkpoints"]["best.ckpt"]["path"] == str(best)


# ----------------------------------------------------------------------------- configuration
def test_yaml_names_and_luxonis_arguments():
    upload, alias = build_callbacks(
        ["upload_checkpoint", {"kind": "UploadCheckpointOnTrainEnd", "upload_directory": "ckpts", "upload_last": True}]
    )
    assert isinstance(upload, UploadCheckpoint) and upload.artifact_path == "model"
    assert isinstance(alias, UploadCheckpoint) and alias.artifact_path == "ckpts" and alias.upload_last
    with pytest.raises(ConfigError, match=r"callbacks\[0\].*preferred_checkpoint='metrc'.*did you mean 'metric'"):
        build_callbacks([{"kind": "UploadCheckpoint", "preferred_checkpoint": "metrc"}])


def test_missing_tracker_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"UploadCheckpoint needs the 'wandb'.*pip install 'matsciml\[tracking\]'"):
        require("wandb", "UploadCheckpoint")


@pytest.mark.slow  # a fresh interpreter importing torch and lightning
def test_importing_the_callbacks_loads_no_tracker_library():
    code = (
        "import sys, matsciml.lightning.callbacks as c; c.UploadCheckpoint(); "
        "print(sorted({'mlflow', 'wandb', 'codecarbon'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_without_tracker_logger_it_warns_and_uploads_nothing(devset_cache, tmp_path):
    upload = UploadCheckpoint()
    trainer = make_trainer(tmp_path, [upload], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="no MLFlowLogger or WandbLogger"):
        trainer.fit(make_task(), datamodule=make_datamodule())
    assert upload.uploads == []
