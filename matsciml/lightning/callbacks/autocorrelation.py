"""Autocorrelation over training steps of sampled parameters and gradients."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from matsciml.common.errors import ConfigError
from matsciml.lightning.callbacks._utils.reporting import RateLimitedWarner, log_image, log_scalars

__all__ = ["ModelAutocorrelation", "autocorrelation"]


def autocorrelation(history: Tensor | np.ndarray, max_lag: int) -> np.ndarray:
    """Normalised autocorrelation of each column of ``history`` ``[T, M]`` at lags ``1..max_lag``.

    For a series ``x_0 .. x_{T-1}`` with mean ``m``::

        r_k = sum_{t=0}^{T-1-k} (x_t - m) (x_{t+k} - m) / sum_{t=0}^{T-1} (x_t - m)^2

    (the standard estimator, as ``statsmodels.tsa.acf`` without adjustment). Columns
    that are constant or contain a non-finite value give NaN.

    Returns
    -------
    numpy.ndarray
        ``[max_lag, M]`` float64.
    """
    x = torch.as_tensor(history).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"autocorrelation: history must be [steps, elements], got shape {list(x.shape)}")
    steps = x.shape[0]
    if not 1 <= max_lag < steps:
        raise ValueError(f"autocorrelation: max_lag={max_lag} must be in [1, {steps - 1}] for {steps} steps")
    valid = torch.isfinite(x).all(dim=0)
    x = torch.where(valid, x, torch.zeros_like(x))
    valid &= x.amax(dim=0) > x.amin(dim=0)  # exactly constant (the mean may not be exact: test it directly)
    x = x - x.mean(dim=0)
    denom = (x * x).sum(dim=0)
    out = torch.stack([(x[: steps - k] * x[k:]).sum(dim=0) for k in range(1, max_lag + 1)])
    ok = valid & (denom > 0)
    out = torch.where(ok, out / torch.where(ok, denom, torch.ones_like(denom)), torch.full_like(out, float("nan")))
    return out.numpy()


def _summary(acf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, 25th and 75th percentile over the elements at each lag (NaN columns ignored)."""
    keep = np.isfinite(acf).all(axis=0)
    if not keep.any():
        nan = np.full(acf.shape[0], np.nan)
        return nan, nan, nan
    acf = acf[:, keep]
    return acf.mean(axis=1), np.percentile(acf, 25, axis=1), np.percentile(acf, 75, axis=1)


