"""Batch jobs under a simulated SLURM: requeue on SIGUSR1, SIGTERM at the time limit, exact resume, DDP on gloo.

Every run is ``experiments/training_script.py`` in a subprocess with SLURM variables set
and a fake ``scontrol`` first on ``PATH`` that records its arguments. A helper callback
(``slurm_helpers/slurm_test_hooks.py``) pauses the run at a chosen point of a chosen step
and waits until the signal the test sends has been recorded, so every run takes the same
steps. The oracle of every resume is an uninterrupted run of the same configuration:
its final raw weights (EMA callback state of ``last.ckpt``) and EMA weights (the
checkpoint's ``state_dict``) must be bitwise equal to those of the interrupted and
resumed run. The model has dropout and a learning-rate schedule, and trains with EMA
and SAM, so random-generator, optimizer, scheduler, loader and EMA states all have to be
restored for the weights to match.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import tiny_egnn_yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "training_script.py"
HELPERS = Path(__file__).resolve().parent / "slurm_helpers"
N_STRUCTURES = 40  # val 10, train 30: 4 training batches of 8 per epoch, 2 validation batches
TIMEOUT_S = 240

TINY_MODEL = """\
encoder_class: {class_path: matsciml.models.egnn.PLEGNNBackbone}
encoder_kwargs: ENCODER_KWARGS
output_kwargs: {hidden_dim: 16, num_hidden: 1, dropout: 0.2}
lr: 0.01
scheduler_kwargs:
  class_path: torch.optim.lr_scheduler.CosineAnnealingLR
  init_args: {T_max: 3}
transforms:
  - class_path: matsciml.datasets.transforms.PeriodicPropertiesTransform
    init_args: {cutoff_radius: 3.3, adaptive_cutoff: true}
  - class_path: matsciml.datasets.transforms.PointCloudToGraphTransform
    init_args: {backend: pyg}
""".replace("ENCODER_KWARGS", tiny_egnn_yaml(readout="mean"))

DATASET = f"""\
dataset: EMTAlloyDataset
debug:
  batch_size: 8
  val_split: VAL_SPLIT
  dset_kwargs: {{n: {N_STRUCTURES}}}
target_keys: [energy_per_atom]
task_args:
  normalize_kwargs: {{energy_per_atom_mean: 0.03, energy_per_atom_std: 0.05}}
"""

EXPERIMENT = """\
model: tiny
dataset:
  small:
    - task: ScalarRegressionTask
      targets: [energy_per_atom]
seed: 7
"""

TRAINER = """\
generic:
  max_epochs: MAX_EPOCHS
  enable_model_summary: false
  log_every_n_steps: 1
debug: {accelerator: cpu}
callbacks:
  - class_path: matsciml.lightning.callbacks.ExponentialMovingAverageCallback
    init_args: {decay: 0.9}
  - class_path: matsciml.lightning.callbacks.SAM
    init_args: {rho: 0.05}
EXTRA  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {monitor: val_loss, save_last: true}
"""


def write_configs(root: Path, val_split: float = 0.25, max_epochs: int = 3) -> Path:
    for rel, text in {
        "models/tiny.yaml": TINY_MODEL,
        "datasets/small.yaml": DATASET.replace("VAL_SPLIT", str(val_split)),
        "experiments/exp.yaml": EXPERIMENT,
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "max_epochs").write_text(str(max_epochs))
    return root


def write_trainer(root: Path, name: str, extra_callbacks: str = "") -> Path:
    max_epochs = (root / "max_epochs").read_text()
    text = TRAINER.replace("MAX_EPOCHS", max_epochs).replace("EXTRA", textwrap.indent(extra_callbacks, "  "))
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def pause_spec(marker: Path, epoch: int, batch: int, stage: str, rank: int | None = None) -> str:
    rank_arg = "" if rank is None else f", rank: {rank}"
    return (
        "- class_path: slurm_test_hooks.PauseAt\n"
        f"  init_args: {{marker: '{marker}', epoch: {epoch}, batch: {batch}, stage: {stage}{rank_arg}}}\n"
    )


def fake_scontrol(folder: Path) -> Path:
    """A ``scontrol`` that appends its arguments to ``<folder>/scontrol.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder / "scontrol.log"}"\n')
    script.chmod(0o755)
    return folder / "scontrol.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(job_id: str, bin_dir: Path, ntasks: int = 1, rank: int = 0, port: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_", "MATSCIML_RUN_DIR"))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(
        {
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NAME": "matsciml-test",
            "SLURM_NTASKS": str(ntasks),
            "SLURM_NTASKS_PER_NODE": str(ntasks),
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port or free_port()),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO), env.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def command(root: Path, trainer: Path, log_dir: Path) -> list[str]:
    return [
        sys.executable, str(SCRIPT), "-e", str(root / "experiments" / "exp.yaml"), "-t", str(trainer),
        "-m", str(root / "models"), "-d", str(root / "datasets"), "--debug", "--log_dir", str(log_dir),
    ]  # fmt: skip


