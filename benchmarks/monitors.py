"""Cost of the training monitors: step time with all of them on, divided by step time with none.

Setting: the small ``E3NNEncoder`` of ``experiments/configs/models/e3nn_small.yaml`` (the
runner's CPU configuration; built-in copy below when the file is absent) in a
``ScalarRegressionTask`` on ``energy_per_atom`` of the devset (``from_devset(n=200)``,
batch 8, 160 training structures), AdamW, CPU, a ``CSVLogger`` in both variants, the
trainer's default ``log_every_n_steps=50``. Variants:

- ``none``: no callback besides the step timer;
- ``all``: every monitor at its default frequency: this package's
  :class:`~matsciml.lightning.callbacks.throughput.ThroughputCallback`,
  :class:`~matsciml.lightning.callbacks.memory.PeakMemoryCallback`,
  :class:`~matsciml.lightning.callbacks.report.TrainingDynamicsReport`, and those of
  ``gradients``, ``unused``, ``nan``, ``helper``, ``autocorrelation`` and ``loss_spikes``
  that are importable (the table lists which were).

One task and data module serve every run (so caches and e3nn's generated code are
warm, after one untimed run), with one torch thread. Each run trains ``--warmup`` +
``--steps`` optimizer steps; the step time is the time from the start of step ``--warmup``
to the end of training, divided by ``--steps``: a mean, so the monitors' periodic work
(every 50 steps by default) is counted. Two clocks: the CPU time of the training thread
(:func:`time.thread_time`, which leaves out time spent waiting for a core that another
process holds: the robust measure on a shared machine) and wall time. The variants
alternate (none, all, all, none, ...) for ``--repeats`` rounds; the ratios are those of
the medians (and of the minima) over the rounds. ``--each`` adds one variant per monitor
alone. The end-of-fit figure is drawn after the timed window (about a second per run).
Run::

    python benchmarks/monitors.py                      # about a minute on 2 CPU cores
    python benchmarks/monitors.py --each               # about 2 minutes more
    python benchmarks/monitors.py --report docs/_static/training_dynamics.png
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matsciml.common.config import instantiate  # noqa: E402
from matsciml.lightning import MatSciMLDataModule  # noqa: E402
from matsciml.lightning.callbacks.memory import PeakMemoryCallback  # noqa: E402
from matsciml.lightning.callbacks.report import TrainingDynamicsReport  # noqa: E402
from matsciml.lightning.callbacks.throughput import ThroughputCallback  # noqa: E402
from matsciml.models.base import ScalarRegressionTask  # noqa: E402

E3NN_SMALL = {
    "encoder_class": {"class_path": "matsciml.models.equivariant.E3NNEncoder"},
    "encoder_kwargs": {
        "num_layers": 2,
        "hidden_irreps": "16x0e + 8x1o",
        "max_ell": 1,
        "num_radial_basis": 6,
        "cutoff": 4.5,
        "embedding_dim": 32,
        "radial_hidden": 32,
        "readout": "mean",
    },
    "output_kwargs": {"hidden_dim": 32, "num_hidden": 1, "activation": "torch.nn.SiLU"},
    "lr": 0.003,
    "transforms": [
        {
            "class_path": "matsciml.datasets.transforms.PeriodicPropertiesTransform",
            "init_args": {"cutoff_radius": 4.5, "adaptive_cutoff": True},
        },
        {"class_path": "matsciml.datasets.transforms.PointCloudToGraphTransform", "init_args": {"backend": "pyg"}},
    ],
}
NORMALIZE = {"energy_per_atom_mean": 0.02845, "energy_per_atom_std": 0.05247}

# (module, class, keyword arguments to try when the defaults are not enough)
OTHER_MONITORS = [
    ("gradients", "GradientCheckCallback", {}),
    ("gradients", "MonitorGradients", {}),
    ("unused", "UnusedParametersCallback", {}),
    ("nan", "ForwardNaNDetection", {"output_path": "{tmp}/nan"}),
    ("helper", "TrainingHelperCallback", {}),
    ("autocorrelation", "ModelAutocorrelation", {}),
    ("loss_spikes", "LossSpikeDetection", {}),
]


def model_config() -> tuple[dict[str, Any], str]:
    path = REPO / "experiments" / "configs" / "models" / "e3nn_small.yaml"
    if path.exists():
        return yaml.safe_load(path.read_text()), str(path.relative_to(REPO))
    return E3NN_SMALL, "built-in copy of e3nn_small"


def make_task_and_data(
    batch_size: int, val_split: float, scheduler_kwargs: dict[str, Any] | None = None
) -> tuple[ScalarRegressionTask, MatSciMLDataModule]:
    cfg, _ = model_config()
    torch.manual_seed(0)
    dm = MatSciMLDataModule.from_devset(
        dset_kwargs={"n": 200, "transforms": instantiate(cfg["transforms"], "transforms")},
        batch_size=batch_size,
        val_split=val_split,
        target_keys=["energy_per_atom"],
    )
    task = ScalarRegressionTask(
        encoder_class=cfg["encoder_class"],
        encoder_kwargs=cfg["encoder_kwargs"],
        output_kwargs=cfg.get("output_kwargs"),
        lr=cfg.get("lr", 1e-3),
        task_keys=["energy_per_atom"],
        normalize_kwargs=NORMALIZE,
        scheduler_kwargs=scheduler_kwargs,
    )
    return task, dm


def other_monitors(tmp: str) -> tuple[list[Callback], list[str], list[str]]:
    """Instances of the other monitors that import, their names, and the reasons for those left out."""
    made, names, missing = [], [], []
    for module_name, class_name, fallback in OTHER_MONITORS:
        try:
            module = importlib.import_module(f"matsciml.lightning.callbacks.{module_name}")
            cls = getattr(module, class_name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{class_name} (not importable: {type(err).__name__})")
            continue
        try:
            made.append(cls())
        except Exception:  # noqa: BLE001 - try the documented required arguments
            try:
                made.append(cls(**{k: v.format(tmp=tmp) for k, v in fallback.items()}))
            except Exception as err:  # noqa: BLE001
                missing.append(f"{class_name} (could not be built with defaults: {err})")
                continue
        names.append(class_name)
    return made, names, missing


class StepTimer(Callback):
    """Clock readings at the start of every training batch and at the end of training.

    ``cpu`` is the CPU time of the training thread (:func:`time.thread_time`): with one
    torch thread all the work runs there, and time spent waiting for a core held by
    another process is not counted, so it is the robust measure on a shared machine.
    """

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())


def run(task, dm, callbacks: list[Callback], steps: int, warmup: int, root: str) -> tuple[float, float]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
        logger=CSVLogger(root, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=dm)
    wall = (timer.wall[-1] - timer.wall[warmup]) / steps
    cpu = (timer.cpu[-1] - timer.cpu[warmup]) / steps
    return wall, cpu


def monitors(tmp: str, only: str | None = None) -> list[Callback]:
    """Fresh instances of every monitor at its default settings (or only the one named ``only``)."""
    others, names, _ = other_monitors(tmp)
    mine = [ThroughputCallback(), PeakMemoryCallback(), TrainingDynamicsReport()]
    every = mine + others
    if only is None:
        return every
    return [cb for cb in every if type(cb).__name__ == only]


def benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    task, dm = make_task_and_data(batch_size=8, val_split=0.2)
    _, source = model_config()
    with tempfile.TemporaryDirectory() as tmp:
        _, present, missing = other_monitors(tmp)
        names = ["ThroughputCallback", "PeakMemoryCallback", "TrainingDynamicsReport", *present]
        variants = ["none", "all"] + (names if args.each else [])
        t0 = time.perf_counter()
        run(task, dm, [], steps=10, warmup=args.warmup, root=tmp)  # untimed: caches, generated code
        results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(args.repeats):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                callbacks = [] if variant == "none" else monitors(tmp, None if variant == "all" else variant)
                results[variant].append(run(task, dm, callbacks, args.steps, args.warmup, tmp))
        total = time.perf_counter() - t0
    base = results["none"]
    print(f"model: {source}; devset n=200, batch 8; {torch.get_num_threads()} torch thread(s)")
    print(f"monitors on in 'all': {', '.join(names)}")
    if missing:
        print(f"left out: {', '.join(missing)}")
    print(f"{args.repeats} rounds of {args.warmup} + {args.steps} steps per run, alternating; total {total:.0f} s")
    print("CPU = CPU time of the training thread; ratios of medians (and of minima) over the rounds\n")
    print(f"{'variant':<26} {'CPU ms/step':>11} {'wall ms/step':>12} {'CPU ratio':>10} {'(min)':>7} {'wall ratio':>10}")
    for variant, rs in results.items():
        cpu = statistics.median(c for _, c in rs)
        wall = statistics.median(w for w, _ in rs)
        ratio = cpu / statistics.median(c for _, c in base)
        ratio_min = min(c for _, c in rs) / min(c for _, c in base)
        wall_ratio = wall / statistics.median(w for w, _ in base)
        print(
            f"{variant:<26} {cpu * 1e3:>11.2f} {wall * 1e3:>12.2f} {ratio:>10.3f} {ratio_min:>7.3f} {wall_ratio:>10.3f}"
        )
    pairs = [a[1] / n[1] for a, n in zip(results["all"], base)]
    print(f"\nper round, all / none (CPU): {' '.join(f'{p:.3f}' for p in pairs)}; goal <= 1.05")


def report(args: argparse.Namespace) -> None:
    """Train briefly with every monitor, EMA and a one-cycle learning rate, and copy the report to ``args.report``."""
    from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    epochs = args.report_epochs
    cfg, _ = model_config()
    one_cycle = {
        "class_path": "torch.optim.lr_scheduler.OneCycleLR",
        "init_args": {"max_lr": float(cfg.get("lr", 1e-3)), "total_steps": epochs * 20, "pct_start": 0.15},
        "interval": "step",
    }
    task, dm = make_task_and_data(batch_size=8, val_split=0.2, scheduler_kwargs=one_cycle)
    with tempfile.TemporaryDirectory() as tmp:
        others, present, missing = other_monitors(tmp)
        for cb in others:  # denser records for a short run
            for attr in ("every_n_steps", "step_frequency"):
                if getattr(cb, attr, None) is not None:
                    setattr(cb, attr, 5)
        callbacks = [
            ExponentialMovingAverageCallback(decay=0.95, evaluate_raw=True),
            ThroughputCallback(every_n_steps=5),
            PeakMemoryCallback(every_n_steps=5),
            TrainingDynamicsReport(every_n_steps=2),
            *others,
        ]
        logger = CSVLogger(tmp, name="devset_e3nn_small", version="report")
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=5,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(task, datamodule=dm)
        produced = Path(logger.log_dir) / "training_dynamics.png"
        out = Path(args.report)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, out)
    print(f"monitors: ThroughputCallback, PeakMemoryCallback, TrainingDynamicsReport, {', '.join(present)}")
    if missing:
        print(f"left out: {', '.join(missing)}")
    print(f"report written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run (default 100)")
    parser.add_argument("--warmup", type=int, default=25, help="untimed steps at the start of each run (default 25)")
    parser.add_argument("--repeats", type=int, default=8, help="rounds of (none, all) runs (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--each", action="store_true", help="also time each monitor alone (longer)")
    parser.add_argument("--report", help="instead of timing, train with every monitor and copy the figure here")
    parser.add_argument("--report-epochs", type=int, default=12, help="epochs of the --report run (default 12)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.report:
        report(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
