"""Learning-rate schedulers of a task's optimizer (``scheduler_kwargs``), shared by every task module."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["with_schedulers"]


def with_schedulers(optimizer: torch.optim.Optimizer, specs: list[dict[str, Any]]) -> Any:
    """``configure_optimizers``' return value: ``optimizer`` with the parsed scheduler ``specs`` attached."""
    schedulers = []
    for spec in specs:
        config = {"scheduler": spec["class_path"](optimizer, **dict(spec.get("init_args") or {}))}
        config["interval"] = spec.get("interval", "epoch")
        config["frequency"] = int(spec.get("frequency", 1))
        if "monitor" in spec or isinstance(config["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = spec.get("monitor", "val_loss")
        config.update({key: spec[key] for key in ("name", "strict") if key in spec})
        schedulers.append(config)
    if not schedulers:
        return optimizer
    if len(schedulers) == 1:
        return {"optimizer": optimizer, "lr_scheduler": schedulers[0]}
    return [optimizer], schedulers