@dataclass
class Run:
    """One training subprocess, its output file and (optionally) the signal to send when its marker appears."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    out: Path
    marker: Path | None = None
    signum: int | None = None
    proc: subprocess.Popen | None = None
    signalled: bool = False
    returncode: int | None = None
    log: str = field(default="", repr=False)

    def start(self) -> Run:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "w") as fh:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def poll(self) -> bool:
        """Send the signal once the marker exists; return whether the process has ended."""
        assert self.proc is not None
        if self.marker is not None and not self.signalled and self.marker.exists():
            os.kill(self.proc.pid, self.signum)
            self.signalled = True
        code = self.proc.poll()
        if code is not None:
            self.returncode = code
            self.log = self.out.read_text()
            return True
        return False


def run_jobs(jobs: list[list[Run]]) -> None:
    """Run the jobs side by side; the runs of one job one after the other (a restart starts when its
    predecessor has ended). Signals are sent when markers appear."""
    queues = [list(job) for job in jobs]
    current = [queue.pop(0).start() for queue in queues]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(run is not None for run in current):
            for i, run in enumerate(current):
                if run is not None and run.poll():
                    current[i] = queues[i].pop(0).start() if queues[i] else None
            if time.monotonic() > deadline:
                raise AssertionError("runs did not finish: " + ", ".join(r.name for r in current if r is not None))
            time.sleep(0.05)
    finally:
        for run in current:
            if run is not None and run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def final_weights(run_dir: Path) -> tuple[dict, dict, dict]:
    """``(raw, ema, checkpoint)`` from ``<run_dir>/checkpoints/last.ckpt``, loaded with ``weights_only=True``."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    raw = ckpt["callbacks"]["ExponentialMovingAverageCallback"]["raw"]
    return raw, ckpt["state_dict"], ckpt


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max |diff| {(a[key] - b[key]).abs().max()})"


# ----------------------------------------------------------------------------- the resume scenarios

#: name -> (job id, pause (epoch, batch, stage), signal, exit status expected of the stopped run, global step saved)
SCENARIOS = {
    "sigusr1_mid_step": ("4101", (1, 1, "train"), signal.SIGUSR1, 0, 6),
    "sigusr1_in_validation": ("4102", (1, 0, "val"), signal.SIGUSR1, 0, 8),
    "sigterm_mid_step": ("4103", (0, 2, "train"), signal.SIGTERM, 143, 3),
}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """The uninterrupted reference and the three interrupted runs side by side, each followed by its restart."""
    root = write_configs(tmp_path_factory.mktemp("slurm"))
    log_dir = root / "logs"
    bin_dir = root / "bin"
    scontrol_log = fake_scontrol(bin_dir)
    reference = Run("reference", command(root, write_trainer(root, "reference"), log_dir), {}, root / "reference.out")
    reference.env = slurm_env("4100", bin_dir)
    first: dict[str, Run] = {}
    for name, (job, (epoch, batch, stage), signum, _, _) in SCENARIOS.items():
        marker = root / f"{name}.marker"
        trainer = write_trainer(root, name, pause_spec(marker, epoch, batch, stage))
        first[name] = Run(name, command(root, trainer, log_dir), slurm_env(job, bin_dir), root / f"{name}-1.out")
        first[name].marker, first[name].signum = marker, signum
    # the same command again once the first run has ended
    second = {name: Run(name, run.cmd, run.env, root / f"{name}-2.out") for name, run in first.items()}
    run_jobs([[reference], *([first[name], second[name]] for name in first)])
    return {
        "root": root,
        "log_dir": log_dir,
        "scontrol_log": scontrol_log,
        "reference": reference,
        "first": first,
        "second": second,
    }


