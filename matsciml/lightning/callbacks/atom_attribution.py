"""``AtomAttributionCallback``: per-atom attribution pictures of validation structures (Grad-CAM for graphs)."""

from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from matsciml.common.checks import check_int
from matsciml.common.errors import ConfigError, closest
from matsciml.common.graph import atomic_numbers, cells, get_graph, positions
from matsciml.lightning.callbacks._utils.attribution import ATTRIBUTION_METHODS, atom_attributions, find_layer
from matsciml.lightning.callbacks._utils.inference import evaluation_mode
from matsciml.lightning.callbacks._utils.reporting import log_image, run_folder

__all__ = ["AtomAttributionCallback"]


def _symbols(numbers: torch.Tensor) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] if 0 < int(z) < len(chemical_symbols) else str(int(z)) for z in numbers]


def draw_structure(
    pos: torch.Tensor, numbers: torch.Tensor, cell: torch.Tensor, values: torch.Tensor, title: str
) -> Any:
    """A matplotlib figure: atoms (x-y projection) coloured by ``values``, element labels, cell edges, colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    limit = float(values.abs().max()) or 1.0
    if float(cell.abs().sum()) > 0:
        a, b = cell[0, :2].numpy(), cell[1, :2].numpy()
        corners = [(0, 0), a, a + b, b, (0, 0)]
        ax.plot([c[0] for c in corners], [c[1] for c in corners], color="0.5", lw=1, label="cell (a, b)")
    points = ax.scatter(pos[:, 0], pos[:, 1], c=values.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit,
                        s=300, edgecolors="k")  # fmt: skip
    for (x, y), symbol in zip(pos[:, :2].tolist(), _symbols(numbers)):
        ax.annotate(symbol, (x, y), ha="center", va="center", fontsize=8)
    fig.colorbar(points, ax=ax, label="attribution (prediction units)")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.set_aspect("equal", adjustable="datalim")
    # over the whole figure (the colour bar included) and wrapped, so a long title is never cut off
    fig.suptitle("\n".join(textwrap.fill(line, 60) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    return fig


class AtomAttributionCallback(Callback):
    """Per-atom attributions of a prediction for the first validation batches, as pictures and a CSV.

    Every ``every_n_epochs`` epochs, at the end of validation, the first ``log_n_batches``
    validation batches are attributed (see :mod:`~matsciml.lightning.callbacks._utils.attribution`:
    integrated gradients over the atoms' input embeddings with a zero baseline, so a
    structure's attributions sum to its prediction minus the baseline prediction; or
    gradient x input), with the weights validation uses (the EMA weights when the EMA
    callback is on: it swaps them in for the whole validation loop). Each structure is
    drawn (x-y projection, atoms coloured by attribution, element labels, cell edges, colour
    bar), written to ``<run folder>/attributions/epoch<e>_<id>.png`` and logged as an image
    to every TensorBoard, W&B and MLflow logger; the numbers go to
    ``<run folder>/attributions/attributions.csv`` (epoch, structure id, atom, element,
    attribution, prediction, baseline prediction).

    luxonis-train's ``GradCamCallback`` arguments are accepted where they mean something
    here: ``target_layer`` (module path of the embedding), ``log_n_batches``, ``task``
    (output head), ``class_idx`` (output column).

    Hooks it acts in: ``on_validation_epoch_end`` (rank zero; not during the sanity check).

    Example::

        callbacks:
          - kind: GradCamCallback          # or AtomAttributionCallback
            task: energy_per_atom
            log_n_batches: 1
            every_n_epochs: 5

    Parameters
    ----------
    task
        Output key to attribute; ``None``: the first output of the model.
    target_layer
        Module whose output are the atoms' input embeddings; ``None``: the first ``*atom_embedding``.
    log_n_batches
        Validation batches attributed each time (default 1).
    every_n_epochs
        Period in epochs (default 1).
    method
        ``"integrated_gradients"`` (default) or ``"gradient_x_input"``.
    steps
        Quadrature points of integrated gradients (default 64).
    class_idx
        Output column for multi-column outputs; ``None``: their sum.
    max_structures
        Pictures per batch at most (default 4).
    """

    def __init__(
        self,
        task: str | None = None,
        target_layer: str | None = None,
        log_n_batches: int = 1,
        every_n_epochs: int = 1,
        method: str = "integrated_gradients",
        steps: int = 64,
        class_idx: int | None = None,
        max_structures: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (("log_n_batches", log_n_batches), ("every_n_epochs", every_n_epochs),
                            ("steps", steps), ("max_structures", max_structures)):  # fmt: skip
            check_int(value, name, "AtomAttributionCallback")
        if method not in ATTRIBUTION_METHODS:
            raise ConfigError(f"AtomAttributionCallback: method={method!r}; {closest(method, ATTRIBUTION_METHODS)}")
        self.task, self.target_layer, self.method = task, target_layer, method
        self.log_n_batches, self.every_n_epochs, self.steps = int(log_n_batches), int(every_n_epochs), int(steps)
        self.class_idx, self.max_structures = class_idx, int(max_structures)
        self.images: list[Path] = []

    def _folder(self, trainer: pl.Trainer) -> Path:
        return run_folder(trainer) / "attributions"

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return
        layer = find_layer(pl_module, self.target_layer)
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[list[Any]] = []
        with evaluation_mode(pl_module):
            for i, batch in enumerate(loader):
                if i >= self.log_n_batches:
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                target = self.task
                if target is None:
                    with torch.no_grad():
                        target = next(iter(pl_module(batch)))
                out = atom_attributions(pl_module, batch, target, layer, self.method, self.steps, self.class_idx)
                rows += self._draw(trainer, batch, target, out, i)
        self._append_csv(folder / "attributions.csv", rows)

    def _draw(self, trainer: pl.Trainer, batch: Any, target: str, out: dict, batch_idx: int) -> list[list[Any]]:
        import matplotlib.pyplot as plt

        graph = get_graph(batch)
        pos, numbers, cell = positions(graph).cpu(), atomic_numbers(graph).cpu(), cells(graph).cpu()
        ids = batch.get("ids") if isinstance(batch, dict) else None
        rows = []
        for s in range(int(out["prediction"].numel())):
            mask = out["structure"] == s
            sid = str(ids[s]) if ids else f"b{batch_idx}s{s}"
            values, symbols = out["attributions"][mask], _symbols(numbers[mask])
            pred, base = float(out["prediction"][s]), float(out["baseline_prediction"][s])
            rows += [[trainer.current_epoch, sid, k, symbols[k], float(v), pred, base] for k, v in enumerate(values)]
            if s >= self.max_structures:
                continue
            title = f"{sid}\n{target} {pred:.4g} (baseline {base:.4g}; {self.method})"
            fig = draw_structure(pos[mask], numbers[mask], cell[min(s, len(cell) - 1)], values, title)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sid)
            path = self._folder(trainer) / f"epoch{trainer.current_epoch}_{safe}.png"
            fig.savefig(path, dpi=100)
            self.images.append(path)
            log_image(trainer, f"attributions/{safe}", fig)
            plt.close(fig)
        return rows

    @staticmethod
    def _append_csv(path: Path, rows: list[list[Any]]) -> None:
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["epoch", "id", "atom", "element", "attribution", "prediction", "baseline_prediction"])
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
