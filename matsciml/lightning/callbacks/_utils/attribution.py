"""Per-atom attributions of a prediction: integrated gradients and gradient x input over the atom embeddings.

The atoms' input embeddings ``e`` (the output of ``target_layer``, by default the
encoder's ``atom_embedding``, ``[N, F]``) are replaced by ``b + alpha (e - b)`` with the
baseline ``b = 0`` (every atom's embedding zeroed: "no atom information"; positions and
the graph are kept). For the prediction ``F_s`` of structure ``s``:

* integrated gradients: ``A_i = sum_f (e - b)_if * integral_0^1 dF_s/de_if(b + alpha (e - b)) d alpha``,
  with the integral by ``steps``-point Gauss-Legendre quadrature on ``[0, 1]``; the
  attributions of a structure sum to ``F_s(e) - F_s(b)`` (completeness), up to the
  quadrature error (below 1e-4 relative for the tiny EGNN with 64 steps);
* gradient x input: ``A_i = sum_f (e - b)_if dF_s/de_if(e)`` (one backward pass; no
  completeness).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from matsciml.common.errors import ConfigError, closest
from matsciml.common.graph import get_graph, graph_index

__all__ = ["ATTRIBUTION_METHODS", "find_layer", "atom_attributions"]

ATTRIBUTION_METHODS = ("integrated_gradients", "gradient_x_input")


def find_layer(module: nn.Module, name: str | None) -> nn.Module:
    """The submodule ``name`` (dotted path) of ``module``; ``None``: the first one named ``*atom_embedding``.

    Raises
    ------
    ConfigError
        No such submodule (with the closest names).
    """
    names = [n for n, _ in module.named_modules() if n]
    if name is None:
        for n, sub in module.named_modules():
            if n.split(".")[-1] == "atom_embedding":
                return sub
        raise ConfigError("target_layer: the model has no '*atom_embedding' module; name the embedding layer")
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"target_layer={name!r} is not a submodule of the model; {closest(name, names)}") from None


def _prediction(module: nn.Module, batch: Any, target: str, index: int | None) -> torch.Tensor:
    out = module(batch)
    if not isinstance(out, Mapping) or target not in out:
        have = sorted(out) if isinstance(out, Mapping) else []
        raise ConfigError(f"task={target!r} is not an output of the model; {closest(target, have)}")
    value = out[target]
    value = value.reshape(value.shape[0], -1)
    return value[:, index] if index is not None else value.sum(-1)


def atom_attributions(
    module: nn.Module,
    batch: Any,
    target: str,
    layer: nn.Module,
    method: str = "integrated_gradients",
    steps: int = 64,
    index: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-atom attributions of output ``target`` (column ``index``, else the sum of columns) of ``module``.

    Returns
    -------
    dict
        ``attributions`` ``[N]``, ``structure`` ``[N]`` (structure of each atom),
        ``prediction`` ``[B]`` and ``baseline_prediction`` ``[B]`` (all detached, CPU).
    """
    if method not in ATTRIBUTION_METHODS:
        raise ConfigError(f"method={method!r}; {closest(method, ATTRIBUTION_METHODS)}")
    state: dict[str, Any] = {}

    def hook(_mod: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        e = output.detach()
        state["e"] = e
        x = (state["alpha"] * e).requires_grad_(True)  # baseline 0: b + alpha (e - b) = alpha e
        state["x"] = x
        return x

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            state["alpha"] = 0.0
            with torch.no_grad():
                base = _prediction(module, batch, target, index).detach()
            if method == "gradient_x_input":
                nodes, weights = np.array([1.0]), np.array([1.0])
            else:
                x, w = np.polynomial.legendre.leggauss(int(steps))
                nodes, weights = (x + 1.0) / 2.0, w / 2.0
            total = None
            pred = None
            for alpha, weight in zip(nodes, weights):
                state["alpha"] = float(alpha)
                value = _prediction(module, batch, target, index)
                (grad,) = torch.autograd.grad(value.sum(), state["x"])
                total = weight * grad if total is None else total + weight * grad
            state["alpha"] = 1.0
            with torch.no_grad():
                pred = _prediction(module, batch, target, index).detach()
    finally:
        handle.remove()
    attributions = (state["e"] * total).sum(-1)
    structure = graph_index(get_graph(batch)).to(attributions.device)
    return {
        "attributions": attributions.detach().cpu(),
        "structure": structure.cpu(),
        "prediction": pred.cpu(),
        "baseline_prediction": base.cpu(),
    }
