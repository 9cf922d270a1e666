"""Small synthetic encoder, datasets and tasks for the multi-task tests (fast, float64-capable)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from matsciml.models.embeddings import Embeddings

ENCODER = "_multitask_helpers.MLPEncoder"
ENCODER_KWARGS = {"in_dim": 4, "embedding_dim": 8}


class MLPEncoder(nn.Module):
    """``batch["features"] [B, in_dim]`` -> system (and point) embedding ``[B, D]``; no batch statistics."""

    def __init__(self, in_dim: int = 4, embedding_dim: int = 8) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(nn.Linear(in_dim, embedding_dim), nn.Tanh(), nn.Linear(embedding_dim, embedding_dim))

    def forward(self, batch: dict) -> Embeddings:
        h = self.net(batch["features"].to(self.net[0].weight.dtype))
        return Embeddings(system_embedding=h, point_embedding=h)


def samples(n: int, keys: tuple[str, ...], seed: int, dtype=torch.float64) -> list[dict[str, Any]]:
    """``n`` samples ``{"features" [4], "targets": {key: scalar}}`` with smooth targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    out = []
    for i in range(n):
        targets = {key: (torch.sin(x[i] * (k + 1)).sum() + 0.5 * k) for k, key in enumerate(keys)}
        out.append({"features": x[i], "targets": targets, "id": f"{seed}-{i}"})
    return out


def stack(samples_: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate feature samples: ``{"features" [B, 4], "targets": {key: [B]}, "ids", "batch_size"}``."""
    keys = [k for k in samples_[0]["targets"] if all(k in s["targets"] for s in samples_)]
    return {
        "features": torch.stack([s["features"] for s in samples_]),
        "targets": {k: torch.stack([torch.as_tensor(s["targets"][k]) for s in samples_]) for k in keys},
        "ids": [s["id"] for s in samples_],
        "batch_size": len(samples_),
    }


def pair_batches(sizes: list[tuple[int, int]], a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict]:
    """Batches of the two-pair module: ``(n_a, n_b)`` samples of pairs ``"a"`` and ``"b"`` per batch, taken in order.

    A pair with no sample in a batch is absent from it (not an empty entry).
    """
    batches, i, j = [], 0, 0
    for na, nb in sizes:
        batch = {"a": stack(a[i : i + na])}
        if nb:
            batch["b"] = stack(b[j : j + nb])
        batch["batch_size"] = na + nb
        batches.append(batch)
        i, j = i + na, j + nb
    return batches


def scalar_task(keys: list[str], seed: int, **kwargs: Any):
    from matsciml.models.base import ScalarRegressionTask

    torch.manual_seed(seed)
    kwargs.setdefault("output_kwargs", {"hidden_dim": 8})
    kwargs.setdefault("lr", 0.01)
    return ScalarRegressionTask(encoder_class=ENCODER, encoder_kwargs=dict(ENCODER_KWARGS), task_keys=keys, **kwargs)


def two_pair_module(task_scaling=(1.0, 0.3)):
    """``a``: y (MSE, normalised); ``b``: u, v (L1, v weighted 0.5); pairs weighted ``task_scaling``."""
    from matsciml.models.base import MultiTaskLitModule

    a = scalar_task(["y"], 0, normalize_kwargs={"y_mean": 0.3, "y_std": 2.0})
    b = scalar_task(["u", "v"], 1, loss_func="L1Loss", task_loss_scaling={"u": 1.0, "v": 0.5})
    return MultiTaskLitModule(("a", a), ("b", b), task_scaling=list(task_scaling))


def hand_loss(module, batch, scaling=(1.0, 0.3)) -> torch.Tensor:
    """The total loss of :func:`two_pair_module` written out from its encoder and heads."""
    total = torch.zeros((), dtype=torch.float64)
    if "a" in batch:
        h = module.encoder.net(batch["a"]["features"])
        head = module.task_map["a"]["ScalarRegressionTask"].output_heads["y"]
        target = (batch["a"]["targets"]["y"] - 0.3) / 2.0
        total = total + scaling[0] * ((head(h).squeeze(-1) - target) ** 2).mean()
    if "b" in batch:
        h = module.encoder.net(batch["b"]["features"])
        heads = module.task_map["b"]["ScalarRegressionTask"].output_heads
        u = (heads["u"](h).squeeze(-1) - batch["b"]["targets"]["u"]).abs().mean()
        v = (heads["v"](h).squeeze(-1) - batch["b"]["targets"]["v"]).abs().mean()
        total = total + scaling[1] * (1.0 * u + 0.5 * v)
    return total