@pytest.mark.slow
def test_reference_run_completes(resume_runs):
    ref = resume_runs["reference"]
    assert ref.returncode == 0, ref.log[-3000:]
    run_dir = resume_runs["log_dir"] / "exp" / "slurm-4100"  # the run folder is named from the job
    raw, ema, ckpt = final_weights(run_dir)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 2
    # the comparisons below have teeth: EMA and raw weights differ, and training moved them
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_interrupted_run_saves_requeues_and_resumes_exactly(resume_runs, name):
    job, _, signum, expected_code, saved_step = SCENARIOS[name]
    first, second = resume_runs["first"][name], resume_runs["second"][name]
    run_dir = resume_runs["log_dir"] / "exp" / f"slurm-{job}"
    assert first.signalled, first.log[-3000:]
    assert first.returncode == expected_code, first.log[-3000:]
    # the resume checkpoint was written at the next step boundary and loads safely
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    state = torch.load(hpc, map_location="cpu", weights_only=True)
    assert state["global_step"] == saved_step
    assert "ExponentialMovingAverageCallback" in state["callbacks"] and "RNGStateCallback" in state["callbacks"]
    assert not list(run_dir.rglob(".partial-*"))
    requeues = [line.split() for line in resume_runs["scontrol_log"].read_text().splitlines()]
    if signum == signal.SIGUSR1:
        assert ["requeue", job] in requeues
        assert f"SLURM job {job} requeued" in first.log
    else:  # SIGTERM at the time limit: saved, not requeued
        assert not [r for r in requeues if r[-1] == job]
        assert "not requeued" in first.log
    # the same command again resumes by itself and ends bitwise where the uninterrupted run ends
    assert second.returncode == 0, second.log[-3000:]
    assert f"Resuming from {hpc}" in second.log
    raw, ema, ckpt = final_weights(run_dir)
    ref_raw, ref_ema, ref_ckpt = final_weights(resume_runs["log_dir"] / "exp" / "slurm-4100")
    assert ckpt["global_step"] == ref_ckpt["global_step"] == 12
    assert_bitwise_equal(raw, ref_raw, f"{name}: raw weights")
    assert_bitwise_equal(ema, ref_ema, f"{name}: EMA weights")
    # the metrics of both runs are in one metrics.csv: one validation row per epoch
    with open(run_dir / "metrics.csv") as fh:
        val_epochs = [r["epoch"] for r in csv.DictReader(fh) if r.get("val_energy_per_atom_mae")]
    assert val_epochs == ["0", "1", "2"]
    # one config.yaml, extended with the restart
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["slurm_job_id"] == job
    assert [r["resumed_from"] for r in config["run"]["restarts"]] == [str(hpc)]


# ----------------------------------------------------------------------------- DDP, 2 processes on gloo


