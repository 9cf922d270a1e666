"""Training throughput of the default experiment and of the upstream ``egnn_dgl`` model, against a hand loop.

Usage::

    python benchmarks/throughput.py [--rounds 3] [--warm-epochs 3] [--batches N] [--models egnn_small egnn_dgl]
        [--device cpu|cuda]

For each model (``egnn_small``: the default experiment, ``make train``;
``egnn_dgl``: the upstream EGNN settings with their 6.5 Å graphs), on the bundled
devset (batch 16, 960 training structures), three measurements in structures per
second of the training part of an epoch (validation excluded):

(a) **end to end**: the runner (``prepare_experiment`` with
    ``experiments/configs/experiments/devset_energy.yaml`` and
    ``trainer/devset_cpu.yaml``: its callbacks, loggers and checkpointing, the data
    module's defaults), first epoch of a fresh run: the graph cache is cold and filled
    during this epoch;
(b) **warm cache**: each later epoch of the same run (``--warm-epochs``, default 3);
    (``--trainer`` takes another trainer config, e.g. one without the monitoring
    callbacks, to see what they cost);
(c) **floor**: a hand-written PyTorch loop over the same batches already collated in
    memory: the same task (a copy with the same weights, ``task.compute_losses``), the
    same AdamW optimizer, ``zero_grad``/``backward``/``step``, no Lightning, no data
    pipeline; once per epoch of the run, right after it (a, b, b, b, c, c, c, c);
(d) **Lightning's floor**: Lightning's own training loop over the same batches in memory,
    nothing of this project around it: a ``Trainer`` without callbacks, logger, progress
    bar or checkpointing fitting a ``LightningModule`` whose ``training_step`` returns
    ``task.compute_losses(batch)["loss"]`` (same task copy, same optimizer), as many epochs
    as the run; its later epochs over the floors give ``(d)/(c)``, what the framework
    itself costs, and ``(b)/(d)``, what this project adds on top of it.

Also measured: one pass over the training loader of a fresh data module of the
default experiment, twice (cold, then warm cache), and the **data share**: the warm
loader's time per batch over the warm end-to-end time per batch.

The machine may be shared: epoch ``k`` of a run and the ``k``-th floor after it give
the ratio ``(a)/(c)`` (``k = 0``) or ``(b)/(c)`` (time ratios: 1.0 is the floor), and
rounds (fresh runs) repeat the whole. The medians of these paired ratios over all rounds
are printed (a load that comes and goes moves both terms of a pair less than it moves
measurements minutes apart), with the median rates.
Also printed: the fastest warm epoch over the fastest floor of all rounds
(``warm_cache_ratio_best``; a shared machine only ever adds time to a run, so the
minima are the least disturbed measurements of each). The last line is JSON for the
default experiment: ``{"end_to_end_ratio": ..., "warm_cache_ratio": ...,
"warm_cache_ratio_best": ..., "lightning_floor_ratio": ..., "data_share": ...,
"loader_second_pass_ratio": ...}`` (``lightning_floor_ratio`` is the median ``(d)/(c)``).
With ``--device cuda`` (and a GPU) the runs train on the GPU with the runner's loader settings for a GPU
(pinned memory; worker processes unless the graph cache holds the whole data set, see
``matsciml.runner.loader_defaults``); ``--workers N`` sets the number of loader workers instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmark this checkout, installed or not

import lightning.pytorch as pl  # noqa: E402

from matsciml.runner.experiment import prepare_experiment  # noqa: E402

CONFIGS = REPO / "experiments" / "configs"


class EpochClock(pl.Callback):
    """Seconds and structures of the training part of each epoch (epoch start to the last batch's end)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.last_end = 0.0
        self.structures = 0
        self.epochs: list[tuple[float, int, int]] = []  # (seconds, structures, batches)
        self.batches = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.start = self.last_end = time.perf_counter()
        self.structures = self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.last_end = time.perf_counter()
        self.structures += int(batch["batch_size"])
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((self.last_end - self.start, self.structures, self.batches))


def _experiment(model: str, folder: Path) -> Path:
    path = folder / f"devset_{model}.yaml"
    path.write_text(
        f"model: {model}\ndataset:\n  devset:\n    - task: ScalarRegressionTask\n"
        "      targets: [energy_per_atom]\nseed: 0\n"
    )
    return path


TRAINER = CONFIGS / "trainer" / "devset_cpu.yaml"


WORKERS: int | None = None  # --workers: loader worker processes (None: the runner's choice)


def _prepare(model: str, folder: Path, batches: int, device: str, run: str, epochs: int = 2):
    overrides = [f"trainer.experiment.max_epochs.{epochs}", f"trainer.generic.max_epochs.{epochs}"]
    if batches:
        overrides.append(f"trainer.experiment.limit_train_batches.{batches}")
    if device == "cuda":
        overrides.append("trainer.experiment.accelerator.gpu")
    if WORKERS is not None:
        overrides.append(f"dataset.experiment.num_workers.{WORKERS}")
    return prepare_experiment(
        _experiment(model, folder),
        TRAINER,
        overrides=overrides,
        run_dir=folder / run,
    )


def collated_batches(datamodule, batches: int, device: str) -> list:
    """The batches of one pass over the training loader, collated (and on the device) before any timing."""
    loader = datamodule.train_dataloader()
    loader.set_epoch(1)
    data = []
    for k, batch in enumerate(loader):
        if batches and k >= batches:
            break
        data.append(batch)
    if device == "cuda":
        from lightning.fabric.utilities.apply_func import move_data_to_device

        data = [move_data_to_device(b, torch.device("cuda")) for b in data]
    return data


def task_copy(task, device: str = "cpu"):
    """A new task on ``device`` with ``task``'s hyperparameters and weights (no trainer, no callbacks' hooks on it)."""
    try:
        fresh = type(task)(**dict(task.hparams))
        fresh.load_state_dict(task.state_dict())
    except Exception:  # noqa: BLE001 - a task that cannot be rebuilt from its hyperparameters
        fresh = copy.deepcopy(task)
        for module in fresh.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
    return fresh.to(device)


def task_optimizer(task) -> torch.optim.Optimizer:
    """The optimizer of ``task.configure_optimizers()`` (its scheduler, if any, is left out)."""
    config = task.configure_optimizers()
    return config["optimizer"] if isinstance(config, dict) else config[0][0] if isinstance(config, tuple) else config


def hand_loop(task, data: list, device: str) -> float:
    """(c): seconds per structure of a plain loop over batches already in memory."""
    task.train()
    optimizer = task_optimizer(task)
    structures = sum(int(b["batch_size"]) for b in data)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in data:
        optimizer.zero_grad(set_to_none=True)
        loss = task.compute_losses(batch)["loss"]
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / structures


class BareStep(pl.LightningModule):
    """A ``LightningModule`` around a task: ``training_step`` is ``compute_losses``'s loss, nothing else."""

    def __init__(self, task) -> None:
        super().__init__()
        self.task = task

    def training_step(self, batch, batch_idx):
        return self.task.compute_losses(batch)["loss"]

    def configure_optimizers(self):
        return task_optimizer(self.task)


class InMemory:
    """The batches of one epoch, in memory, for ``Trainer.fit`` (no data pipeline)."""

    def __init__(self, data: list) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def lightning_floor(task, data: list, device: str, epochs: int) -> list[float]:
    """(d): seconds per structure of each epoch of a bare ``Trainer`` over batches already in memory."""
    clock = EpochClock()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(BareStep(task), train_dataloaders=InMemory(data))
    return [s / n for s, n, _ in clock.epochs]


def end_to_end(model: str, folder: Path, batches: int, device: str, run: str, warm_epochs: int = 3) -> dict:
    """(a)-(d): a fresh runner run of ``1 + warm_epochs`` epochs, then as many floors of each kind; s per structure."""
    prepared = _prepare(model, folder, batches, device, run, epochs=1 + warm_epochs)
    clock = EpochClock()
    prepared.trainer.callbacks.append(clock)
    prepared.trainer.fit(prepared.task, datamodule=prepared.datamodule)
    times = [s / n for s, n, _ in clock.epochs]
    data = collated_batches(prepared.datamodule, batches, device)
    task = task_copy(prepared.task, device)
    return {
        "cold": times[0],
        "warm": times[1:],
        "floor": [hand_loop(task, data, device) for _ in range(1 + warm_epochs)],
        "lightning": lightning_floor(task_copy(prepared.task, device), data, device, 1 + warm_epochs),
        "workers": prepared.datamodule.num_workers,
        "warm_per_batch": [s / b for s, _, b in clock.epochs[1:]],
    }


def loader_passes(folder: Path, run: str) -> tuple[float, float, float]:
    """Seconds per batch of two passes over the default experiment's training loader (fresh data module)."""
    prepared = prepare_experiment(CONFIGS / "experiments" / "devset_energy.yaml", TRAINER, run_dir=folder / run)
    loader = prepared.datamodule.train_dataloader()
    times = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(1 for _ in loader)
        times.append((time.perf_counter() - start) / count)
    return times[0], times[1], times[1] / times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians are reported)")
    parser.add_argument("--batches", type=int, default=0, help="training batches per epoch (0: the whole epoch)")
    parser.add_argument("--warm-epochs", type=int, default=3, help="epochs after the first (each paired with a floor)")
    parser.add_argument("--models", nargs="+", default=["egnn_small", "egnn_dgl"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--trainer", type=Path, default=None, help="trainer config (default: trainer/devset_cpu.yaml)")
    parser.add_argument("--workers", type=int, default=None, help="loader worker processes (default: the runner's)")
    args = parser.parse_args()
    global TRAINER, WORKERS
    WORKERS = args.workers
    if args.trainer is not None:
        TRAINER = args.trainer
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU available")
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"torch {torch.__version__}, lightning {pl.__version__}, threads {torch.get_num_threads()}, {args.device}")
    results: dict[str, dict[str, list[float]]] = {
        m: {"a": [], "b": [], "c": [], "d": [], "wb": [], "a/c": [], "b/c": [], "d/c": [], "b/d": []}
        for m in args.models
    }
    loader: dict[str, list[float]] = {"first": [], "second": [], "ratio": [], "share": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ.setdefault("MATSCIML_CACHE", str(Path.home() / ".cache" / "matsciml"))
        for r in range(args.rounds):
            first, second, ratio = loader_passes(folder, f"loader{r}")
            for key, value in zip(("first", "second", "ratio"), (first, second, ratio)):
                loader[key].append(value)
            for model in args.models:
                run = end_to_end(model, folder, args.batches, args.device, f"{model}{r}", args.warm_epochs)
                print(f"{model}: {run['workers']} loader worker process(es)", flush=True)
                res = results[model]
                res["a"].append(run["cold"])
                res["a/c"].append(run["cold"] / run["floor"][0])
                for warm, floor, bare, per_batch in zip(
                    run["warm"], run["floor"][1:], run["lightning"][1:], run["warm_per_batch"]
                ):
                    res["b"].append(warm)
                    res["c"].append(floor)
                    res["d"].append(bare)
                    res["d/c"].append(bare / floor)
                    res["b/d"].append(warm / bare)
                    res["wb"].append(per_batch)
                    res["b/c"].append(warm / floor)
                    if model == args.models[0]:
                        loader["share"].append(second / per_batch)
            line = ", ".join(
                f"{m} b/c " + " ".join(f"{v:.3f}" for v in results[m]["b/c"][-args.warm_epochs :]) for m in args.models
            )
            print(f"round {r + 1}/{args.rounds} done: {line}", flush=True)

    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in results.items()}
    print(
        f"\nmedians over {args.rounds} rounds of {args.warm_epochs} warm epochs, structures per second (batch 16, "
        "devset); ratios: medians of the ratios of each epoch to its floor"
    )
    print(
        f"{'model':12s} {'(a) end to end':>15s} {'(b) warm cache':>15s} {'(c) hand loop':>14s} "
        f"{'(d) Lightning':>14s} {'a/c':>6s} {'b/c':>6s} {'d/c':>6s} {'b/d':>6s}"
    )
    for model, m in med.items():
        print(
            f"{model:12s} {1 / m['a']:15.1f} {1 / m['b']:15.1f} {1 / m['c']:14.1f} {1 / m['d']:14.1f} "
            f"{m['a/c']:6.3f} {m['b/c']:6.3f} {m['d/c']:6.3f} {m['b/d']:6.3f}"
        )
    best = {m: min(d["b"]) / min(d["c"]) for m, d in results.items()}
    print(
        "best of all epochs (the fastest warm epoch over the fastest floor; other processes only ever add time): "
        + ", ".join(f"{m} b/c {v:.3f}" for m, v in best.items())
    )
    first, second = statistics.median(loader["first"]), statistics.median(loader["second"])
    print(
        f"\ndefault experiment's training loader: first pass {1e3 * first:.2f} ms/batch, second pass "
        f"{1e3 * second:.2f} ms/batch, ratio {statistics.median(loader['ratio']):.3f}"
    )
    default = med[args.models[0]]
    share = statistics.median(loader["share"])
    print(f"data pipeline share of a warm step ({args.models[0]}): {100 * share:.1f} %")
    print(
        json.dumps(
            {
                "end_to_end_ratio": round(default["a/c"], 4),
                "warm_cache_ratio": round(default["b/c"], 4),
                "warm_cache_ratio_best": round(best[args.models[0]], 4),
                "lightning_floor_ratio": round(default["d/c"], 4),
                "data_share": round(share, 4),
                "loader_second_pass_ratio": round(statistics.median(loader["ratio"]), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
