"""Heuristic checks of a training run: embeddings, encoder/head weights, gradients, coordinates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from matsciml.common import graph as graphs
from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._base.task_hooks import TaskHooksCallback
from matsciml.lightning.callbacks._utils.grads import batch_ids, tensor_norms
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_histogram, log_scalars

__all__ = ["TrainingHelperCallback", "embedding_statistics", "fractional_coordinate_structures"]


# ----------------------------------------------------------------------------- plain functions
def embedding_statistics(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(median |x|, spread)`` of embeddings ``[rows, dim]``, as 0-d tensors (no synchronisation).

    ``spread`` is the standard deviation of each dimension over the rows (population
    form), averaged over the dimensions: zero when every row is the same vector.
    """
    x = values.detach().float().reshape(values.shape[0], -1)
    median = x.abs().median()
    spread = x.std(dim=0, correction=0).mean() if x.shape[0] > 1 else x.new_full((), float("nan"))
    return median, spread


def fractional_coordinate_structures(
    graph: Any, min_cell_length: float = 2.0, tol: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per structure of a batch: does it look like fractional coordinates read as Cartesian?

    A structure is flagged when it has at least two atoms, a cell whose shortest lattice
    vector is longer than ``min_cell_length`` (Å), and every position component in
    ``[-tol, 1 + tol]``: in a real crystal with such a cell the atoms would not all sit
    inside one cubic ångström.

    Returns
    -------
    tuple of tensors ``[num_graphs]``
        ``flagged`` (bool), ``eligible`` (bool: two atoms or more and a cell longer than
        ``min_cell_length``), ``pos_min`` and ``pos_max`` (smallest and largest position
        component, Å) and ``cell_min`` (shortest lattice vector length, Å).
    """
    pos = graphs.positions(graph).detach()
    index = graphs.graph_index(graph).to(pos.device)
    cell = graphs.cells(graph).detach().to(pos.device)
    count = cell.shape[0]
    natoms = torch.zeros(count, dtype=torch.long, device=pos.device).index_add_(0, index, torch.ones_like(index))
    lo = pos.new_full((count,), math.inf).scatter_reduce(0, index, pos.min(dim=-1).values, "amin", include_self=True)
    hi = pos.new_full((count,), -math.inf).scatter_reduce(0, index, pos.max(dim=-1).values, "amax", include_self=True)
    cell_min = cell.norm(dim=-1).min(dim=-1).values
    eligible = (natoms >= 2) & (cell_min > min_cell_length)
    flagged = eligible & (lo >= -tol) & (hi <= 1.0 + tol)
    return flagged, eligible, lo, hi, cell_min


def _composition_differs(graph: Any) -> tuple[bool, bool]:
    """``(several species among the atoms, several compositions among the structures)``."""
    numbers = graphs.atomic_numbers(graph).detach()
    index = graphs.graph_index(graph).to(numbers.device)
    species = torch.unique(numbers)
    several_species = species.numel() > 1
    count = graphs.num_graphs(graph)
    if count < 2:
        return several_species, False
    column = torch.searchsorted(species, numbers)
    table = torch.zeros(count, species.numel(), dtype=torch.long, device=numbers.device)
    table.index_put_((index, column), torch.ones_like(numbers), accumulate=True)
    return several_species, torch.unique(table, dim=0).shape[0] > 1


def _named(names: list[str], values: list[float], limit: int) -> str:
    shown = [f"{n} ({v:.2e})" for n, v in zip(names[:limit], values[:limit])]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _weight_norms(module: nn.Module) -> tuple[Tensor, int]:
    params = [p.detach() for p in module.parameters() if not nn.parameter.is_lazy(p)]
    if not params:
        return torch.zeros(()), 0
    norms = tensor_norms(params)
    return norms.pow(2).sum().sqrt(), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- the callback
class TrainingHelperCallback(TaskHooksCallback):
    """Heuristic checks that catch common faults early, with the numbers in every message.

    Every ``update_freq`` optimizer steps (step 0 included) the callback checks:

    * **embeddings** (a forward hook on the task's ``encoder``, which returns
      :class:`~matsciml.models.embeddings.Embeddings`): for the graph-level
      (``system_embedding``) and node-level (``point_embedding``) embeddings, the median
      absolute value (``> embedding_magnitude_thres``: exploding activations) and the
      spread -- per-dimension standard deviation over the rows, averaged over the
      dimensions -- (``<= embedding_collapse_thres * max(1, median)``: collapse, the
      encoder maps different inputs to the same vector). Collapse is only reported when
      the inputs differ: several species among the atoms (node level), several
      compositions among the structures (graph level);
    * **encoder vs output-head weights**: the RMS weight of the output heads over that of
      the encoder (``> norm_ratio_thres``: the heads may fit the targets on their own);
      the message gives both norms (RMS and L2);
    * **gradients**: trainable parameters without a gradient, and those with a small
      gradient: by default (``small_grad_mode="relative"``) a gradient norm below
      ``small_grad_thres`` times the median gradient norm of all parameters -- a layer
      that learns a thousand times slower than the rest --; with ``"absolute"`` a norm
      below ``small_grad_thres`` itself, upstream's rule, which also fires on healthy
      models whose loss is small (biases often have gradients of 1e-4);
    * **coordinates**: structures whose positions all lie in ``[0, 1]`` with a cell longer
      than ``fractional_cell_thres`` (fractional coordinates read as Cartesian Å, the
      mistake of upstream matsciml's OQMD loader); reported when at least half of the
      eligible structures of the batch are flagged, with their ids.

    Each message is a :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning`
    issued through a :class:`~matsciml.lightning.callbacks._utils.reporting.RateLimitedWarner`
    (one per kind per ``warn_interval_steps``, at most ``max_warnings`` per kind). Scalars
    logged to every logger at the check steps: ``embeddings/system_median_abs``,
    ``embeddings/system_spread``, ``embeddings/point_median_abs``,
    ``embeddings/point_spread``, ``param_norm/encoder``, ``param_norm/output_heads``
    (``record_param_norm_history``), ``grad/missing_count``, ``grad/small_count``. Every
    ``histogram_every_n_steps`` steps, histograms ``embeddings/system``,
    ``embeddings/point`` and ``grad_norms`` (per-parameter gradient norms) go to every
    logger that takes histograms, else to ``.npz`` files in the run folder
    (:func:`~matsciml.lightning.callbacks._utils.reporting.log_histogram`).

    A ``LightningModule`` without the task protocol gets the gradient and coordinate
    checks; the callback says once that it cannot check embeddings or head weights.
    Between check steps the callback does nothing.

    Hooks it acts in:

    * ``on_fit_start`` / ``on_fit_end``: add / remove the encoder's forward hook;
    * ``on_train_batch_start``: decides whether the step is checked; coordinates;
    * ``on_before_optimizer_step``: embeddings, weights and gradients.

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.TrainingHelperCallback
              init_args:
                small_grad_thres: 1.0e-3
                update_freq: 50

    Parameters
    ----------
    small_grad_thres
        Threshold of the small-gradient check, default ``1e-3``: a fraction of the median
        gradient norm (``"relative"``) or a gradient L2 norm (``"absolute"``).
    update_freq
        Period of the checks in optimizer steps, default ``50``.
    encoder_hook
        Check the encoder's embeddings (a forward hook on ``pl_module.encoder``). Default
        ``True``.
    record_param_norm_history
        Log the encoder and head weight norms and keep them in
        :attr:`param_norm_history` as ``(step, encoder L2, heads L2)``. Default ``True``.
    small_grad_mode
        ``"relative"`` (default) or ``"absolute"``, see above.
    embedding_magnitude_thres
        Median absolute embedding value above which a warning is issued, default ``100``.
    embedding_collapse_thres
        Relative spread at or below which the embeddings count as collapsed, default
        ``1e-5``.
    norm_ratio_thres
        Largest accepted ratio of head RMS weight to encoder RMS weight, default ``10``.
    fractional_cell_thres
        Shortest lattice vector (Å) above which positions all in ``[0, 1]`` look
        fractional, default ``2.0``.
    histogram_every_n_steps
        Period of the histograms, default ``10 * update_freq``; ``0`` turns them off.
    warn_interval_steps
        Steps between two messages of the same kind, default ``update_freq * 10``.
    max_warnings
        Messages of one kind per run, default ``5``.
    max_names
        Parameter names or ids listed in one message, default ``10``.

    Raises
    ------
    ConfigError
        A period or threshold is not positive, or ``small_grad_mode`` is unknown.
    """

    def __init__(
        self,
        small_grad_thres: float = 1e-3,
        update_freq: int = 50,
        encoder_hook: bool = True,
        record_param_norm_history: bool = True,
        small_grad_mode: str = "relative",
        embedding_magnitude_thres: float = 100.0,
        embedding_collapse_thres: float = 1e-5,
        norm_ratio_thres: float = 10.0,
        fractional_cell_thres: float = 2.0,
        histogram_every_n_steps: int | None = None,
        warn_interval_steps: int | None = None,
        max_warnings: int = 5,
        max_names: int = 10,
    ) -> None:
        super().__init__()
        if int(update_freq) < 1:
            raise ConfigError(f"TrainingHelperCallback: update_freq={update_freq!r} must be a positive number of steps")
        for name, value in (
            ("small_grad_thres", small_grad_thres),
            ("embedding_magnitude_thres", embedding_magnitude_thres),
            ("embedding_collapse_thres", embedding_collapse_thres),
            ("norm_ratio_thres", norm_ratio_thres),
            ("fractional_cell_thres", fractional_cell_thres),
        ):
            if not float(value) > 0:
                raise ConfigError(f"TrainingHelperCallback: {name}={value!r} must be positive")
        if small_grad_mode not in ("relative", "absolute"):
            raise ConfigError(
                f"TrainingHelperCallback: small_grad_mode={small_grad_mode!r} must be 'relative' or 'absolute'"
            )
        if histogram_every_n_steps is not None and int(histogram_every_n_steps) < 0:
            raise ConfigError(
                f"TrainingHelperCallback: histogram_every_n_steps={histogram_every_n_steps!r} must be >= 0"
            )
        self.small_grad_thres = float(small_grad_thres)
        self.small_grad_mode = small_grad_mode
        self.update_freq = int(update_freq)
        self.encoder_hook = bool(encoder_hook)
        self.record_param_norm_history = bool(record_param_norm_history)
        self.embedding_magnitude_thres = float(embedding_magnitude_thres)
        self.embedding_collapse_thres = float(embedding_collapse_thres)
        self.norm_ratio_thres = float(norm_ratio_thres)
        self.fractional_cell_thres = float(fractional_cell_thres)
        self.histogram_every_n_steps = (
            10 * self.update_freq if histogram_every_n_steps is None else int(histogram_every_n_steps)
        )
        self.max_names = int(max_names)
        interval = 10 * self.update_freq if warn_interval_steps is None else int(warn_interval_steps)
        self.warner = RateLimitedWarner(min_interval_steps=interval, max_per_key=int(max_warnings))
        #: ``(step, encoder weight L2 norm, output-head weight L2 norm)`` at each check step
        self.param_norm_history: list[tuple[int, float, float]] = []
        self._active = False
        self._armed = False
        self._step = 0
        self._embeddings: Any = None
        self._graph: Any = None

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        needs = "encoder, output_heads"
        otherwise = "embedding and encoder/head weight checks are off; gradient and coordinate checks still run."
        if self.check_task(pl_module, needs, otherwise) and self.encoder_hook and not self.has_hooks:
            self.add_forward_hook(pl_module.encoder, self._encoder_hook)

    def _encoder_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._armed and module.training:
            self._armed = False  # the first forward of the step (not a second pass such as SAM's)
            self._embeddings = output

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._active and step == self._step:
            return  # a further micro-batch of a checked step
        self._step = step
        self._active = step % self.update_freq == 0
        self._embeddings = None
        self._graph = None
        if not self._active:
            return
        self._armed = True
        graph = batch.get("graph") if isinstance(batch, Mapping) else (batch if hasattr(batch, "pos") else None)
        if graph is None:
            return
        self._graph = graph
        try:
            self._check_coordinates(trainer, graph, batch_ids(batch), step)
        except (AttributeError, KeyError):
            pass

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._active:
            return
        self._active = False
        self._armed = False
        step = trainer.global_step
        histograms = self.histogram_every_n_steps > 0 and step % self.histogram_every_n_steps == 0
        scalars: dict[str, float] = {}
        self._check_gradients(trainer, pl_module, step, scalars, histograms)
        if self._protocol:
            self._check_weights(trainer, pl_module, step, scalars)
            if self._embeddings is not None:
                self._check_embeddings(trainer, step, scalars, histograms)
        self._embeddings = None
        self._graph = None
        log_scalars(trainer, scalars, step=step)

    # ------------------------------------------------------------------ checks
    def _warn(self, trainer: pl.Trainer, key: str, message: str, step: int) -> None:
        self.warner.warn(key, f"TrainingHelperCallback: step {step}: {message}", step, rank=trainer.global_rank)

    def _check_coordinates(self, trainer: pl.Trainer, graph: Any, ids: list[str], step: int) -> None:
        flagged, eligible, lo, hi, cell_min = fractional_coordinate_structures(graph, self.fractional_cell_thres)
        stats = torch.stack([flagged.sum(), eligible.sum()]).tolist()
        n_flagged, n_eligible = int(stats[0]), int(stats[1])
        if n_flagged == 0 or 2 * n_flagged < n_eligible:
            return
        rows = flagged.nonzero().flatten().tolist()[: self.max_names]
        lo, hi, cell_min = lo.tolist(), hi.tolist(), cell_min.tolist()
        shown = ", ".join(
            f"{ids[r] if r < len(ids) else f'#{r}'} (positions in [{lo[r]:.3f}, {hi[r]:.3f}] Å, shortest cell vector "
            f"{cell_min[r]:.2f} Å)"
            for r in rows
        )
        self._warn(
            trainer,
            "fractional_coordinates",
            f"{n_flagged} of {n_eligible} structures have every position in [0, 1] although their cell is longer "
            f"than {self.fractional_cell_thres:g} Å: {shown}. These look like fractional coordinates read as "
            "Cartesian Å (atoms squeezed into one cubic ångström). Convert them (positions = fractional @ cell; "
            "ase.Atoms(scaled_positions=...)) or check the reader of this dataset.",
            step,
        )

    def _check_gradients(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, scalars: dict[str, float], hist: bool
    ) -> None:
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        missing = [n for n, p in trainable if p.grad is None]
        with_grad = [(n, p.grad) for n, p in trainable if p.grad is not None]
        norms = tensor_norms([g for _, g in with_grad]) if with_grad else torch.zeros(0)
        values = norms.tolist()
        median = sorted(values)[len(values) // 2] if values else 0.0
        limit = self.small_grad_thres * (median if self.small_grad_mode == "relative" else 1.0)
        small = [(n, v) for (n, _), v in zip(with_grad, values) if v < limit]
        scalars["grad/missing_count"] = float(len(missing))
        scalars["grad/small_count"] = float(len(small))
        if hist and values:
            log_histogram(trainer, "grad_norms", norms, step=step)
        if missing:
            self._warn(
                trainer,
                "missing_gradients",
                f"{len(missing)} trainable parameter(s) have no gradient: "
                f"{', '.join(missing[: self.max_names])}{' ...' if len(missing) > self.max_names else ''}. They are "
                "not part of the loss's autograd graph (UnusedParametersCallback names them all); use their output "
                "in the loss, or freeze them with requires_grad=False.",
                step,
            )
        if small:
            rule = (
                f"{self.small_grad_thres:g} x the median gradient norm {median:.2e}"
                if self.small_grad_mode == "relative"
                else f"small_grad_thres={self.small_grad_thres:g} (median over all parameters {median:.2e})"
            )
            self._warn(
                trainer,
                "small_gradients",
                f"{len(small)} parameter(s) have a gradient norm below {rule}: "
                f"{_named([n for n, _ in small], [v for _, v in small], self.max_names)}. Deep stacks without "
                "residual connections or normalisation make gradients vanish; check the activations and the "
                "scale of the loss.",
                step,
            )

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, scalars: dict) -> None:
        enc, n_enc = _weight_norms(pl_module.encoder)
        heads, n_heads = _weight_norms(pl_module.output_heads)
        if n_enc == 0 or n_heads == 0:
            return
        enc_l2, heads_l2 = (float(v) for v in torch.stack([enc.float(), heads.float().to(enc.device)]).tolist())
        enc_rms, heads_rms = enc_l2 / math.sqrt(n_enc), heads_l2 / math.sqrt(n_heads)
        if self.record_param_norm_history:
            scalars["param_norm/encoder"] = enc_l2
            scalars["param_norm/output_heads"] = heads_l2
            self.param_norm_history.append((step, enc_l2, heads_l2))
        ratio = heads_rms / enc_rms if enc_rms > 0 else math.inf
        if ratio > self.norm_ratio_thres:
            self._warn(
                trainer,
                "head_norm_ratio",
                f"the output-head weights are much larger than the encoder's: RMS weight {heads_rms:.3e} (heads) vs "
                f"{enc_rms:.3e} (encoder), ratio {ratio:.3g} > {self.norm_ratio_thres:g}; L2 norms {heads_l2:.3e} "
                f"({n_heads} head weights) and {enc_l2:.3e} ({n_enc} encoder weights). The heads may be fitting the "
                "targets on their own while the encoder is ignored: check the heads' initialisation and learning "
                "rate, whether the encoder is frozen, and the target normalisation.",
                step,
            )

    def _check_embeddings(self, trainer: pl.Trainer, step: int, scalars: dict, hist: bool) -> None:
        output = self._embeddings
        levels = []
        for level, attr in (("system", "system_embedding"), ("point", "point_embedding")):
            value = getattr(output, attr, None)
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] > 0:
                levels.append((level, value))
        if not levels:
            self.warn_once(
                f"TrainingHelperCallback: the encoder returned {type(output).__name__}, not Embeddings; the "
                "embedding checks are off."
            )
            return
        stats = torch.stack([s.to(levels[0][1].device) for _, v in levels for s in embedding_statistics(v)]).tolist()
        differs = {"point": True, "system": True}
        if self._graph is not None:
            try:
                differs["point"], differs["system"] = _composition_differs(self._graph)
            except (AttributeError, KeyError):
                pass
        label = {"system": "graph-level", "point": "node-level"}
        rows = {"system": "structures", "point": "atoms"}
        for k, (level, value) in enumerate(levels):
            median, spread = stats[2 * k], stats[2 * k + 1]
            scalars[f"embeddings/{level}_median_abs"] = median
            if math.isfinite(spread):
                scalars[f"embeddings/{level}_spread"] = spread
            if hist:
                log_histogram(trainer, f"embeddings/{level}", value, step=step)
            if median > self.embedding_magnitude_thres:
                self._warn(
                    trainer,
                    f"embedding_magnitude_{level}",
                    f"{label[level]} embeddings have a median absolute value of {median:.3e} > "
                    f"{self.embedding_magnitude_thres:g} (spread {spread:.3e}): activations are exploding. Add "
                    "normalisation (LayerNorm) to the encoder, lower the learning rate, or check the units of the "
                    "inputs.",
                    step,
                )
            collapsed = math.isfinite(spread) and spread <= self.embedding_collapse_thres * max(1.0, median)
            if collapsed and differs[level]:
                self._warn(
                    trainer,
                    f"embedding_collapse_{level}",
                    f"{label[level]} embeddings have collapsed: spread (per-dimension standard deviation over "
                    f"{value.shape[0]} {rows[level]}, averaged) {spread:.3e} <= {self.embedding_collapse_thres:g} x "
                    f"max(1, median |value| {median:.3e}), although the {rows[level]} differ in composition. The "
                    "encoder maps different inputs to the same vector: check that it uses positions and species, "
                    "look for dead activations, and lower the learning rate or weight decay.",
                    step,
                )