class ModelAutocorrelation(Callback):
    """Track sampled parameters (and gradients) over a window of steps and log their autocorrelation.

    At the start of ``fit`` the callback picks, once and reproducibly (``seed``), a fixed
    fraction ``sample_frac`` of the elements of every trainable parameter (at least one
    per tensor, at most ``max_samples`` in all). Before each optimizer step in the
    ``buffer_size`` steps that precede an analysis, it copies those elements -- and with
    ``analyze_grads`` the same elements of the gradients -- into a ring buffer on the
    parameters' device (no host-device synchronisation). Every ``analyze_every_n_steps``
    steps it computes, for each sampled element's series, the normalised autocorrelation
    at lags ``1..max_lag`` (:func:`autocorrelation`) and logs, to every logger,

    * ``autocorrelation/params_lag<k>`` and ``autocorrelation/grads_lag<k>``: the mean over
      the elements (constant series left out);
    * an image ``autocorrelation`` (``log_image``: TensorBoard/W&B, else a PNG in the run
      folder): mean and interquartile band against the lag, parameters and gradients.

    Reading it: parameters drift, so their autocorrelation stays near 1 at small lags
    while training moves steadily; gradients dominated by mini-batch noise give values
    near 0; a strongly negative lag-1 gradient autocorrelation means the gradient flips
    sign from step to step -- the optimizer oscillates across a valley -- and gives a
    :class:`~matsciml.lightning.callbacks._utils.reporting.TrainingDynamicsWarning` when the
    mean is below ``oscillation_thres``.

    Only the ``buffer_size`` steps before each analysis are sampled (all steps when
    ``buffer_size >= analyze_every_n_steps``), so the cost is a gather of the sampled
    elements on those steps and the analysis itself. Memory:
    ``buffer_size * samples * 4`` bytes, twice with gradients. Skipped steps (no
    gradient) are recorded as NaN and leave those elements out of the gradient analysis.

    Hooks it acts in: ``on_fit_start`` (choose the elements), ``on_before_optimizer_step``
    (sample; analyse on analysis steps).

    Example::

        trainer:
          callbacks:
            - class_path: matsciml.lightning.callbacks.ModelAutocorrelation
              init_args:
                buffer_size: 100
                analyze_grads: true
                sample_frac: 0.05
                analyze_every_n_steps: 500

    Parameters
    ----------
    buffer_size
        Steps in the window, default ``100``; must exceed ``max_lag + 1``.
    sampled
        ``True`` (default): sample ``sample_frac`` of the elements; ``False``: every
        element (``max_samples`` does not apply; mind the memory).
    sample_frac
        Fraction of each parameter tensor's elements tracked, in ``(0, 1]``, default
        ``0.05``.
    analyze_grads
        Also track the gradients, default ``True``.
    analyze_every_n_steps
        Period of the analysis in optimizer steps, default ``500`` (upstream: 50, with
        sampling on every step).
    max_lag
        Largest lag analysed and logged, default ``10``.
    max_samples
        Cap on the number of tracked elements, default ``10000``.
    seed
        Seed of the element choice, default ``0``.
    log_images
        Log the image, default ``True``.
    oscillation_thres
        Mean lag-1 gradient autocorrelation below which a warning is issued, default
        ``-0.5``; ``None`` turns the warning off.

    Raises
    ------
    ConfigError
        A size, fraction or period out of range.
    """

    def __init__(
        self,
        buffer_size: int = 100,
        sampled: bool = True,
        sample_frac: float = 0.05,
        analyze_grads: bool = True,
        analyze_every_n_steps: int = 500,
        max_lag: int = 10,
        max_samples: int = 10000,
        seed: int = 0,
        log_images: bool = True,
        oscillation_thres: float | None = -0.5,
    ) -> None:
        super().__init__()
        if int(max_lag) < 1:
            raise ConfigError(f"ModelAutocorrelation: max_lag={max_lag!r} must be >= 1")
        if int(buffer_size) < int(max_lag) + 2:
            raise ConfigError(
                f"ModelAutocorrelation: buffer_size={buffer_size!r} must be at least max_lag + 2 = {int(max_lag) + 2}"
            )
        if not 0.0 < float(sample_frac) <= 1.0:
            raise ConfigError(f"ModelAutocorrelation: sample_frac={sample_frac!r} must be in (0, 1]")
        if int(analyze_every_n_steps) < 1 or int(max_samples) < 1:
            raise ConfigError("ModelAutocorrelation: analyze_every_n_steps and max_samples must be positive")
        self.buffer_size = int(buffer_size)
        self.sampled = bool(sampled)
        self.sample_frac = float(sample_frac)
        self.analyze_grads = bool(analyze_grads)
        self.analyze_every_n_steps = int(analyze_every_n_steps)
        self.max_lag = int(max_lag)
        self.max_samples = int(max_samples)
        self.seed = int(seed)
        self.log_images = bool(log_images)
        self.oscillation_thres = None if oscillation_thres is None else float(oscillation_thres)
        #: ``{"params": [max_lag, M], "grads": [max_lag, M]}`` from the last analysis
        self.last_acf: dict[str, np.ndarray] = {}
        #: the step of the last analysis
        self.last_step: int | None = None
        self._params: list[Tensor] = []
        self._lazy = False
        self._indices: list[Tensor] = []
        self._buffers: dict[str, Tensor] = {}
        self._filled = 0
        self._slot = 0
        self._last_recorded: int | None = None
        self._warner = RateLimitedWarner(min_interval_steps=self.analyze_every_n_steps, max_per_key=5)

    # ------------------------------------------------------------------ set-up
    def _choose(self, module: nn.Module) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self._lazy = any(nn.parameter.is_lazy(p) for p in module.parameters())
        params = [p for p in module.parameters() if p.requires_grad and not nn.parameter.is_lazy(p)]
        counts = [p.numel() if not self.sampled else max(1, int(p.numel() * self.sample_frac)) for p in params]
        total = sum(counts)
        if self.sampled and total > self.max_samples:
            counts = [max(1, int(c * self.max_samples / total)) for c in counts]
        self._params, self._indices = [], []
        for p, count in zip(params, counts):
            index = torch.randperm(p.numel(), generator=generator)[:count].sort().values
            self._params.append(p)
            self._indices.append(index.to(p.device))
        self._buffers = {}
        self._filled = 0
        self._slot = 0
        self._last_recorded = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._choose(pl_module)

    # ------------------------------------------------------------------ sampling
    def _records(self, step: int) -> bool:
        """Whether ``step`` falls in the window that ends with an analysis step."""
        steps_to_analysis = self.analyze_every_n_steps - 1 - step % self.analyze_every_n_steps
        return steps_to_analysis < self.buffer_size

    def _gather(self, tensors: list[Tensor | None]) -> Tensor:
        device = self._indices[0].device
        parts = []
        for tensor, index in zip(tensors, self._indices):
            if tensor is None:
                parts.append(torch.full((index.numel(),), float("nan"), device=device))
            else:
                parts.append(tensor.detach().reshape(-1)[index.to(tensor.device)].float().to(device))
        return torch.cat(parts)

    def _put(self, key: str, row: Tensor) -> None:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[1] != row.numel():
            buffer = self._buffers[key] = row.new_full((self.buffer_size, row.numel()), float("nan"))
        buffer[self._slot].copy_(row)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._lazy or not self._params:
            self._choose(pl_module)  # lazy modules are materialised by the first forward pass
            if not self._params:
                return
        step = trainer.global_step
        if not self._records(step):
            return
        if self._last_recorded is not None and step != self._last_recorded + 1:
            self._filled = 0  # not consecutive: start a new window
        with torch.no_grad():
            self._put("params", self._gather(self._params))
            if self.analyze_grads:
                self._put("grads", self._gather([p.grad for p in self._params]))
        self._slot = (self._slot + 1) % self.buffer_size
        self._filled = min(self._filled + 1, self.buffer_size)
        self._last_recorded = step
        if (step + 1) % self.analyze_every_n_steps == 0 and self._filled >= self.max_lag + 2:
            self.analyze(trainer, step)

    # ------------------------------------------------------------------ analysis
    def history(self, key: str) -> np.ndarray:
        """The buffered series of ``key`` (``"params"`` or ``"grads"``), oldest first: ``[steps, elements]``."""
        buffer = self._buffers[key].cpu()
        order = [(self._slot - self._filled + i) % self.buffer_size for i in range(self._filled)]
        return buffer[order].numpy()

    def analyze(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Compute, log and return the mean autocorrelation of the buffered window."""
        scalars: dict[str, float] = {}
        summaries = {}
        for key in ("params", "grads"):
            if key not in self._buffers:
                continue
            acf = autocorrelation(self.history(key), self.max_lag)
            self.last_acf[key] = acf
            summaries[key] = _summary(acf)
            for lag, value in enumerate(summaries[key][0], start=1):
                if np.isfinite(value):
                    scalars[f"autocorrelation/{key}_lag{lag}"] = float(value)
        self.last_step = step
        log_scalars(trainer, scalars, step=step)
        if self.log_images and summaries:
            log_image(trainer, "autocorrelation", self._figure(summaries, step), step=step)
        lag1 = scalars.get("autocorrelation/grads_lag1")
        if self.oscillation_thres is not None and lag1 is not None and lag1 < self.oscillation_thres:
            self._warner.warn(
                "oscillation",
                f"ModelAutocorrelation: step {step}: the mean lag-1 autocorrelation of the sampled gradients over the "
                f"last {self._filled} steps is {lag1:.3f} < {self.oscillation_thres:g}: the gradient flips sign from "
                "one step to the next, so the optimizer oscillates across a valley. Lower the learning rate (or "
                "raise Adam's beta1 / momentum).",
                step,
                rank=trainer.global_rank,
            )
        return scalars

    def _figure(self, summaries: dict[str, tuple[np.ndarray, ...]], step: int) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5, 3.2), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        lags = np.arange(1, self.max_lag + 1)
        for key, (mean, q25, q75) in summaries.items():
            (line,) = axes.plot(lags, mean, marker="o", label=f"{key} (mean)")
            axes.fill_between(lags, q25, q75, alpha=0.25, color=line.get_color(), label=f"{key} (25-75 %)")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xlabel("lag (optimizer steps)")
        axes.set_ylabel("autocorrelation")
        axes.set_ylim(-1.05, 1.05)
        axes.set_title(f"step {step}, window {self._filled} steps")
        axes.legend(fontsize="small")
        figure.tight_layout()
        return figure
