"""Two-process DDP run (gloo, CPU) of the multi-task module with SAM and EMA, started by ``test_multitask.py``.

Usage: ``python _multitask_ddp_worker.py OUT_DIR``. The ranks see different batches, and at some
steps one rank has no structure of dataset ``b``: its pair is absent there. Each rank writes
``rank<r>.pt`` with its final raw and EMA weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import _multitask_helpers as helpers  # noqa: E402
from helpers import ItemsDataset, ddp_trainer  # noqa: E402

RHO = 0.05
#: (structures of "a", structures of "b") per step and rank; "b" is absent on one rank at steps 1 and 2
SIZES = {0: [(3, 2), (2, 0), (3, 3), (2, 2)], 1: [(2, 3), (3, 2), (2, 0), (3, 2)]}


def rank_batches(rank: int) -> list[dict]:
    a = helpers.samples(20, ("y",), seed=10 + rank)
    b = helpers.samples(20, ("u", "v"), seed=20 + rank)
    return helpers.pair_batches(SIZES[rank], a, b)


def make_module():
    torch.manual_seed(0)
    module = helpers.two_pair_module().double()

    def train_dataloader():
        return torch.utils.data.DataLoader(ItemsDataset(rank_batches(module.global_rank)), batch_size=None)

    module.train_dataloader = train_dataloader
    return module


def main(out_dir: str) -> None:
    from matsciml.lightning.callbacks import SAM, ExponentialMovingAverageCallback

    module = make_module()
    ema = ExponentialMovingAverageCallback(decay=0.7)
    trainer = ddp_trainer(out_dir, [SAM(rho=RHO), ema], len(SIZES[0]))
    trainer.fit(module)
    torch.save(
        {"raw": ema.raw_state_dict(), "ema": ema.ema_state_dict()}, Path(out_dir) / f"rank{trainer.global_rank}.pt"
    )


if __name__ == "__main__":
    main(sys.argv[1])
