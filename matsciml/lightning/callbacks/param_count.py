"""``ParamCountCallback``: the number of parameters per module group, trainable and frozen, at fit start."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.lightning.callbacks._utils.reporting import log_scalars

__all__ = ["ParamCountCallback", "count_parameters"]


def count_parameters(module: nn.Module, depth: int = 1) -> dict[str, dict[str, int]]:
    """``{group: {"trainable": n, "frozen": n}}`` with groups the module names ``depth`` levels deep.

    Every parameter is counted once (shared parameters under their first name), in the group
    of the first ``depth`` components of its name (``encoder.layers.0.weight`` is in
    ``encoder`` at ``depth=1``, ``encoder.layers`` at ``depth=2``); ``"total"`` sums all.
    """
    groups: dict[str, dict[str, int]] = {}
    for name, param in module.named_parameters():  # named_parameters yields a shared parameter once
        group = ".".join(name.split(".")[:-1][:depth]) or "(root)"
        kind = "trainable" if param.requires_grad else "frozen"
        counts = groups.setdefault(group, {"trainable": 0, "frozen": 0})
        counts[kind] += param.numel()
    total = {k: sum(g[k] for g in groups.values()) for k in ("trainable", "frozen")}
    return {**groups, "total": total}


class ParamCountCallback(Callback):
    """Log the number of trainable and frozen parameters per module group once, at fit start.

    Hooks it acts in: ``on_fit_start``. Metrics ``params/<group>/trainable`` and
    ``params/<group>/frozen`` (and ``params/total/...``) go to every logger at step 0; a
    table goes to the log; the counts are kept in :attr:`counts`.

    Example::

        callbacks:
          - kind: ParamCountCallback
            depth: 2

    Parameters
    ----------
    depth
        How many levels of module names form a group (default 1: ``encoder``, ``output_heads``).
    """

    def __init__(self, depth: int = 1) -> None:
        super().__init__()
        check_int(depth, "depth", "ParamCountCallback")
        self.depth = int(depth)
        self.counts: dict[str, dict[str, int]] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.counts = count_parameters(pl_module, self.depth)
        metrics: dict[str, Any] = {}
        lines = [f"{'group':<40} {'trainable':>12} {'frozen':>12}"]
        for group, counts in self.counts.items():
            metrics[f"params/{group}/trainable"] = counts["trainable"]
            metrics[f"params/{group}/frozen"] = counts["frozen"]
            lines.append(f"{group:<40} {counts['trainable']:>12,} {counts['frozen']:>12,}")
        log_scalars(trainer, metrics, step=0)
        rank_zero_info("ParamCountCallback: parameters per module group\n" + "\n".join(lines))
