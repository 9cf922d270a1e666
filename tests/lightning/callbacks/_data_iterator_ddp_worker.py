"""Two-process DDP run (gloo, CPU) of ``PeriodicDataIteratorCallback``, started by ``test_data_iterator.py``.

Usage: ``python _data_iterator_ddp_worker.py OUT_DIR``. Lightning's ``ddp`` strategy starts the
second process by running this script again. Each rank writes ``rank<r>.pt`` with the gathered
results it received, the module's weights at that moment, and the sample counts at which a
``every_n_samples`` callback fired.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _callback_toys import ToyTask, make_datamodule, make_trainer  # noqa: E402

from matsciml.lightning.callbacks._base.periodic import PeriodicCallback  # noqa: E402
from matsciml.lightning.callbacks.data_iterator import PeriodicDataIteratorCallback  # noqa: E402

N, TEST_FRACTION, BATCH = 29, 0.31, 2  # 9 test structures: one padded repeat on two ranks


class Keep(PeriodicDataIteratorCallback):
    def process_results(self, results, *, trainer, pl_module, interval_type, interval):
        self.results = results
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class Samples(PeriodicCallback):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[int] = []

    def periodic(self, trainer, pl_module, interval_type, interval):
        self.calls.append(interval)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    keep = Keep("test", every_n_epochs=1, batch_size=BATCH)
    samples = Samples(every_n_samples=10)
    trainer = make_trainer(out, [keep, samples], devices=2, strategy="ddp", max_epochs=1)
    trainer.fit(ToyTask(), datamodule=make_datamodule(n=N, test=TEST_FRACTION, batch_size=BATCH))
    torch.save(
        {"results": keep.results, "weights": keep.weights, "samples": samples.calls, "world": trainer.world_size},
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
