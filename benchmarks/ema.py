"""Milliseconds per EMA update: this project's callback next to the usual alternatives.

Compared, in one run, on the same weights:

* ``floor``: one bare ``torch._foreach_lerp_`` over the parameter list (the least any
  EMA can do);
* ``matsciml``: :class:`~matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback`,
  through its real hook (``on_train_batch_end`` after an optimizer step);
* ``torch-ema``: ``torch_ema.ExponentialMovingAverage.update()``;
* ``AveragedModel``: ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))``;
* ``Lightning``: ``lightning.pytorch.callbacks.EMAWeightAveraging``, through its hook.

Models: (a) 60 blocks of Linear(256) + LayerNorm (3.98 M parameters, 240 tensors) and
(b) 300 blocks of Linear(128) + LayerNorm (5.03 M parameters, 1,200 tensors). CPU always;
a CUDA column when a GPU is present. Run::

    python benchmarks/ema.py                 # about a minute on 2 CPU threads
    python benchmarks/ema.py --repeats 50 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch_ema
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matsciml.lightning.callbacks.ema import ExponentialMovingAverageCallback  # noqa: E402

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import EMAWeightAveraging
except ImportError:  # pragma: no cover
    EMAWeightAveraging = None

DECAY = 0.99


class Blocks(pl.LightningModule):
    """``num_blocks`` x (Linear(width, width) + LayerNorm(width))."""

    def __init__(self, num_blocks: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(num_blocks)]
        )


def _timer(device: torch.device):
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def measure(updates: dict, device: torch.device, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each ``update()``, timed round-robin so that load changes hit all alike."""
    now = _timer(device)
    for update in updates.values():
        for _ in range(warmup):
            update()
    samples: dict[str, list[float]] = {name: [] for name in updates}
    for _ in range(repeats):
        for name, update in updates.items():
            start = now()
            update()
            samples[name].append((now() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def contenders(module: Blocks) -> dict:
    """name -> zero-argument function making one EMA update of ``module``'s weights."""
    params = [p.detach() for p in module.parameters()]
    out = {}

    floor_ema = [p.clone() for p in params]
    out["floor (foreach_lerp_)"] = lambda: torch._foreach_lerp_(floor_ema, params, 1.0 - DECAY)

    ours = ExponentialMovingAverageCallback(decay=DECAY)
    ours_trainer = SimpleNamespace(global_step=0)
    ours.on_fit_start(ours_trainer, module)
    ours.on_train_start(ours_trainer, module)

    def ours_update():
        ours_trainer.global_step += 1  # an optimizer step happened
        ours.on_train_batch_end(ours_trainer, module, None, None, 0)

    out["matsciml callback"] = ours_update

    shadow = torch_ema.ExponentialMovingAverage(module.parameters(), decay=DECAY)
    out["torch-ema"] = shadow.update

    averaged = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    out["AveragedModel multi"] = lambda: averaged.update_parameters(module)

    if EMAWeightAveraging is not None:
        lightning_ema = EMAWeightAveraging(decay=DECAY)
        lightning_trainer = SimpleNamespace(global_step=0)
        lightning_ema.setup(lightning_trainer, module, "fit")

        def lightning_update():
            lightning_trainer.global_step += 1
            lightning_ema.on_train_batch_end(lightning_trainer, module, None, None, 0)

        out["Lightning EMAWeightAveraging"] = lightning_update
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed updates per contender (median reported)")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    models = {"(a) 60 x Linear(256)+LN": (60, 256), "(b) 300 x Linear(128)+LN": (300, 128)}

    results: dict[tuple[str, str], dict[str, float]] = {}
    for device in devices:
        for label, (blocks, width) in models.items():
            torch.manual_seed(0)
            module = Blocks(blocks, width).to(device)
            n_params = sum(p.numel() for p in module.parameters())
            n_tensors = len(list(module.parameters()))
            label = f"{label} [{n_params / 1e6:.2f} M, {n_tensors} tensors]"
            results[(label, device.type)] = measure(contenders(module), device, args.repeats)

    print(
        f"EMA update, ms per update (median of {args.repeats}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    for (label, device), row in results.items():
        floor = row["floor (foreach_lerp_)"]
        ours = row["matsciml callback"]
        print(f"\n{label} on {device}")
        print(f"  {'':32s} {'ms':>9s} {'x floor':>9s} {'x ours':>9s}")
        for name, ms in row.items():
            print(f"  {name:32s} {ms:9.3f} {ms / floor:9.2f} {ms / ours:9.2f}")


if __name__ == "__main__":
    main()
