"""Do EMA and SAM help on materials data? Train {plain, EMA, SAM, EMA+SAM} x seeds x datasets and compare.

Usage::

    python benchmarks/ablation.py --quick                  # devset, 2 seeds, 3 epochs: a few minutes
    python benchmarks/ablation.py                          # the full study (resumable: rerun to continue)
    python benchmarks/ablation.py --datasets devset oqmd_band_gap --seeds 0 1 2 --epochs 10

Every run goes through the experiment runner (:func:`matsciml.runner.experiment.run_experiment`)
with the shipped model and dataset configs; only what the study varies is changed:

* the **variant**: no callback (``plain``), :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback`
  (``ema``, documented defaults ``decay=0.99``, no warm-up, with ``evaluate_raw=True`` so that the raw
  weights are evaluated next to the EMA at every validation), :class:`~matsciml.lightning.callbacks.sam.SAM`
  (``sam``, documented defaults ``rho=0.05``, ``adaptive=False``), or both (``ema+sam``);
* the **seed**: the global seed, the split (train/val/test fractions of the data set) and the training
  order; every variant sees the same split and order for a given seed, so variants are compared in pairs;
* the **learning-rate policy** and **run length** (devset only, for plain and EMA): ``cosine``
  (the shipped CosineAnnealingLR, annealed to zero over the run) or ``constant`` (no scheduler), for
  ``--epochs`` and twice as many epochs;
* one **sweep** of EMA ``decay`` and SAM ``rho`` (devset only).

Everything else is fixed: the model (``egnn_small``: the encoder of ``make train``), its learning rate, the
batch size, the number of epochs, the checkpoint rule (lowest ``val_loss``). Each finished run writes
``<out>/runs/<run id>/result.json`` (atomically); a rerun skips those, so an interrupted study continues
where it stopped; several processes started with the same command share the work (each run is claimed
before it is trained). At the end (and with ``--report-only``) the script writes ``<out>/ablation.csv`` (one row
per run and target), ``<out>/ablation.md`` (mean +/- std per cell and paired differences against
``plain`` with a t interval over seeds) and one chart per data set under ``--charts`` (see
``benchmarks/ablation_report.py``).

Data sets (``--datasets``; real labels): ``devset`` (EMT alloys, energy per atom), ``devset_forces``
(energy and forces), ``oqmd_band_gap``, ``alexandria_e_form``, ``lips_forces`` (energy and forces),
``carolina_e_form`` (the upstream Carolina LMDB devset, read by this package's upstream reader; a set that cannot
be read is skipped with the reason).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_report import write_report  # noqa: E402

from matsciml.common.atomic import atomic_write_text  # noqa: E402

CONFIGS = ROOT / "experiments" / "configs"
VARIANTS = ("plain", "ema", "sam", "ema+sam")
EMA_DEFAULTS = {"decay": 0.99, "warmup": "none"}
SAM_DEFAULTS = {"rho": 0.05, "adaptive": False}
SWEEP_DECAYS = (0.9, 0.999)
SWEEP_RHOS = (0.01, 0.2)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One data set of the study.

    Attributes
    ----------
    dataset
        Name of a shipped dataset config (``experiments/configs/datasets/<name>.yaml``), or of the
        inline config ``inline`` (written next to the runs).
    task, targets
        Task class name and its targets.
    units
        Per target: ``(display unit, factor from data units)``.
    cutoff
        Cutoff radius (Å) of the model's periodic graph, when it differs from the model config's.
    epoch_factor
        Epochs of this set = ``epoch_factor`` x ``--epochs``: the small sets take more epochs, so that
        every set gets a few hundred optimizer steps.
    inline
        A dataset config for sets without a shipped one.
    """

    dataset: str
    task: str
    targets: tuple[str, ...]
    units: dict[str, tuple[str, float]]
    cutoff: float | None = None
    epoch_factor: int = 1
    inline: dict[str, Any] | None = None


def _extxyz_config(path: str, target: str, mean: float, std: float, **extra: Any) -> dict[str, Any]:
    section = {"train_path": path, "batch_size": 16, "val_split": 0.2, **extra}
    return {
        "dataset": "StructureDataset",
        "debug": dict(section),
        "experiment": dict(section),
        "target_keys": [target],
        "task_args": {"normalize_kwargs": {f"{target}_mean": mean, f"{target}_std": std}},
    }