def monitor_specs() -> str:
    """The training monitors that exist in this checkout, as trainer-config callback specs."""
    import importlib

    found = []
    for module, cls, args in [
        ("matsciml.lightning.callbacks.gradients", "GradientCheckCallback", "{}"),
        ("matsciml.lightning.callbacks.nan", "ForwardNaNDetection", "{}"),
        ("matsciml.lightning.callbacks.throughput", "ThroughputCallback", "{}"),
    ]:
        try:
            getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            continue
        found.append(f"- class_path: {module}.{cls}\n  init_args: {args}\n")
    return "".join(found)


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """EMA, SAM and monitors under DDP, requeued by a signal that only rank 1 receives, then restarted:
    identical weights on both ranks, the single-process validation MAE, files and log lines written once."""
    root = write_configs(tmp_path, val_split=0.275, max_epochs=2)  # 11 validation structures: odd
    dump = tmp_path / "dump"
    marker = tmp_path / "ddp.marker"
    extra = monitor_specs() + f"- class_path: slurm_test_hooks.DumpWeights\n  init_args: {{folder: '{dump}'}}\n"
    trainer = write_trainer(root, "ddp", extra + pause_spec(marker, 0, 1, "train", rank=1))
    bin_dir = tmp_path / "bin"
    scontrol_log = fake_scontrol(bin_dir)
    log_dir = tmp_path / "logs"
    cmd = command(root, trainer, log_dir)
    ports = [free_port(), free_port()]
    first = [
        Run(f"rank{r}", cmd, slurm_env("5100", bin_dir, 2, r, ports[0]), tmp_path / f"rank{r}-1.out") for r in (0, 1)
    ]
    first[1].marker, first[1].signum = marker, signal.SIGUSR1  # rank 1 only
    run_jobs([[run] for run in first])
    assert [run.returncode for run in first] == [0, 0], first[0].log[-3000:] + first[1].log[-3000:]
    # both ranks stopped at the same step boundary (after the validation of epoch 0): one checkpoint, one requeue
    (run_dir,) = (log_dir / "exp").iterdir()
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 2
    assert scontrol_log.read_text().splitlines() == ["requeue 5100"]
    ranks = [
        Run(f"rank{r}", cmd, slurm_env("5100", bin_dir, 2, r, ports[1]), tmp_path / f"rank{r}.out") for r in (0, 1)
    ]
    run_jobs([[run] for run in ranks])
    for run in ranks:
        assert run.returncode == 0, run.log[-4000:]
    assert f"Resuming from {hpc}" in ranks[0].log

    # identical weights on both ranks (raw and EMA)
    w0, w1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_bitwise_equal(w0["raw"], w1["raw"], "raw weights of rank 0 and 1")
    assert_bitwise_equal(w0["ema"], w1["ema"], "EMA weights of rank 0 and 1")

    # files written once: one run folder, named from the job, no duplicate checkpoints or loggers
    (run_dir,) = (log_dir / "exp").iterdir()
    assert run_dir.name == "slurm-5100"
    names = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    assert names.count("config.yaml") == 1 and "metrics.csv" in names and "hparams.yaml" in names
    ckpts = {n for n in names if n.endswith(".ckpt")}  # no '-v1' copies, no temporary files
    assert ckpts == {"checkpoints/last.ckpt", "checkpoints/epoch=1-step=4.ckpt", "hpc_ckpt_1.ckpt"}, names
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    val = [(r["epoch"], r["val_energy_per_atom_mae"]) for r in rows if r.get("val_energy_per_atom_mae")]
    assert [e for e, _ in val] == ["0", "1"]  # one validation row per epoch, not one per rank

    # logs: progress lines and the summary from rank 0 only
    log0, log1 = ranks[0].log, ranks[1].log
    assert " train epoch " in log0 and " val   epoch " in log0 and "Validation MAE" in log0
    assert " train epoch " not in log1 and "Validation MAE" not in log1 and " val   epoch " not in log1

    # validation MAE of 2 processes = MAE of one process over the same 11 structures with the same weights
    logged = float(val[-1][1])
    expected, padded = single_process_mae(root, run_dir / "checkpoints" / "last.ckpt", tmp_path / "oracle")
    assert logged == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert abs(padded - expected) > 1e-4  # counting the padding twice would be caught


