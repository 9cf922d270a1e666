"""``BaseTaskModule``: the Lightning module shared by every task.

A task owns an encoder (batch -> :class:`~matsciml.models.embeddings.Embeddings`), one
:class:`~matsciml.models.heads.OutputHead` per target, the losses, the target
normalisation, the metrics and the optimiser. It follows the task protocol
(:mod:`matsciml.models.tasks.protocol`): ``compute_losses`` does the forward pass and the
losses without side effects, and the ``*_step`` methods call it and log.

Hyperparameters are stored as plain data (import paths as strings, ``class_path`` /
``init_args`` mappings, numbers, lists), so a checkpoint loads with
``torch.load(weights_only=True)`` and ``Task.load_from_checkpoint(path)`` rebuilds the
task without running code from the file.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from matsciml.common.config import check_init_args, instantiate, is_spec, resolve_class
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.common.graph import get_graph, graph_index, num_graphs
from matsciml.datasets.schema import canonical_targets
from matsciml.models.heads import OutputHead
from matsciml.models.losses import build_loss, masked_loss
from matsciml.models.tasks.auto_normalize import TargetStatisticsMixin
from matsciml.models.tasks.metrics import REGRESSION, TaskMetrics
from matsciml.models.tasks.normalization import TargetNormalizer
from matsciml.models.tasks.optim import with_schedulers
from matsciml.models.tasks.plain import to_plain
from matsciml.models.tasks.steps import EvaluationStepsMixin
from matsciml.models.tasks.transfer import TransferMixin
from matsciml.registry import lookup

__all__ = ["BaseTaskModule", "to_plain"]

_REDUCTIONS = ("mean", "sum", "max")
_HEAD_ARGS = tuple(p for p in inspect.signature(OutputHead).parameters if p != "output_dim")
_SCHEDULER_KEYS = ("class_path", "init_args", "interval", "frequency", "monitor", "name", "strict")


def _canonical_normalize_kwargs(normalize_kwargs: Any) -> Any:
    """``{force_std: 2}`` -> ``{forces_std: 2}``: statistics keyed by the canonical target names."""
    if not isinstance(normalize_kwargs, Mapping):
        return normalize_kwargs
    out = {}
    for key, value in normalize_kwargs.items():
        base, sep, stat = str(key).rpartition("_")
        out[f"{canonical_targets([base])[0]}{sep}{stat}" if sep and base else key] = value
    return out


# ----------------------------------------------------------------------------- encoders
def _encoder_class(name: Any, where: str) -> Any:
    """Resolve an encoder class: a class, a dotted path, or a registered encoder name."""
    return lookup("encoder", name, where)


class BaseTaskModule(TargetStatisticsMixin, TransferMixin, EvaluationStepsMixin, pl.LightningModule):
    """Base of the tasks: encoder, output heads, losses, normalisation, metrics, optimiser.

    Use a concrete task (:class:`~matsciml.models.tasks.scalar.ScalarRegressionTask`,
    :class:`~matsciml.models.tasks.binary.BinaryClassificationTask`,
    :class:`~matsciml.models.tasks.forces.ForceRegressionTask`). Subclasses set
    ``default_loss``, ``default_task_keys``, and override ``_make_output_heads`` /
    ``_raw_predictions`` / ``_to_data_units`` as needed.

    Parameters
    ----------
    encoder
        An encoder instance. Its construction is not recorded, so
        ``load_from_checkpoint`` then needs ``encoder=...`` again; prefer
        ``encoder_class``. A ``class_path`` mapping here is treated as ``encoder_class``.
    encoder_class
        The encoder class: a class, an import path (``"matsciml.models.PLEGNNBackbone"``),
        a registered name (``"PLEGNNBackbone"``), or a ``{class_path, init_args}`` mapping.
    encoder_kwargs
        Keyword arguments of the encoder (merged over ``init_args``; nested
        ``class_path`` mappings are instantiated).
    loss_func
        Loss spec (see :func:`~matsciml.models.losses.build_loss`), or ``{key: spec}``.
        Default: the task's (MSE for scalar regression, BCE-with-logits for binary
        classification, L1 for forces).
    task_keys
        Target keys to train on (names in ``batch["targets"]``).
    output_kwargs
        Arguments of every :class:`~matsciml.models.heads.OutputHead` (``hidden_dim``
        default 128, ``input_dim`` default the encoder's ``embedding_dim``).
    lr
        AdamW learning rate, default ``1e-4``.
    weight_decay
        AdamW weight decay, default 0.
    embedding_reduction_type
        ``"mean"``, ``"sum"`` or ``"max"``: how atom embeddings are pooled when the
        encoder gives no system embedding (or one with extra dimensions).
    normalize_kwargs
        ``{<key>_mean, <key>_std}``: heads predict normalised targets, losses compare
        normalised values, predictions are returned in data units
        (:mod:`~matsciml.models.tasks.normalization`).
    scheduler_kwargs
        Learning-rate scheduler(s): a ``{class_path, init_args, interval?, frequency?,
        monitor?}`` mapping, a list of them, or the upstream form
        ``{SchedulerName: {kwargs}}`` (names from ``torch.optim.lr_scheduler``).
        ``interval`` defaults to ``"epoch"``; ``ReduceLROnPlateau`` monitors
        ``val_loss`` unless ``monitor`` is given.
    log_embeddings
        Log the mean and std of the system embedding during training.
    log_embeddings_every_n_steps
        How often, default 50 steps.
    task_loss_scaling
        ``{key: weight}`` of each key's loss in the total (default: the task's
        ``default_loss_scaling``, 1.0 for keys it does not name). Kept as the mutable
        dict ``task_loss_scaling``, read at every step.
    auto_normalize
        Default ``True``: at the start of ``fit``, targets without ``normalize_kwargs``
        are normalised with statistics of the training split
        (:mod:`~matsciml.models.tasks.statistics`; one pass, cached per dataset), which
        are logged and stored in the hyperparameters as ``target_stats``.
    target_stats
        Statistics to use instead of computing them (the form
        :func:`~matsciml.models.tasks.statistics.target_statistics` returns); filled
        in automatically and saved in checkpoints, so a reloaded task predicts in data
        units without the data. Hand-set ``normalize_kwargs`` win over them.

    Raises
    ------
    ConfigError
        Unknown arguments, no encoder, unknown task keys, bad head/loss/scheduler specs.

    Example YAML (model config)::

        encoder_class: {class_path: matsciml.models.PLEGNNBackbone}
        encoder_kwargs: {embed_in_dim: 128, embed_hidden_dim: 32, embed_out_dim: 128}
        output_kwargs: {hidden_dim: 128, num_hidden: 2, activation: torch.nn.SiLU}
        lr: 0.0001
        scheduler_kwargs:
          class_path: torch.optim.lr_scheduler.StepLR
          init_args: {step_size: 10, gamma: 0.5}
    """

    #: loss class used when ``loss_func`` is None
    default_loss: type[nn.Module] = nn.MSELoss
    #: task keys used when ``task_keys`` is None (None: the argument is required)
    default_task_keys: tuple[str, ...] | None = None
    #: task keys allowed (None: any)
    allowed_task_keys: tuple[str, ...] | None = None
    #: metric kind of every key: "regression" (MAE) or "binary" (accuracy)
    metric_kind: str = REGRESSION
    #: loss weight of each key when ``task_loss_scaling`` does not give one (others: 1.0)
    default_loss_scaling: dict[str, float] = {}
    #: keys that are extensive energies (per-element references in the statistics)
    extensive_keys: tuple[str, ...] = ()

    def __init__(
        self,
        encoder: nn.Module | None = None,
        encoder_class: Any = None,
        encoder_kwargs: dict[str, Any] | None = None,
        loss_func: Any = None,
        task_keys: list[str] | None = None,
        output_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        embedding_reduction_type: str = "mean",
        normalize_kwargs: dict[str, float] | None = None,
        scheduler_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
        log_embeddings: bool = False,
        log_embeddings_every_n_steps: int = 50,
        task_loss_scaling: dict[str, float] | None = None,
        auto_normalize: bool = True,
        target_stats: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if kwargs:
            valid = [p for p in inspect.signature(BaseTaskModule.__init__).parameters if p not in ("self", "kwargs")]
            bad = sorted(kwargs)[0]
            raise ConfigError(f"{name}: unknown argument {bad!r}; {closest(bad, valid)}")
        if is_spec(encoder):
            encoder, encoder_class = None, encoder
        self.task_keys: list[str] = self._resolve_task_keys(task_keys)
        self.encoder = self._build_encoder(encoder, encoder_class, encoder_kwargs)
        if embedding_reduction_type not in _REDUCTIONS:
            raise ConfigError(
                f"{name}: embedding_reduction_type {embedding_reduction_type!r} must be one of {_REDUCTIONS}"
            )
        self.embedding_reduction_type = embedding_reduction_type
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.output_kwargs = self._head_kwargs(output_kwargs)
        self.output_heads = self._make_output_heads()
        self.loss_funcs = self._make_losses(loss_func)
        normalize_kwargs = _canonical_normalize_kwargs(normalize_kwargs)
        self._normalize_kwargs = dict(normalize_kwargs or {})
        self.normalizer = self._make_normalizer(normalize_kwargs)
        self.auto_normalize = bool(auto_normalize)
        self.target_stats: dict[str, Any] = {}
        if target_stats:
            self._apply_target_stats(dict(target_stats))
            self.target_stats = dict(target_stats)
        self.task_loss_scaling: dict[str, float] = self._make_scaling(task_loss_scaling)
        self._scheduler_specs = self._parse_schedulers(scheduler_kwargs)
        self.log_embeddings = bool(log_embeddings)
        self.log_embeddings_every_n_steps = max(1, int(log_embeddings_every_n_steps))
        self.task_metrics = TaskMetrics(dict.fromkeys(self.task_keys, self.metric_kind))
        hparams = {
            "encoder_class": None if encoder is not None else to_plain(encoder_class, where="encoder_class"),
            "encoder_kwargs": to_plain(encoder_kwargs, where="encoder_kwargs"),
            "loss_func": to_plain(loss_func, where="loss_func"),
            "task_keys": list(self.task_keys),
            "output_kwargs": to_plain(output_kwargs, where="output_kwargs"),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "embedding_reduction_type": embedding_reduction_type,
            "normalize_kwargs": to_plain(normalize_kwargs, where="normalize_kwargs"),
            "scheduler_kwargs": to_plain(scheduler_kwargs, where="scheduler_kwargs"),
            "log_embeddings": self.log_embeddings,
            "log_embeddings_every_n_steps": self.log_embeddings_every_n_steps,
            "task_loss_scaling": to_plain(task_loss_scaling, where="task_loss_scaling"),
            "auto_normalize": self.auto_normalize,
            "target_stats": to_plain(target_stats, where="target_stats"),
        }
        self.save_hyperparameters(hparams)

    # ------------------------------------------------------------------ construction
    def _resolve_task_keys(self, task_keys: Any) -> list[str]:
        name = type(self).__name__
        if task_keys is None:
            if self.default_task_keys is None:
                raise ConfigError(
                    f"{name}: task_keys is required: the names of the targets to predict (the experiment YAML's "
                    "'targets', e.g. [band_gap])"
                )
            task_keys = list(self.default_task_keys)
        if isinstance(task_keys, str):
            task_keys = [task_keys]
        keys = canonical_targets([str(k) for k in task_keys]) or []
        if not keys:
            raise ConfigError(f"{name}: task_keys is empty; give at least one target key")
        if self.allowed_task_keys is not None:
            for key in keys:
                if key not in self.allowed_task_keys:
                    raise ConfigError(
                        f"{name}: task key {key!r} is not supported; {closest(key, self.allowed_task_keys)}"
                    )
        return keys

    def _build_encoder(self, encoder: Any, encoder_class: Any, encoder_kwargs: Any) -> nn.Module:
        name = type(self).__name__
        if encoder is not None and encoder_class is not None:
            raise ConfigError(f"{name}: give either encoder (an instance) or encoder_class, not both")
        if encoder is not None:
            if not isinstance(encoder, nn.Module):
                raise ConfigError(f"{name}: encoder must be a torch.nn.Module, got {type(encoder).__name__}")
            rank_zero_warn(
                f"{name} got an encoder instance: its construction is not saved in the hyperparameters, so "
                "load_from_checkpoint will need encoder=... again (pass encoder_class/encoder_kwargs to avoid this)"
            )
            return encoder
        if encoder_class is None:
            raise ConfigError(
                f"{name} needs an encoder: give encoder_class (+ encoder_kwargs), e.g. "
                "encoder_class: {class_path: matsciml.models.PLEGNNBackbone}. A checkpoint of a task built from an "
                "encoder instance loads with load_from_checkpoint(path, encoder=<the same encoder>)."
            )
        init_args: dict[str, Any] = {}
        if is_spec(encoder_class):
            init_args = dict(encoder_class.get("init_args") or {})
            target = encoder_class.get("class_path") or encoder_class.get("class_instance")
        else:
            target = encoder_class
        cls = _encoder_class(target, "encoder_class")
        if not isinstance(encoder_kwargs, (Mapping, type(None))):
            raise ConfigError(f"{name}: encoder_kwargs must be a mapping, got {type(encoder_kwargs).__name__}")
        init_args.update(encoder_kwargs or {})
        check_init_args(cls, init_args, "encoder_kwargs")
        kwargs = {k: instantiate(v, f"encoder_kwargs.{k}") for k, v in init_args.items()}
        module = cls(**kwargs)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{name}: encoder_class {target!r} did not give a torch.nn.Module")
        return module

    def _head_kwargs(self, output_kwargs: Any) -> dict[str, Any]:
        name = type(self).__name__
        kwargs = dict(output_kwargs or {})
        for key in kwargs:
            if key not in (*_HEAD_ARGS, "output_dim"):
                raise ConfigError(
                    f"{name}: output_kwargs key {key!r} is not an OutputHead argument; {closest(key, _HEAD_ARGS)}"
                )
        if kwargs.pop("output_dim", 1) != 1:
            raise ConfigError(f"{name}: output_kwargs.output_dim is set by the task (1 per target); remove it")
        kwargs.setdefault("hidden_dim", 128)
        emb_dim = getattr(self.encoder, "embedding_dim", None)
        if not kwargs.get("lazy", False):
            if kwargs.get("input_dim") is None:
                if emb_dim is None:
                    raise ConfigError(
                        f"{name}: the encoder has no embedding_dim attribute; set output_kwargs.input_dim to its "
                        "output width (or output_kwargs.lazy: true)"
                    )
                kwargs["input_dim"] = int(emb_dim)
            elif emb_dim is not None and int(kwargs["input_dim"]) != int(emb_dim):
                raise ConfigError(
                    f"{name}: output_kwargs.input_dim is {kwargs['input_dim']} but the encoder's embedding_dim is "
                    f"{emb_dim}; make them equal (or drop input_dim)"
                )
        return kwargs

    def _make_output_heads(self) -> nn.ModuleDict:
        """One head with one output per task key (override for other layouts)."""
        return nn.ModuleDict({key: OutputHead(output_dim=1, **self.output_kwargs) for key in self.task_keys})

    def _make_losses(self, loss_func: Any) -> nn.ModuleDict:
        name = type(self).__name__
        if isinstance(loss_func, Mapping) and not is_spec(loss_func):
            for key in loss_func:
                if key not in self.task_keys:
                    raise ConfigError(
                        f"{name}: loss_func key {key!r} is not a task key; {closest(str(key), self.task_keys)}"
                    )
            specs = {key: loss_func.get(key) for key in self.task_keys}
        else:
            specs = dict.fromkeys(self.task_keys, loss_func)
        return nn.ModuleDict(
            {key: build_loss(spec, self.default_loss, f"loss_func ({name}, {key})") for key, spec in specs.items()}
        )

    def _make_normalizer(self, normalize_kwargs: Any) -> TargetNormalizer:
        return TargetNormalizer(normalize_kwargs, self.task_keys)

    def _make_scaling(self, task_loss_scaling: Any) -> dict[str, float]:
        name = type(self).__name__
        scaling = {key: float(self.default_loss_scaling.get(key, 1.0)) for key in self.task_keys}
        for key, value in (task_loss_scaling or {}).items():
            try:
                scaling[str(key)] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: task_loss_scaling.{key} must be a number, got {value!r}") from None
            if key not in self.task_keys:
                rank_zero_warn(f"{name}: task_loss_scaling has {key!r}, which is not a task key {self.task_keys}")
        return scaling

    def _parse_schedulers(self, spec: Any) -> list[dict[str, Any]]:
        name = type(self).__name__
        if not spec:
            return []
        if is_spec(spec):
            specs = [dict(spec)]
        elif isinstance(spec, list):
            specs = [dict(s) for s in spec]
        elif isinstance(spec, Mapping):
            specs = [{"class_path": key, "init_args": dict(value or {})} for key, value in spec.items()]
        else:
            raise ConfigError(f"{name}: scheduler_kwargs must be a mapping or a list of mappings, got {spec!r}")
        out = []
        for i, item in enumerate(specs):
            where = f"scheduler_kwargs[{i}]"
            if "class_path" not in item:
                raise ConfigError(f"{where}: needs class_path (e.g. torch.optim.lr_scheduler.StepLR)")
            for key in item:
                if key not in _SCHEDULER_KEYS:
                    raise ConfigError(f"{where}: unknown key {key!r}; {closest(key, _SCHEDULER_KEYS)}")
            path = item["class_path"]
            if isinstance(path, str) and "." not in path:
                if not hasattr(torch.optim.lr_scheduler, path):
                    names = [n for n in dir(torch.optim.lr_scheduler) if n[0].isupper()]
                    raise ConfigError(f"{where}: {path!r} is not in torch.optim.lr_scheduler; {closest(path, names)}")
                path = f"torch.optim.lr_scheduler.{path}"
            cls = resolve_class(path, where)
            check_init_args(cls, dict(item.get("init_args") or {}), where)
            out.append({**item, "class_path": cls})
        return out

    # ------------------------------------------------------------------ forward pass
    def _batch_size(self, batch: Any) -> int:
        if isinstance(batch, Mapping) and batch.get("batch_size") is not None:
            return int(batch["batch_size"])
        return num_graphs(get_graph(batch))

    def _system_embedding(self, embeddings: Any, batch: Any) -> torch.Tensor:
        """``[num_graphs, D]`` system embedding, pooling atom embeddings when needed."""
        if isinstance(embeddings, torch.Tensor):
            system, points = embeddings, None
        else:
            system, points = embeddings.system_embedding, embeddings.point_embedding
        reduce = self.embedding_reduction_type
        if system is None:
            if points is None:
                raise ValueError(f"{type(self.encoder).__name__} returned neither a system nor a point embedding")
            index = graph_index(get_graph(batch)).to(points.device)
            size = self._batch_size(batch)
            out = points.new_zeros(size, points.shape[-1])
            op = {"mean": "mean", "sum": "sum", "max": "amax"}[reduce]
            return out.scatter_reduce(0, index[:, None].expand_as(points), points, reduce=op, include_self=False)
        if system.dim() > 2:
            dims = tuple(range(1, system.dim() - 1))
            system = {"mean": system.mean, "sum": system.sum, "max": system.amax}[reduce](dim=dims)
        return system

    def _raw_predictions(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """``({key: prediction in normalised units (logits for binary)}, embeddings)``."""
        embeddings = self.encoder(batch)
        system = self._system_embedding(embeddings, batch)
        return {key: self.output_heads[key](system).squeeze(-1) for key in self.task_keys}, embeddings

    def _to_data_units(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denorm(key, value)

    def _loss_target(self, key: str, target: torch.Tensor) -> torch.Tensor:
        return self.normalizer.norm(key, target)

    def _target(self, batch: Any, key: str, like: torch.Tensor) -> torch.Tensor:
        targets = batch.get("targets") if isinstance(batch, Mapping) else None
        if not isinstance(targets, Mapping) or key not in targets:
            ids = list(batch.get("ids") or [])[:3] if isinstance(batch, Mapping) else []
            present = sorted(targets) if isinstance(targets, Mapping) else []
            raise DataError(
                f"{type(self).__name__}: the batch (first ids {ids}) has no target {key!r} (targets present: "
                f"{present}); check the dataset's target keys and the task's task_keys"
            )
        target = torch.as_tensor(targets[key]).to(device=like.device, dtype=like.dtype)
        if target.numel() != like.numel():
            ids = list(batch.get("ids") or [])[:3]
            raise DataError(
                f"{type(self).__name__}: target {key!r} of the batch (first ids {ids}) has shape "
                f"{tuple(target.shape)} but the task predicts {tuple(like.shape)} "
                f"({self._target_layout(key)})"
            )
        return target.reshape(like.shape)

    def _target_layout(self, key: str) -> str:
        """How the target of ``key`` is laid out, for error messages."""
        return "one number per structure, [num_graphs]"

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        """Forward pass and losses of ``batch`` (pure: logs nothing, changes no state).

        Returns
        -------
        dict
            ``loss`` (scalar: sum of ``task_loss_scaling[key] * per_key[key]``),
            ``per_key`` ``{key: scalar loss}`` in normalised units, ``counts``
            ``{key: number of target elements used}`` (non-finite targets are skipped),
            ``predictions`` ``{key: Tensor}`` in data units, ``batch_size`` and
            ``embeddings``. See :mod:`matsciml.models.tasks.protocol`.

        Raises
        ------
        DataError
            A task key is missing from ``batch["targets"]`` or has the wrong size.
        """
        raw, embeddings = self._raw_predictions(batch)
        per_key: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for key in self.task_keys:
            target = self._loss_target(key, self._target(batch, key, raw[key]))
            per_key[key], counts[key] = masked_loss(self.loss_funcs[key], raw[key], target)
        loss = sum(float(self.task_loss_scaling.get(key, 1.0)) * per_key[key] for key in self.task_keys)
        predictions = {key: self._to_data_units(key, value) for key, value in raw.items()}
        return {
            "loss": loss,
            "per_key": per_key,
            "counts": counts,
            "predictions": predictions,
            "batch_size": self._batch_size(batch),
            "embeddings": embeddings,
        }

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions ``{key: Tensor}`` in data units (probabilities for binary keys)."""
        raw, _ = self._raw_predictions(batch)
        return {key: self._to_data_units(key, value) for key, value in raw.items()}

    # ------------------------------------------------------------------ Lightning hooks
    def _metric_targets(self, batch: Any, result: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{task key: target}`` in data units, shaped like the predictions (for the metrics)."""
        return {key: self._target(batch, key, result["predictions"][key]) for key in self.task_keys}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """``compute_losses``, then log the ``train_*`` metrics; returns the loss."""
        result = self.compute_losses(batch)
        self._log_metrics("train", result, batch, batch_idx)
        if self.log_embeddings and self.global_step % self.log_embeddings_every_n_steps == 0:
            system = self._system_embedding(result["embeddings"], batch).detach()
            self._log_embedding_stats("train", system, result["batch_size"])
        return result["loss"]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"ids": [...], key: prediction}`` in data units (detached)."""
        predictions = self(batch)
        ids = list(batch.get("ids") or []) if isinstance(batch, Mapping) else []
        return {"ids": ids, **{key: value.detach() for key, value in predictions.items()}}

    def configure_optimizers(self) -> Any:
        """AdamW(``lr``, ``weight_decay``) over the trainable parameters, and the schedulers of ``scheduler_kwargs``.

        With :attr:`encoder_lr` set, the encoder's parameters form a second group with
        that learning rate. Frozen parameters (``requires_grad=False``) are left out.
        """
        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=self.lr, weight_decay=self.weight_decay)
        return with_schedulers(optimizer, self._scheduler_specs)

    # ------------------------------------------------------------------ transfer
    @classmethod
    def from_pretrained_encoder(cls, task_ckpt_path: str | Path, **kwargs: Any) -> BaseTaskModule:
        """A new task whose encoder starts from the encoder of a saved task.

        The encoder is rebuilt from the checkpoint's ``encoder_class``/``encoder_kwargs``
        (unless ``encoder``, ``encoder_class`` or ``encoder_kwargs`` is given) and its
        weights loaded; the heads are new. ``kwargs`` are the task's arguments.

        Raises
        ------
        ConfigError
            The checkpoint holds no encoder weights.
        """
        path = Path(task_ckpt_path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        hparams = checkpoint.get("hyper_parameters", {})
        if not any(k in kwargs for k in ("encoder", "encoder_class", "encoder_kwargs")):
            kwargs["encoder_class"] = hparams.get("encoder_class")
            kwargs["encoder_kwargs"] = hparams.get("encoder_kwargs")
        task = cls(**kwargs)
        weights = {
            k[len("encoder.") :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("encoder.")
        }
        if not weights:
            raise ConfigError(f"{path}: the checkpoint has no 'encoder.*' weights in its state_dict")
        task.encoder.load_state_dict(weights)
        return task