MEV = ("meV/atom", 1000.0)
DATASETS: dict[str, DatasetSpec] = {
    "devset": DatasetSpec("devset", "ScalarRegressionTask", ("energy_per_atom",), {"energy_per_atom": MEV}),
    "devset_forces": DatasetSpec(
        "devset", "ForceRegressionTask", ("energy", "forces"), {"energy": ("meV", 1000.0), "forces": ("meV/Å", 1000.0)}
    ),
    "oqmd_band_gap": DatasetSpec(
        "oqmd_devset", "ScalarRegressionTask", ("band_gap",), {"band_gap": ("meV", 1000.0)}, cutoff=5.0, epoch_factor=4
    ),
    "alexandria_e_form": DatasetSpec(
        "alexandria_devset",
        "ScalarRegressionTask",
        ("e_form",),
        {"e_form": MEV},
        cutoff=5.0,
        epoch_factor=8,
        # mean and std of e_form over the 98 structures of the file (eV/atom)
        inline=_extxyz_config("tests/data/alexandria_devset.extxyz", "e_form", -0.0975, 0.4909),
    ),
    "lips_forces": DatasetSpec(
        "lips_devset",
        "ForceRegressionTask",
        ("energy", "forces"),
        {"energy": ("meV", 1000.0), "forces": ("meV/Å", 1000.0)},
        cutoff=5.0,
        epoch_factor=2,
    ),
    "carolina_e_form": DatasetSpec(
        "carolina_devset",
        "ScalarRegressionTask",
        ("energy",),
        {"energy": MEV},
        cutoff=5.0,
        epoch_factor=8,
        # mean and std of the formation energy over the 100 structures of the devset (eV/atom)
        inline=_extxyz_config("tests/data/upstream/carolina_db", "energy", -0.3923, 1.0878),
    ),
}
DEFAULT_DATASETS = ("devset", "oqmd_band_gap", "alexandria_e_form", "carolina_e_form", "devset_forces", "lips_forces")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study."""

    group: str  # "main", "sweep" or "regime"
    dataset: str
    variant: str
    seed: int
    lr_policy: str = "cosine"
    epochs: int = 10
    decay: float = EMA_DEFAULTS["decay"]
    rho: float = SAM_DEFAULTS["rho"]
    limit_batches: int | None = None

    @property
    def run_id(self) -> str:
        parts = [self.dataset, self.variant.replace("+", "_"), self.lr_policy, f"e{self.epochs}"]
        if self.limit_batches:
            parts.append(f"b{self.limit_batches}")
        if "ema" in self.variant:
            parts.append(f"d{self.decay:g}")
        if "sam" in self.variant:
            parts.append(f"r{self.rho:g}")
        return "-".join(parts + [f"s{self.seed}"])


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the study, in the order that keeps a stopped study most useful.

    The main comparison on the first data set; on the devset, plain and EMA with a constant learning rate of
    the same length; the main comparison on the other data sets; the runs twice as long; the sweep.
    """
    lb = args.limit_batches

    def main(dataset: str) -> list[Run]:
        epochs = args.epochs * DATASETS[dataset].epoch_factor
        return [Run("main", dataset, v, s, "cosine", epochs, limit_batches=lb) for s in args.seeds for v in VARIANTS]

    def regime(policy: str, epochs: int) -> list[Run]:
        return [
            Run("regime", "devset", v, s, policy, epochs, limit_batches=lb)
            for s in args.seeds
            for v in ("plain", "ema")
        ]

    first, rest = args.datasets[:1], args.datasets[1:]
    with_devset = not args.quick and "devset" in args.datasets
    regimes = with_devset and not args.no_regimes
    runs = [r for d in first for r in main(d)]
    runs += regime("constant", args.epochs) if regimes else []
    runs += [r for d in rest for r in main(d)]
    if regimes:
        runs += regime("cosine", 2 * args.epochs) + regime("constant", 2 * args.epochs)
    if with_devset and not args.no_sweep:
        for s in args.seeds:
            runs += [
                Run("sweep", "devset", "ema", s, "cosine", args.epochs, decay=d, limit_batches=lb) for d in SWEEP_DECAYS
            ]
            runs += [
                Run("sweep", "devset", "sam", s, "cosine", args.epochs, rho=r, limit_batches=lb) for r in SWEEP_RHOS
            ]
    return runs


