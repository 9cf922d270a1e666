"""``MultiTaskLitModule``: one shared encoder, tasks on several datasets, one optimizer.

Each *pair* is a dataset name and a task (:class:`~matsciml.models.tasks.base.BaseTaskModule`
subclass) with its own heads, losses, normalisation and per-key loss weights. The pairs
share one encoder (the first task's). A batch is a mapping from dataset name to that
dataset's collated batch (what :class:`~matsciml.datasets.multi_dataset.MultiDataset`
gives), plus ``batch_size`` (the total number of structures)::

    {"oqmd": {graph, targets, ...}, "lips": {graph, targets, ...}, "batch_size": 8}

A pair's loss is its task's ``compute_losses`` on its own dataset's sub-batch only, so
each loss sees exactly its own structures and targets; a dataset absent from a batch
contributes nothing to that step. The total loss is::

    sum over pairs p present: task_scaling[p] * sum over keys k of p:
        task_loss_scaling["<dataset>_<k>"] * per_key["<dataset>_<k>"]

Each task runs its own forward pass through the shared encoder on its dataset's
sub-batch (a dataset with two tasks is encoded twice per step; force tasks need their
own pass with gradients on the positions anyway).

Training uses automatic optimisation with one AdamW optimizer whose parameter groups are
the encoder (``encoder_opt_kwargs`` ``lr``/``weight_decay``, default the first task's)
and each pair's own parameters (that task's ``lr``/``weight_decay``); so EMA, SAM,
gradient accumulation, DDP and every monitor apply to it unchanged.

The task protocol (:mod:`matsciml.models.tasks.protocol`) holds with *pair keys*
``"<dataset>_<task key>"``: ``task_keys``, ``task_loss_scaling``, ``per_key`` and the
logged metrics ``<split>_<dataset>_<key>``, ``<split>_<dataset>_<key>_mae`` (or
``_accuracy``), besides ``<split>_loss`` / ``<split>_total`` over all pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from matsciml.common.config import is_spec
from matsciml.common.errors import ConfigError, DataError, closest
from matsciml.models.tasks.base import BaseTaskModule
from matsciml.models.tasks.metrics import TaskMetrics
from matsciml.models.tasks.optim import with_schedulers
from matsciml.models.tasks.plain import _class_path, to_plain
from matsciml.models.tasks.steps import EvaluationStepsMixin
from matsciml.registry import register_task

__all__ = ["MultiTaskLitModule", "RESERVED_BATCH_KEYS"]

#: Keys of a multi-dataset batch that are not dataset names.
RESERVED_BATCH_KEYS = ("batch_size",)
_OPT_KEYS = ("lr", "weight_decay", "scheduler_kwargs")


def _build_task(entry: Any, index: int) -> tuple[str, BaseTaskModule]:
    """``(dataset name, task)`` from a tuple ``(name, task | spec)`` or a ``{dataset, class_path, init_args}`` mapping."""
    where = f"MultiTaskLitModule task {index}"
    if isinstance(entry, Mapping):
        if "dataset" not in entry or "class_path" not in entry:
            raise ConfigError(f"{where}: a mapping needs 'dataset' and 'class_path' (and 'init_args')")
        name, task = entry["dataset"], {"class_path": entry["class_path"], "init_args": entry.get("init_args") or {}}
    elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
        name, task = entry
    else:
        raise ConfigError(f"{where}: expected a (dataset name, task) pair, got {entry!r}")
    if not isinstance(name, str) or not name or name in RESERVED_BATCH_KEYS or "." in name:
        raise ConfigError(f"{where}: dataset name {name!r} must be a non-empty string without '.', not 'batch_size'")
    if is_spec(task):
        from matsciml.registry import lookup

        cls = lookup("task", task["class_path"], where)
        task = cls(**dict(task.get("init_args") or {}))
    if not isinstance(task, BaseTaskModule):
        raise ConfigError(f"{where}: {type(task).__name__} is not a task (a BaseTaskModule subclass)")
    return name, task


class MultiTaskLitModule(EvaluationStepsMixin, pl.LightningModule):
    """Train one encoder on several (dataset, task) pairs at once.

    Parameters
    ----------
    *tasks
        ``(dataset name, task)`` pairs (upstream form): a task instance, or a
        ``{class_path, init_args}`` mapping of one. The first task's encoder becomes
        the shared encoder; the others' encoders are dropped (a warning says so when
        their ``encoder_class``/``encoder_kwargs`` differ). A dataset may have several
        tasks of different classes.
    task_scaling
        Weight of each pair's loss in the total: a list in the order of ``tasks``, or a
        mapping from ``"<dataset>_<TaskClass>"`` (or the dataset name, for all its
        tasks) to a weight. Default 1.0 each. Kept as the mutable list ``task_scaling``.
    task_keys
        Upstream's ``{dataset: {TaskClass: [keys]}}``; checked against the tasks' own
        keys (give the keys to the tasks).
    log_embeddings, log_embeddings_every_n_steps
        Log the mean and std of each dataset's system embedding
        (``train_<dataset>_embedding_mean``/``_std``) every so many steps.
    encoder_opt_kwargs
        ``lr``, ``weight_decay`` of the encoder's parameter group (default the first
        task's) and ``scheduler_kwargs`` (as for a task) of the optimizer. Upstream
        passes them as extra keyword arguments, which are accepted too.
    tasks
        The plain-data form of ``*tasks`` stored in the hyperparameters:
        ``[{dataset, class_path, init_args}, ...]`` (used by ``load_from_checkpoint``).

    Raises
    ------
    ConfigError
        No task, a bad pair, two tasks of one class on one dataset, two pairs with the
        same pair key, a bad ``task_scaling``, unknown optimizer arguments.

    Example::

        scalar = ScalarRegressionTask(encoder_class="PLEGNNBackbone", encoder_kwargs=enc, task_keys=["band_gap"])
        forces = ForceRegressionTask(encoder_class="PLEGNNBackbone", encoder_kwargs=enc)
        task = MultiTaskLitModule(("oqmd", scalar), ("lips", forces), task_scaling=[1.0, 0.5])

    Example YAML (experiment config of the runner)::

        model: egnn_small
        dataset:
          oqmd_devset: [{task: ScalarRegressionTask, targets: [band_gap]}]
          lips_devset: [{task: ForceRegressionTask, targets: [energy, forces]}]
    """

    def __init__(
        self,
        *tasks: Any,
        task_scaling: Iterable[float] | Mapping[str, float] | None = None,
        task_keys: Mapping[str, Mapping[str, list[str]]] | None = None,
        log_embeddings: bool = False,
        log_embeddings_every_n_steps: int = 50,
        encoder_opt_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        specs = kwargs.pop("tasks", None)
        entries = list(tasks) + list(specs or [])
        opt_kwargs = {**dict(encoder_opt_kwargs or {}), **kwargs}
        for key in opt_kwargs:
            if key not in _OPT_KEYS:
                raise ConfigError(f"MultiTaskLitModule: unknown argument {key!r}; {closest(key, _OPT_KEYS)}")
        if not entries:
            raise ConfigError("MultiTaskLitModule needs at least one (dataset name, task) pair")
        pairs = [_build_task(entry, i) for i, entry in enumerate(entries)]
        self.encoder = pairs[0][1].encoder
        self.task_map = nn.ModuleDict()
        self.pairs: list[tuple[str, str]] = []
        hparam_tasks = []
        for name, task in pairs:
            self._adopt(name, task, pairs[0][1])
            hparam_tasks.append(
                {"dataset": name, "class_path": _class_path(type(task)), "init_args": to_plain(dict(task.hparams))}
            )
        self.task_keys: list[str] = [f"{ds}_{key}" for ds, task in self.iter_tasks() for key in task.task_keys]
        duplicated = sorted({k for k in self.task_keys if self.task_keys.count(k) > 1})
        if duplicated:
            raise ConfigError(f"MultiTaskLitModule: two tasks of one dataset predict the same target(s) {duplicated}")
        self.task_loss_scaling: dict[str, float] = {
            f"{ds}_{key}": float(task.task_loss_scaling.get(key, 1.0))
            for ds, task in self.iter_tasks()
            for key in task.task_keys
        }
        self.task_scaling: list[float] = self._parse_scaling(task_scaling)
        self._check_task_keys(task_keys)
        first = pairs[0][1]
        self.encoder_lr = float(opt_kwargs.get("lr", first.lr))
        self.encoder_weight_decay = float(opt_kwargs.get("weight_decay", first.weight_decay))
        self._scheduler_specs = BaseTaskModule._parse_schedulers(self, opt_kwargs.get("scheduler_kwargs"))
        self.log_embeddings = bool(log_embeddings)
        self.log_embeddings_every_n_steps = max(1, int(log_embeddings_every_n_steps))
        self.task_metrics = TaskMetrics(
            {f"{ds}_{k}": task.metric_kind for ds, task in self.iter_tasks() for k in task.task_keys}
        )
        self.save_hyperparameters(
            {
                "tasks": hparam_tasks,
                "task_scaling": list(self.task_scaling),
                "log_embeddings": self.log_embeddings,
                "log_embeddings_every_n_steps": self.log_embeddings_every_n_steps,
                "encoder_opt_kwargs": to_plain(opt_kwargs, where="encoder_opt_kwargs"),
            }
        )

    # ------------------------------------------------------------------ construction
    def _adopt(self, name: str, task: BaseTaskModule, first: BaseTaskModule) -> None:
        """Nest ``task`` under ``task_map[name]`` with the shared encoder (held, not registered, by the task)."""
        group = self.task_map[name] if name in self.task_map else nn.ModuleDict()
        label = type(task).__name__
        if label in group:
            raise ConfigError(f"MultiTaskLitModule: dataset {name!r} has two {label}s; give one with all its keys")
        if task is not first:
            mine = (task.hparams.get("encoder_class"), task.hparams.get("encoder_kwargs"))
            if mine != (first.hparams.get("encoder_class"), first.hparams.get("encoder_kwargs")):
                rank_zero_warn(
                    f"MultiTaskLitModule: the {label} of {name!r} was built with another encoder than the first task; "
                    "the first task's encoder is shared by all"
                )
        task._modules.pop("encoder", None)
        object.__setattr__(task, "encoder", self.encoder)  # a reference: the weights live once, in self.encoder
        group[label] = task
        self.task_map[name] = group
        self.pairs.append((name, label))

    def _parse_scaling(self, scaling: Any) -> list[float]:
        labels = [f"{ds}_{label}" for ds, label in self.pairs]
        if scaling is None:
            return [1.0] * len(labels)
        if isinstance(scaling, Mapping):
            out = []
            for (ds, _), label in zip(self.pairs, labels):
                out.append(float(scaling.get(label, scaling.get(ds, 1.0))))
            for key in scaling:
                if key not in labels and key not in self.task_map:
                    raise ConfigError(
                        f"MultiTaskLitModule: task_scaling key {key!r} names no pair; {closest(str(key), labels)}"
                    )
            return out
        values = [float(v) for v in scaling]
        if len(values) != len(labels):
            raise ConfigError(
                f"MultiTaskLitModule: task_scaling has {len(values)} values for {len(labels)} pairs ({labels})"
            )
        return values

    def _check_task_keys(self, task_keys: Any) -> None:
        for ds, per_task in (task_keys or {}).items():
            for label, keys in (per_task or {}).items():
                task = self.task_map[ds][label] if ds in self.task_map and label in self.task_map[ds] else None
                if task is None:
                    raise ConfigError(
                        f"MultiTaskLitModule: task_keys names {ds}.{label}, which is not a pair {self.pairs}"
                    )
                if list(keys) != list(task.task_keys):
                    raise ConfigError(
                        f"MultiTaskLitModule: task_keys[{ds}][{label}] = {list(keys)} but the task predicts "
                        f"{task.task_keys}; give the keys to the task"
                    )

    # ------------------------------------------------------------------ structure
    def iter_tasks(self) -> Iterable[tuple[str, BaseTaskModule]]:
        """``(dataset name, task)`` of every pair, in the order given."""
        for ds, label in self.pairs:
            yield ds, self.task_map[ds][label]

    @property
    def dataset_names(self) -> list[str]:
        """Dataset names, in the order of the pairs."""
        return list(self.task_map.keys())

    @property
    def dataset_task_pairs(self) -> list[tuple[str, str]]:
        """``(dataset name, task class name)`` of every pair (upstream attribute)."""
        return list(self.pairs)

    @property
    def output_heads(self) -> nn.ModuleDict:
        """Every pair's heads, keyed ``"<dataset>_<head>"`` (a view: the heads live in ``task_map``)."""
        return nn.ModuleDict(
            {f"{ds}_{key}": head for ds, task in self.iter_tasks() for key, head in task.output_heads.items()}
        )

    @property
    def metric_kinds(self) -> dict[str, str]:
        """``{pair key: metric kind}`` ("regression", "binary", "multiclass")."""
        return dict(self.task_metrics.kinds)

    # ------------------------------------------------------------------ forward pass
    def _sub_batches(self, batch: Any) -> list[tuple[str, Any]]:
        if not isinstance(batch, Mapping):
            raise DataError(
                f"MultiTaskLitModule expects a mapping from dataset name to batch, got {type(batch).__name__}; "
                "load the data with MultiDataModule (or MultiDataset.collate_fn)"
            )
        unknown = [k for k in batch if k not in self.task_map and k not in RESERVED_BATCH_KEYS]
        if unknown:
            raise DataError(
                f"MultiTaskLitModule: the batch holds dataset {unknown[0]!r}, which has no task "
                f"({closest(str(unknown[0]), self.dataset_names)}); check the dataset names of the data and the tasks"
            )
        present = [(ds, batch[ds]) for ds in self.task_map if ds in batch]
        if not present:
            raise DataError(f"MultiTaskLitModule: the batch holds none of the datasets {self.dataset_names}")
        return present

    def compute_losses(self, batch: Any) -> dict[str, Any]:
        """Losses of every pair present in ``batch``, each on its own dataset's structures (pure).

        Returns
        -------
        dict
            ``loss`` (see the module docstring), ``per_key``/``counts``/``predictions``
            keyed by pair key (only the pairs present), ``batch_size`` (structures of
            all datasets), ``per_dataset`` ``{dataset: {task class: result}}`` (the
            tasks' own ``compute_losses`` results).

        Raises
        ------
        DataError
            Not a multi-dataset batch, an unknown dataset name, or no known dataset.
        """
        scaling = dict(zip(self.pairs, self.task_scaling))
        per_key: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        predictions: dict[str, torch.Tensor] = {}
        per_dataset: dict[str, dict[str, Any]] = {}
        loss: Any = 0.0
        batch_size = 0
        for ds, sub in self._sub_batches(batch):
            group = self.task_map[ds]
            batch_size += group[next(iter(group))]._batch_size(sub)
            per_dataset[ds] = {}
            for label, task in group.items():
                result = task.compute_losses(sub)
                per_dataset[ds][label] = result
                for key in task.task_keys:
                    name = f"{ds}_{key}"
                    per_key[name] = result["per_key"][key]
                    counts[name] = result.get("counts", {}).get(key, result["batch_size"])
                    predictions[name] = result["predictions"][key]
                    weight = scaling[(ds, label)] * float(self.task_loss_scaling.get(name, 1.0))
                    loss = loss + weight * per_key[name]
        if torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized():
            # under DDP every parameter must take part in every backward pass: the pairs absent from this
            # batch add zero, so their gradients are zero on this rank and the all-reduce stays in step
            absent = [task for ds, task in self.iter_tasks() if ds not in per_dataset]
            for task in absent:
                loss = loss + sum(p.sum() for p in task.parameters() if p.requires_grad) * 0.0
        return {
            "loss": loss,
            "per_key": per_key,
            "counts": counts,
            "predictions": predictions,
            "batch_size": batch_size,
            "per_dataset": per_dataset,
        }

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Predictions ``{pair key: Tensor}`` in data units, for the datasets present in ``batch``."""
        out: dict[str, torch.Tensor] = {}
        for ds, sub in self._sub_batches(batch):
            for task in self.task_map[ds].values():
                out.update({f"{ds}_{key}": value for key, value in task(sub).items()})
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def _metric_targets(self, batch: Any, result: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{pair key: target}`` in data units for the pairs present in ``result`` (for the metrics)."""
        targets = {}
        for ds, task in self.iter_tasks():
            for key in task.task_keys:
                name = f"{ds}_{key}"
                if name in result["predictions"]:
                    targets[name] = task._target(batch[ds], key, result["predictions"][name])
        return targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """``compute_losses``, then log the ``train_*`` metrics; returns the loss."""
        result = self.compute_losses(batch)
        self._log_metrics("train", result, batch, batch_idx)
        if self.log_embeddings and self.global_step % self.log_embeddings_every_n_steps == 0:
            for ds, results in result["per_dataset"].items():
                label, first = next(iter(results.items()))
                system = self.task_map[ds][label]._system_embedding(first["embeddings"], batch[ds]).detach()
                self._log_embedding_stats(f"train_{ds}", system, first["batch_size"])
        return result["loss"]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{dataset: task.predict_step(sub-batch)}`` for the datasets present (one dict per task class)."""
        out: dict[str, Any] = {}
        for ds, sub in self._sub_batches(batch):
            out[ds] = {
                label: task.predict_step(sub, batch_idx, dataloader_idx) for label, task in self.task_map[ds].items()
            }
        return out

    def configure_optimizers(self) -> Any:
        """One AdamW: the encoder's group, then one group per pair (its task's ``lr``/``weight_decay``)."""
        groups = [
            {
                "params": list(self.encoder.parameters()),
                "lr": self.encoder_lr,
                "weight_decay": self.encoder_weight_decay,
            }
        ]
        for ds, label in self.pairs:
            task = self.task_map[ds][label]
            params = [p for p in task.parameters()]
            if params:
                groups.append(
                    {"params": params, "lr": task.lr, "weight_decay": task.weight_decay, "name": f"{ds}_{label}"}
                )
        optimizer = torch.optim.AdamW(groups, lr=self.encoder_lr, weight_decay=self.encoder_weight_decay)
        return with_schedulers(optimizer, self._scheduler_specs)

    # ------------------------------------------------------------------ transfer
    def task_for(self, dataset: str, task: str | None = None) -> BaseTaskModule:
        """The task of ``dataset`` (the only one, or the one of class name ``task``); it holds the shared encoder.

        Raises
        ------
        ConfigError
            Unknown dataset or task class, or several tasks and ``task`` not given.
        """
        if dataset not in self.task_map:
            raise ConfigError(f"MultiTaskLitModule has no dataset {dataset!r}; {closest(dataset, self.dataset_names)}")
        group = self.task_map[dataset]
        if task is None:
            if len(group) != 1:
                raise ConfigError(f"dataset {dataset!r} has tasks {list(group)}; name one")
            return group[next(iter(group))]
        if task not in group:
            raise ConfigError(f"dataset {dataset!r} has no {task}; {closest(task, list(group))}")
        return group[task]


register_task(MultiTaskLitModule, aliases=["multitask"])
