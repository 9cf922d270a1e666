"""Training throughput (graphs, atoms and edges per second) and where the time of a step goes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common import graph as graph_ops
from matsciml.common.checks import check_int
from matsciml.lightning.callbacks._utils.names import THROUGHPUT_GRAPHS, THROUGHPUT_PREFIX
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_scalars
from matsciml.lightning.checkpointing import atomic_write_text

__all__ = ["ThroughputCallback", "batch_counts"]


def _shape_count(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else 1
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def batch_counts(batch: Any, batch_size: int | None = None) -> tuple[int | None, int | None, int | None]:
    """``(graphs, atoms, edges)`` in a batch, read from tensor shapes (no device synchronisation).

    Parameters
    ----------
    batch
        A matsciml batch (``{"graph": PyG Batch or DGL graph, "natoms": [B], ...}``, see
        :mod:`matsciml.datasets.schema`), a bare graph, or anything else.
    batch_size
        Number of structures to assume when the batch does not tell.

    Returns
    -------
    tuple
        Number of structures (``len(batch["natoms"])``, else the graph's ``num_graphs``,
        else ``batch["batch_size"]``, else ``batch_size``), of atoms (nodes of the graph,
        else ``batch["natoms"].sum()`` when it lies on the CPU) and of directed edges
        (``edge_index.shape[1]``). ``None`` where the batch does not tell.
    """
    graphs = atoms = edges = None
    graph = None
    if isinstance(batch, dict):
        graph = batch.get("graph")
        natoms = batch.get("natoms")
        if isinstance(natoms, torch.Tensor):
            graphs = _shape_count(natoms)
            if graph is None and natoms.device.type == "cpu":
                atoms = int(natoms.sum())
        if graphs is None and isinstance(batch.get("batch_size"), int):
            graphs = int(batch["batch_size"])
    elif hasattr(batch, "edge_index") or graph_ops.is_dgl_graph(batch):
        graph = batch
    if graph is not None:
        try:
            if graph_ops.is_dgl_graph(graph):
                atoms, edges = int(graph.num_nodes()), int(graph.num_edges())
            else:
                atoms = int(graph_ops.positions(graph).shape[0])
                edges = int(graph_ops.edge_index(graph).shape[1])
            if graphs is None:
                graphs = graph_ops.num_graphs(graph)
        except (AttributeError, KeyError, TypeError):
            pass
    if graphs is None and batch_size is not None:
        graphs = int(batch_size)
    return graphs, atoms, edges


class ThroughputCallback(Callback):
    """Structures, atoms and edges processed per second, and the split of a step's time.

    Every training batch is timed with :func:`time.perf_counter` at four points and
    counted from tensor shapes (:func:`batch_counts`); every ``every_n_steps`` optimizer
    steps the window since the last record is summarised and logged to every logger
    (:func:`~matsciml.lightning.callbacks._utils.reporting.log_scalars`):

    ============================== =========================================================
    ``throughput/graphs_per_s``    structures per second over the window, all ranks
    ``throughput/atoms_per_s``     atoms (graph nodes) per second, all ranks
    ``throughput/edges_per_s``     directed edges per second, all ranks
    ``time/data_s``                mean seconds per batch between the end of one batch and
                                   the start of the next: loading and collating the batch,
                                   moving it to the device, Lightning's logging and
                                   step-interval LR schedulers
    ``time/forward_backward_s``    mean seconds per batch from ``on_train_batch_start`` to
                                   ``on_before_optimizer_step`` (forward, loss, backward;
                                   the whole batch when no optimizer step follows, under
                                   gradient accumulation)
    ``time/optimizer_s``           mean seconds per batch from ``on_before_optimizer_step``
                                   to ``on_train_batch_end``: gradient clipping and
                                   ``optimizer.step``
    ============================== =========================================================

    The rates divide counts by the window's summed step time (data + forward/backward +
    optimizer); validation and the gap across an epoch boundary are left out. Under a
    multi-process strategy the counts are summed over the ranks and the time is the
    slowest rank's (one small all-reduce per record); the time split is rank 0's.

    Hooks it acts in (each callback's hooks run in list order, so other callbacks'
    work in the same hook is attributed to the part it falls in: SAM's second pass in
    ``on_before_optimizer_step``, listed before this callback, counts as
    forward/backward; EMA's update in ``on_train_batch_end`` counts as optimizer time
    when listed before it, and as data time when listed after):

    * ``on_train_start``: starts an empty window at the current step;
    * ``on_train_epoch_start``: starts the clock of the first batch's data time;
    * ``on_train_batch_start``, ``on_before_optimizer_step``, ``on_train_batch_end``:
      read the clock, count the batch; on a record step, synchronise the CUDA device
      (only then: the parts of single steps are host times and approximate on CUDA,
      while the window's total, hence the rates, is exact), reduce across ranks, log;
    * ``on_validation_start``: drops the pending data time (validation is not training);
    * ``on_fit_end``: writes the records to ``<log_dir>/throughput.json`` when
      ``log_dir`` is given (rank 0, atomically).

    Parameters
    ----------
    log_dir
        Folder for ``throughput.json`` (the list of records: step, rates, time split),
        created when needed; default ``None``: no file (the scalars still go to the
        loggers, and the records to :attr:`history`).
    batch_size
        Structures per batch to assume for batches that do not carry ``natoms`` or a
        graph (e.g. a plain tensor batch); default ``None``: read it from the batch.
    every_n_steps
        Optimizer steps between two records, default ``50``.

    Attributes
    ----------
    history : list[dict]
        Every record: ``{"step", "graphs_per_s", "atoms_per_s", "edges_per_s",
        "data_s", "forward_backward_s", "optimizer_s", "batches", "elapsed_s"}``
        (keys whose count the batches did not give are absent).

    Raises
    ------
    ConfigError
        ``every_n_steps`` or ``batch_size`` is not a positive integer (at construction).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ThroughputCallback
              init_args: {every_n_steps: 50}

    and in Python::

        trainer = pl.Trainer(callbacks=[ThroughputCallback(log_dir="throughput")], logger=CSVLogger("logs"))
    """

    def __init__(
        self, log_dir: str | os.PathLike | None = None, batch_size: int | None = None, every_n_steps: int = 50
    ) -> None:
        super().__init__()
        check_int(every_n_steps, "every_n_steps", "ThroughputCallback")
        check_int(batch_size, "batch_size", "ThroughputCallback", optional=True)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []
        self._warner = RateLimitedWarner(min_interval_steps=10**9, max_per_key=1)
        self._reset_window()
        self._last_end: float | None = None  # clock at the end of the previous batch (None: not timed)
        self._start: float | None = None
        self._opt: float | None = None
        self._last_step: int | None = None

    def _reset_window(self) -> None:
        self._batches = 0
        self._counts: list[int | None] = [0, 0, 0]  # graphs, atoms, edges (None once a batch lacked it)
        self._times = [0.0, 0.0, 0.0]  # data, forward+backward, optimizer

    def _count(self, batch: Any, step: int) -> None:
        counts = batch_counts(batch, self.batch_size)
        for i, value in enumerate(counts):
            if value is None or self._counts[i] is None:
                self._counts[i] = None
            else:
                self._counts[i] += value
        if counts[0] is None:
            self._warner.warn(
                "graphs",
                "ThroughputCallback: the batch carries no 'natoms' or graph; pass batch_size=... to get "
                + THROUGHPUT_GRAPHS,
                step,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_window()
        self._last_step = trainer.global_step  # restored by then when resuming
        self._start = self._opt = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = perf_counter()
        if self._last_end is not None:
            self._times[0] += now - self._last_end
        self._start = now
        self._opt = None
        self._count(batch, trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._opt is None:  # closures that run several times (LBFGS): keep the first
            self._opt = perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        record = step != self._last_step and step > 0 and step % self.every_n_steps == 0
        if record and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = perf_counter()
        if self._start is None:  # no batch start seen (should not happen): skip this batch
            self._last_end = now
            return
        middle = self._opt if self._opt is not None else now
        self._times[1] += middle - self._start
        self._times[2] += now - middle
        self._batches += 1
        self._last_end = now
        self._start = None
        if step != self._last_step:
            self._last_step = step
            if record:
                self._record(trainer, pl_module, step)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        elapsed = sum(self._times)
        counts = [float(c) if c is not None else float("nan") for c in self._counts]
        if trainer.world_size > 1:
            device = pl_module.device
            counts = trainer.strategy.reduce(torch.tensor(counts, device=device), reduce_op="sum").tolist()
            elapsed = float(trainer.strategy.reduce(torch.tensor(elapsed, device=device), reduce_op="max"))
        record: dict[str, float] = {"step": float(step), "batches": float(self._batches), "elapsed_s": elapsed}
        metrics: dict[str, float] = {}
        if elapsed > 0:
            for name, count in zip(("graphs", "atoms", "edges"), counts):
                if not math.isnan(count):
                    record[f"{name}_per_s"] = metrics[f"{THROUGHPUT_PREFIX}{name}_per_s"] = count / elapsed
        if self._batches:
            for name, total in zip(("data_s", "forward_backward_s", "optimizer_s"), self._times):
                record[name] = metrics[f"time/{name}"] = total / self._batches
        self.history.append(record)
        log_scalars(trainer, metrics, step=step)
        self._reset_window()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_dir is None or not trainer.is_global_zero:
            return
        atomic_write_text(self.log_dir / "throughput.json", json.dumps(self.history, indent=1))