def _claim(out: Path, run: Run) -> bool:
    """Claim ``run`` for this process (several processes may share ``out``); ``False`` if a live one holds it."""
    path = out / "runs" / f".{run.run_id}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            with open(path, "x", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                os.kill(int(path.read_text(encoding="utf-8") or 0), 0)
                return False  # its process is alive
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # left by a process that is gone
    return False


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def _configs(run: Run, out: Path) -> tuple[Path, Path, Path, Path]:
    """Write the experiment, trainer, model-folder and dataset-folder configs of ``run``."""
    spec = DATASETS[run.dataset]
    folder = out / "configs" / f"{run.dataset}-{run.lr_policy}-e{run.epochs}"
    model = yaml.safe_load((CONFIGS / "models" / "egnn_small.yaml").read_text(encoding="utf-8"))
    if run.lr_policy == "cosine":
        model["scheduler_kwargs"] = {
            "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "init_args": {"T_max": run.epochs},
        }
    else:
        model.pop("scheduler_kwargs", None)
    if spec.cutoff is not None:
        for transform in model.get("transforms", []):
            if transform["class_path"].endswith("PeriodicPropertiesTransform"):
                transform["init_args"]["cutoff_radius"] = spec.cutoff
    _write_yaml(folder / "models" / "ablation_model.yaml", model)
    if spec.inline is not None:
        dataset = copy.deepcopy(spec.inline)
        dataset["experiment"]["train_path"] = str(ROOT / dataset["experiment"]["train_path"])
        dataset["debug"]["train_path"] = dataset["experiment"]["train_path"]
    else:
        dataset = yaml.safe_load((CONFIGS / "datasets" / f"{spec.dataset}.yaml").read_text(encoding="utf-8"))
        for section in ("debug", "experiment"):
            if "train_path" in dataset.get(section, {}):
                dataset[section]["train_path"] = str(ROOT / dataset[section]["train_path"])
    dataset["experiment"].update({"seed": run.seed, "val_split": 0.2, "test_split": 0.2})
    _write_yaml(folder / "datasets" / f"{spec.dataset}.yaml", dataset)
    experiment = {
        "model": "ablation_model",
        "dataset": {spec.dataset: [{"task": spec.task, "targets": list(spec.targets)}]},
        "seed": run.seed,
    }
    exp_path = _write_yaml(out / "runs" / ".configs" / f"{run.run_id}.experiment.yaml", experiment)
    callbacks: list[dict[str, Any]] = []
    if "sam" in run.variant:
        callbacks.append(
            {"class_path": "matsciml.lightning.callbacks.SAM", "init_args": {**SAM_DEFAULTS, "rho": run.rho}}
        )
    if "ema" in run.variant:
        callbacks.append(
            {
                "class_path": "matsciml.lightning.callbacks.ExponentialMovingAverageCallback",
                "init_args": {**EMA_DEFAULTS, "decay": run.decay, "evaluate_raw": True},
            }
        )
    callbacks.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val_loss", "save_top_k": 1, "save_last": False},
        }
    )
    generic: dict[str, Any] = {
        "max_epochs": run.epochs,
        "log_every_n_steps": 10,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    if run.limit_batches:
        generic["limit_train_batches"] = run.limit_batches
    trainer = {
        "generic": generic,
        "experiment": {"accelerator": "cpu", "devices": 1},
        "callbacks": callbacks,
        "loggers": [{"class_path": "lightning.pytorch.loggers.CSVLogger"}],
    }
    trainer_path = _write_yaml(out / "runs" / ".configs" / f"{run.run_id}.trainer.yaml", trainer)
    return exp_path, trainer_path, folder / "models", folder / "datasets"


def _epoch_rows(metrics_csv: Path) -> dict[int, dict[str, float]]:
    """Per epoch, the last finite value of every logged column of Lightning's CSV logger."""
    import csv

    epochs: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if not row.get("epoch"):
                continue
            values = epochs.setdefault(int(float(row["epoch"])), {})
            for key, value in row.items():
                if value not in ("", None) and key not in ("epoch", "step"):
                    number = float(value)
                    if math.isfinite(number):
                        values[key] = number
    return epochs


def execute(run: Run, out: Path) -> dict[str, Any]:
    """Train ``run``, evaluate its best checkpoint on the test split, and return its result record."""
    from matsciml.runner.experiment import run_experiment
    from matsciml.runner.summary import mean_predictor_mae, model_mae

    spec = DATASETS[run.dataset]
    run_dir = out / "runs" / run.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt: start it again
    exp, trainer, models, datasets = _configs(run, out)
    _quiet()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_experiment(exp, trainer, models, datasets, seed=run.seed, run_dir=run_dir)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.preempted is not None:  # SIGTERM: the runner stopped training; this run is redone next time
        raise SystemExit(f"stopped during {run.run_id}; run the same command again to continue")
    dm, task = result.datamodule, result.task  # the task holds the best checkpoint (EMA weights for EMA runs)
    test = model_mae(task, dm.eval_dataloader("test"), list(spec.targets))
    epochs = _epoch_rows(result.metrics_csv)
    ordered = sorted(epochs)
    best_epoch = min(ordered, key=lambda e: epochs[e].get("val_loss", math.inf))
    targets = {}
    for key in spec.targets:
        unit, scale = spec.units[key]
        column = f"val_{key}_mae"
        targets[key] = {
            "unit": unit,
            "best_epoch": best_epoch,
            "val_mae_best": epochs[best_epoch].get(column, math.nan) * scale,
            "val_mae_final": epochs[ordered[-1]].get(column, math.nan) * scale,
            "test_mae": test[key][0] * scale,
            "mean_predictor_test_mae": mean_predictor_mae(dm.datasets["train"], dm.datasets["test"], key)[0] * scale,
            "curve_val_mae": [epochs[e].get(column, math.nan) * scale for e in ordered],
            # losses (normalised units) of the EMA weights and of the raw weights (evaluate_raw)
            "curve_val_loss": [epochs[e].get(f"val_{key}", math.nan) for e in ordered],
            "curve_val_raw_loss": [epochs[e].get(f"val_raw_{key}", math.nan) for e in ordered],
        }
    return {
        "run": dataclasses.asdict(run),
        "run_id": run.run_id,
        "targets": targets,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "steps": int(result.trainer.global_step),
        "n_train": len(dm.datasets["train"]),
        "n_val": len(dm.datasets["val"]),
        "n_test": len(dm.datasets["test"]),
    }


def readable(name: str) -> str | None:
    """``None`` when data set ``name`` can be read, else the reason (one line)."""
    spec = DATASETS[name]
    if spec.inline is None:
        return None
    try:
        from matsciml.datasets import StructureDataset

        data = StructureDataset(str(ROOT / spec.inline["experiment"]["train_path"]))
        sample = data[0]
        missing = [t for t in spec.targets if t not in sample["targets"]]
        if missing:
            return f"its records have no target {missing}"
    except Exception as err:  # any reader failure: report and leave the data set out
        return " ".join(str(err).replace(f"{ROOT}{os.sep}", "").split())[:300]
    return None


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "matsciml"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="devset only, 2 seeds, 3 epochs, 20 batches per epoch")
    parser.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS), metavar="NAME")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the main runs (default 10; quick 3)")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default all)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the devset sweep of decay and rho")
    parser.add_argument("--no-regimes", action="store_true", help="leave out the devset lr-policy x length runs")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/ablation[_quick]")
    parser.add_argument("--charts", type=Path, default=None, help="folder for the PNGs (default <out>/charts)")
    parser.add_argument("--report-only", action="store_true", help="write CSV/markdown/charts from finished runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets = args.datasets or ["devset"]
        args.seeds = args.seeds or [0, 1]
        args.epochs = args.epochs or 3
        args.limit_batches = args.limit_batches or 20
    args.datasets = args.datasets or list(DEFAULT_DATASETS)
    args.seeds = args.seeds or [0, 1, 2]
    args.epochs = args.epochs or 10
    out = args.out or ROOT / "benchmarks" / "results" / ("ablation_quick" if args.quick else "ablation")
    charts = args.charts or out / "charts"
    out.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    _quiet()
    skipped: dict[str, str] = {}
    for name in list(args.datasets):
        reason = readable(name)
        if reason is not None:
            skipped[name] = reason
            args.datasets.remove(name)
            print(f"skipping {name}: {reason}", flush=True)
    runs = [] if args.report_only else plan(args)
    todo = [r for r in runs if not (out / "runs" / r.run_id / "result.json").is_file()]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already finished, {len(todo)} to train -> {out}")
    started = time.perf_counter()
    for i, run in enumerate(todo, 1):
        t0 = time.perf_counter()
        if (out / "runs" / run.run_id / "result.json").is_file() or not _claim(out, run):
            print(f"[{i}/{len(todo)}] {run.run_id}: finished or in progress in another process", flush=True)
            continue
        try:
            record = execute(run, out)
            atomic_write_text(out / "runs" / run.run_id / "result.json", json.dumps(record, indent=1))
        finally:
            (out / "runs" / f".{run.run_id}.claim").unlink(missing_ok=True)
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(todo) - i)
        first = next(iter(record["targets"].values()))
        print(
            f"[{i}/{len(todo)}] {run.run_id}: val MAE {first['val_mae_best']:.4g} {first['unit']} "
            f"(test {first['test_mae']:.4g}), {time.perf_counter() - t0:.0f} s; about {eta / 60:.1f} min left",
            flush=True,
        )
    records = []
    for path in sorted((out / "runs").glob("*/result.json")):
        records.append(json.loads(path.read_text(encoding="utf-8")))
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = "python benchmarks/ablation.py " + " ".join(given)
    paths = write_report(records, out, charts, command=command.strip(), skipped=skipped, datasets=DATASETS)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
