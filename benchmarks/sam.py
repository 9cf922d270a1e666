"""Time per optimizer step: plain step, the SAM callback, and a per-parameter-loop SAM.

Usage::

    python benchmarks/sam.py [--steps 30] [--rounds 3] [--width 1024] [--batch 64]

Model: an MLP of about 4 M parameters (LayerNorm + SiLU blocks), AdamW, float32, trained through
``lightning.pytorch.Trainer``. Variants:

- ``plain``: no callback (one forward-backward per step).
- ``SAM``: :class:`matsciml.lightning.callbacks.sam.SAM` (fused ``torch._foreach_*`` perturb / restore,
  second pass through the strategy).
- ``SAM every 2``: the same with ``every_n_steps=2``.
- ``loop SAM``: the approach of the upstream callback (per-parameter Python loops, ``p.data.add_(e)``
  then subtracting ``e`` back, loss recomputed by calling the module directly).

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (on CPU the process's CPU
time, which a machine shared with other jobs disturbs less than wall time; on CUDA wall time with
synchronisation); after 5 warm-up steps, the time per step is half the median time of consecutive
pairs of steps (pairs, since with ``every_n_steps=2`` SAM and plain steps alternate; a median, since
the machine may be shared), and the variants are run interleaved ``--rounds`` times (best kept). The ratio of a SAM step to a plain step is about 2 (two
forward-backward passes; the optimizer step and Lightning's own overhead are paid once).

A second table times the perturbation and the restore alone (everything SAM adds besides the
second forward-backward pass) on the same parameters: fused ``torch._foreach_*`` kernels against
per-parameter loops.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from matsciml.lightning.callbacks.sam import SAM

WARMUP = 5


def make_model(width: int, depth: int, d_in: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width)]
    for _ in range(depth):
        layers += [nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, width)]
    layers += [nn.SiLU(), nn.Linear(width, 1)]
    return nn.Sequential(*layers)


class Regressor(pl.LightningModule):
    def __init__(self, width: int, depth: int, d_in: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make_model(width, depth, d_in)

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        return {"loss": loss, "per_key": {"y": loss.detach()}, "predictions": {}, "batch_size": len(x)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compute_losses(batch)["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class LoopSAM(Callback):
    """The per-parameter-loop approach, for comparison only (subtracts e back, calls the module directly)."""

    def __init__(self, rho: float = 0.05) -> None:
        self.rho = rho

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            norm = torch.stack([p.grad.norm(2) for p in params]).norm(2)
            scale = self.rho / (norm + 1e-12)
            perturbations = []
            for p in params:
                e = p.grad * scale
                p.data.add_(e)
                perturbations.append(e)
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = pl_module.compute_losses(self.batch)["loss"]
            trainer.strategy.backward(loss, optimizer)
        with torch.no_grad():
            for p, e in zip(params, perturbations):
                p.data.sub_(e)


class StepTimer(Callback):
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()  # CPU time of this process: robust to a machine shared with other jobs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0 = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(self._now() - self.t0)


def run(variant: str, args: argparse.Namespace, device: str) -> float:
    cuda = device == "cuda"
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.randn(args.batch, args.d_in, generator=g)
        batches.append((x.to(device), x[:, :1].sin().to(device)))
    data = [batches[i % len(batches)] for i in range(WARMUP + args.steps)]
    callbacks: list[Callback] = []
    if variant == "SAM":
        callbacks.append(SAM(rho=0.05))
    elif variant == "SAM every 2":
        callbacks.append(SAM(rho=0.05, every_n_steps=2))
    elif variant == "loop SAM":
        callbacks.append(LoopSAM(rho=0.05))
    timer = StepTimer(cuda)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_steps=WARMUP + args.steps,
        callbacks=[*callbacks, timer],  # the timer's batch-end runs after the step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    module = Regressor(args.width, args.depth, args.d_in)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    times = timer.times[WARMUP:]
    pairs = [times[i] + times[i + 1] for i in range(0, len(times) - 1, 2)]
    return statistics.median(pairs) / 2


def time_perturbation(args: argparse.Namespace, device: str) -> dict[str, float]:
    """Milliseconds for perturb + restore of the model's parameters: fused kernels vs per-parameter loops."""
    from matsciml.lightning.callbacks._utils.sam_math import WeightBackup, global_norm, perturb_, restore_

    torch.manual_seed(0)
    params = [p.detach().to(device) for p in make_model(args.width, args.depth, args.d_in).parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    backup = WeightBackup()

    def fused() -> None:
        backup.save(params)
        perturb_(params, grads, 0.05)
        torch._foreach_zero_(grads)
        restore_(params, backup.buffers)
        global_norm(grads)  # the finiteness check of the second gradient

    def loops() -> None:
        norm = torch.stack([g.norm(2) for g in grads]).norm(2)
        scale = 0.05 / (norm + 1e-12)
        perturbations = []
        for p, g in zip(params, grads):
            e = g * scale
            p.add_(e)
            perturbations.append(e)
        for g in grads:
            g.zero_()
        for p, e in zip(params, perturbations):
            p.sub_(e)

    out = {}
    for name, fn in (("fused", fused), ("loops", loops)):
        times = []
        for _ in range(WARMUP + args.steps):
            for g in grads:
                g.normal_(0, 1e-3)
            if device == "cuda":
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            else:
                t0 = time.process_time()
                fn()
                times.append(time.process_time() - t0)
        out[name] = statistics.median(times[WARMUP:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--d-in", dest="d_in", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    n_params = sum(p.numel() for p in make_model(args.width, args.depth, args.d_in).parameters())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    variants = ["plain", "SAM", "SAM every 2", "loop SAM"]
    results: dict[str, dict[str, float]] = {}
    perturbation = {device: time_perturbation(args, device) for device in devices}
    for device in devices:
        best = {v: float("inf") for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                best[v] = min(best[v], run(v, args, device))
        results[device] = best
    print(
        f"SAM benchmark: MLP {n_params / 1e6:.2f} M parameters, batch {args.batch}, AdamW, float32, "
        f"{torch.get_num_threads()} CPU threads; median of {args.steps // 2} step pairs, best of {args.rounds} rounds"
    )
    header = f"{'variant':<14}" + "".join(f"{d + ' ms/step':>16}{d + ' ratio':>12}" for d in devices)
    print(header)
    for v in variants:
        row = f"{v:<14}"
        for d in devices:
            row += f"{results[d][v] * 1e3:>16.2f}{results[d][v] / results[d]['plain']:>12.2f}"
        print(row)
    print("goals: SAM ratio <= 2.1 (floor 2.0), SAM every 2 ratio <= 1.6")
    print()
    print(f"{'perturb+restore':<16}" + "".join(f"{d + ' ms':>12}" for d in devices))
    for name in ("fused", "loops"):
        print(f"{name:<16}" + "".join(f"{perturbation[d][name] * 1e3:>12.2f}" for d in devices))


if __name__ == "__main__":
    main()