def single_process_mae(root: Path, checkpoint: Path, run_dir: Path) -> tuple[float, float]:
    """MAE over the validation set by a plain loop in this process, and the MAE with the first structure counted twice
    (what DistributedSampler's padding to 12 would give)."""
    from matsciml.runner.experiment import prepare_experiment

    for key in ("SLURM_JOB_ID", "SLURM_NTASKS"):
        assert key not in os.environ
    prepared = prepare_experiment(
        root / "experiments" / "exp.yaml",
        write_trainer(root, "oracle"),
        root / "models",
        root / "datasets",
        debug=True,
        run_dir=run_dir,
    )
    task, dm = prepared.task, prepared.datamodule
    val = dm.datasets["val"]
    assert len(val) == 11
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    task.load_state_dict(state)
    task.eval()
    errors = []
    with torch.no_grad():
        for batch in dm.eval_dataloader("val"):
            pred = task(batch)["energy_per_atom"].reshape(-1).double()
            target = batch["targets"]["energy_per_atom"].reshape(-1).double()
            errors += (pred - target).abs().tolist()
    assert len(errors) == 11
    return sum(errors) / 11, (sum(errors) + errors[0]) / 12


# ----------------------------------------------------------------------------- the sbatch templates


@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_templates(template, tmp_path):
    """The #SBATCH settings fit together, and the script runs the runner through srun with a valid command line."""
    from matsciml.runner.cli import build_parser

    path = REPO / "experiments" / "slurm" / template
    text = path.read_text()
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.split()[1].lstrip("-").partition("=")
            options[key] = value
    assert options["ntasks-per-node"] == options["gpus-per-node"]  # one process per GPU
    assert options["signal"].startswith("SIGUSR1@") and int(options["signal"].split("@")[1]) >= 60
    assert "requeue" in options and options["open-mode"] == "append"
    assert int(options["nodes"]) == (1 if template.startswith("single") else 2)
    # run it with a fake srun that records its arguments
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path / "srun.args"}"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "8",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "8",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    done = subprocess.run(
        ["bash", str(path), "exp.yaml", "trainer.yaml", "-c", "model.lr.0.002"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:3] == ["--kill-on-bad-exit=1", "python", "experiments/training_script.py"]
    parsed = build_parser().parse_args(args[3:])
    assert (str(parsed.experiment_config), str(parsed.trainer_config)) == ("exp.yaml", "trainer.yaml")
    assert parsed.log_dir == tmp_path / "logs" and parsed.resume == "auto" and parsed.cli_args == ["model.lr.0.002"]


# ----------------------------------------------------------------------------- resume settings (in this process)


def test_resume_settings_and_errors(tmp_path, monkeypatch):
    from matsciml.common.errors import ConfigError
    from matsciml.runner.experiment import prepare_experiment

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    root = write_configs(tmp_path / "cfg")
    trainer = write_trainer(root, "plain")
    exp = root / "experiments" / "exp.yaml"

    def prepare(**kwargs):
        return prepare_experiment(exp, trainer, root / "models", root / "datasets", debug=True, **kwargs)

    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("an earlier run")
    with pytest.raises(ConfigError, match="--resume auto to continue"):
        prepare(run_dir=used)
    prepared = prepare(run_dir=used, resume="auto")  # nothing to resume: a fresh start, not an error
    assert prepared.resume == "auto" and prepared.resume_checkpoint is None
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    with pytest.raises(ConfigError, match=r"--resume: checkpoint .*weights.ckpt cannot resume a run: it has no loops"):
        prepare(run_dir=tmp_path / "a", resume=str(tmp_path / "weights.ckpt"))
    exp.write_text(EXPERIMENT + "resume: missing.ckpt\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: resume: checkpoint missing.ckpt does not exist"):
        prepare(run_dir=tmp_path / "b")
    exp.write_text(EXPERIMENT)
    # inside a SLURM job: the run folder is named from the job, resume defaults to auto
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    prepared = prepare(log_dir=tmp_path / "logs")
    assert prepared.run_dir == tmp_path / "logs" / "exp" / "slurm-99" and prepared.resume == "auto"
    assert prepare(log_dir=tmp_path / "logs").run_dir == prepared.run_dir  # every rank, every restart
