"""Build callbacks from YAML: ``class_path`` + ``init_args``, or ``kind`` + ``every_n_*`` + arguments.

Two spellings are accepted, and may be mixed in one list:

* Lightning CLI style (upstream matsciml trainer configs)::

      callbacks:
        - class_path: lightning.pytorch.callbacks.EarlyStopping
          init_args: {monitor: val_loss, patience: 5}
        - class_path: pytorch_lightning.callbacks.LearningRateMonitor   # old prefix: same class

* ``kind`` style: ``kind`` names the class (an import path or a short name, see
  :data:`ALIASES`), at most one of ``every_n_epochs`` / ``every_n_updates`` /
  ``every_n_samples`` says how often a periodic callback runs, and every other key is
  a constructor argument::

      callbacks:
        - kind: ema
          decay: 0.999
        - kind: my_package.callbacks.ValidationPlots
          every_n_epochs: 5
          dataset: val
        - metadata                           # a bare name: no arguments

Short names are matched without regard to case, ``_`` and ``-``: ``ema``, ``EMA`` and
``ExponentialMovingAverageCallback`` are the same class. Besides :data:`ALIASES`, the
names of the callback classes of the modules of :mod:`matsciml.lightning.callbacks`
(``kind: MetricEarlyStopping`` or ``metric_early_stopping``) and of
:mod:`lightning.pytorch.callbacks` (``kind: LearningRateMonitor``) are short names.

The callbacks are returned in list order, which is the order Lightning calls them in
(except that Lightning moves checkpoint callbacks such as ``ModelCheckpoint`` to the
end, so that they save after the other callbacks' hooks ran). The train-end stages
(:mod:`~matsciml.lightning.callbacks.train_end`) run in their own fixed order.

Every error is a :class:`~matsciml.common.errors.ConfigError` naming the entry
(``<where>[i]``), the key at fault and the closest valid names.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from matsciml.common.config import instantiate, resolve_class
from matsciml.common.errors import ConfigError, closest
from matsciml.registry import import_path, registry

__all__ = [
    "ALIASES",
    "ARGUMENT_ALIASES",
    "PERIOD_KEYS",
    "build_callbacks",
    "build_callback",
    "resolve_kind",
    "register_builtin_callbacks",
]

#: Short names of callbacks (matched ignoring case, ``_`` and ``-``).
ALIASES: dict[str, str] = {
    "ema": "matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback",
    "sam": "matsciml.lightning.callbacks.sam.SAM",
    "test_on_train_end": "matsciml.lightning.callbacks.train_end.TestOnTrainEnd",
    "export_on_train_end": "matsciml.lightning.callbacks.train_end.ExportOnTrainEnd",
    "archive_on_train_end": "matsciml.lightning.callbacks.train_end.ArchiveOnTrainEnd",
    "metadata": "matsciml.lightning.callbacks.metadata.MetadataLogger",
    "checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint",
    "model_checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint",
    "early_stopping": "lightning.pytorch.callbacks.EarlyStopping",
    "lr_monitor": "lightning.pytorch.callbacks.LearningRateMonitor",
    "codecarbon": "matsciml.lightning.callbacks.emissions.CodeCarbonCallback",
    "emissions": "matsciml.lightning.callbacks.emissions.CodeCarbonCallback",
    # the class names of other frameworks (Noether, luxonis-train)
    "EMACallback": "matsciml.lightning.callbacks.ema.ExponentialMovingAverageCallback",
    "BestCheckpointCallback": "matsciml.lightning.callbacks.best.BestCheckpoint",
    "BestMetricCallback": "matsciml.lightning.callbacks.best.BestMetricTracker",
    "FixedUpdateEarlyStopping": "matsciml.lightning.callbacks.stopping.FixedBudgetStopping",
    "CheckpointCallback": "lightning.pytorch.callbacks.ModelCheckpoint",
    "GradCamCallback": "matsciml.lightning.callbacks.atom_attribution.AtomAttributionCallback",
    "UploadCheckpointOnTrainEnd": "matsciml.lightning.callbacks.upload.UploadCheckpoint",
}

#: Argument names of other frameworks: ``{class name: {their name: function(value) -> (our name, value)}}``.
#: ``ExponentialMovingAverageCallback``: ``use_dynamic_decay: true`` (luxonis-train) is
#: ``warmup: exponential`` (``decay * (1 - exp(-updates / decay_tau))``), ``false`` is
#: ``warmup: none``. ``MetadataLogger``: ``hyperparams`` (luxonis-train) is ``keys``.
#: ``UploadCheckpoint``: ``upload_directory`` (luxonis-train) is ``artifact_path``.
ARGUMENT_ALIASES: dict[str, dict[str, Any]] = {
    "ExponentialMovingAverageCallback": {
        "use_dynamic_decay": lambda value: ("warmup", "exponential" if value else "none"),
    },
    "MetadataLogger": {"hyperparams": lambda value: ("keys", value)},
    "UploadCheckpoint": {"upload_directory": lambda value: ("artifact_path", value)},
}
#: The keys that say how often a periodic callback runs (at most one per entry).
PERIOD_KEYS = ("every_n_epochs", "every_n_updates", "every_n_samples")
_CLASS_PATH_KEYS = ("class_path", "init_args", "dict_kwargs")


def register_builtin_callbacks(package: Any) -> None:
    """Register the public callback classes of ``package`` and of Lightning, and :data:`ALIASES`.

    Called once by ``matsciml.lightning.callbacks`` at import; afterwards every name of
    :func:`matsciml.registry.names` ``("callback")`` works as ``kind:`` and as ``class_path:``.
    """
    import lightning.pytorch.callbacks as pl_callbacks

    for module in (package, pl_callbacks):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if isinstance(obj, type) and issubclass(obj, Callback) and obj is not Callback:
                if registry.find("callback", name) is None:
                    registry.add("callback", obj, name)
    for alias, path in ALIASES.items():
        cls = import_path(path)
        if registry.find("callback", cls.__name__) is None:
            registry.add("callback", cls)
        registry.add("callback", cls, cls.__name__, aliases=[alias])


def resolve_kind(kind: Any, where: str = "") -> type:
    """The callback class named by ``kind`` (a class, an import path, or a registered short name).

    Raises
    ------
    ConfigError
        Unknown short name (with the closest names) or import path.
    """
    at = f"{where}: " if where else ""
    if isinstance(kind, type):
        return kind
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"{at}kind must be a class name or an import path, got {kind!r}")
    kind = kind.strip()
    if "." in kind:
        return resolve_class(kind, f"{where}.kind" if where else "kind")
    found = registry.find("callback", kind)
    if found is None:
        raise ConfigError(f"{at}unknown callback kind {kind!r}; {closest(kind, registry.names('callback', True))}")
    return found


def _accepted(cls: type) -> tuple[list[str], bool]:
    """(keyword arguments of ``cls``, whether it takes ``**kwargs``)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return [], True
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _located(err: ConfigError, where: str) -> ConfigError:
    """``err`` with ``where`` in front when its message does not name it yet."""
    return err if where in str(err) else ConfigError(f"{where}: {err}")


def _adapt(cls: type, kwargs: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor arguments, wrapper arguments): other frameworks' argument names mapped to ours,
    and ``every_n_*`` / ``name`` taken out when ``cls`` does not take them (see :class:`EveryN`)."""
    kwargs = dict(kwargs)
    for klass in getattr(cls, "__mro__", ()):
        for theirs, convert in ARGUMENT_ALIASES.get(klass.__name__, {}).items():
            if theirs in kwargs:
                ours, value = convert(kwargs.pop(theirs))
                if ours in kwargs:
                    raise ConfigError(f"{where}: give {theirs!r} or {ours!r}, not both ({theirs!r} means {ours!r})")
                kwargs[ours] = value
    names, var_kw = _accepted(cls)
    wrapper = {}
    for key in (*PERIOD_KEYS, "name"):
        if key in kwargs and key not in names and not var_kw:
            wrapper[key] = kwargs.pop(key)
    if "name" in wrapper and not any(k in wrapper for k in PERIOD_KEYS):
        wrapper = {"name": wrapper["name"]}
    return kwargs, wrapper


def _wrapped(callback: Any, wrapper: dict[str, Any], where: str) -> Any:
    """``callback`` with its ``name`` set, inside :class:`EveryN` when a period is given."""
    if not wrapper:
        return callback
    name = wrapper.get("name")
    if name is not None and getattr(callback, "name", None) is None:
        try:
            callback.name = str(name)
        except AttributeError:
            pass
    if not any(k in wrapper for k in PERIOD_KEYS):
        return callback
    from matsciml.lightning.callbacks._base.every import EveryN

    try:
        return EveryN(callback, **wrapper)
    except ConfigError as err:
        raise _located(err, where) from None


def _passed_on(cls: type) -> list[str]:
    """The keyword arguments of ``cls`` and of the base classes its ``**kwargs`` go on to."""
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass) or klass is object:
            continue
        found, var_kw = _accepted(klass)
        names += found
        if not var_kw:
            break
    return names


def _construct(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise _located(err, where) from None
    except (TypeError, ValueError) as err:
        hint = ""
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown:  # a class that passes **kwargs on: name the closest argument of the classes they reach
            hint = f"; {closest(unknown.group(1), _passed_on(cls))}"
        raise ConfigError(f"{where}: {cls.__name__} refused its arguments {sorted(kwargs)}: {err}{hint}") from None


def _check_callback(obj: Any, where: str) -> Any:
    if not isinstance(obj, Callback):
        raise ConfigError(
            f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not a lightning.pytorch Callback "
            "(a pytorch_lightning class path is mapped to lightning.pytorch; other objects cannot be callbacks)"
        )
    return obj


def _from_class_path(spec: Mapping[str, Any], where: str) -> Any:
    cls = resolve_class(spec["class_path"], where)
    unknown = [k for k in spec if k not in _CLASS_PATH_KEYS]
    if unknown:
        key = unknown[0]
        names, _ = _accepted(cls) if isinstance(cls, type) else ([], False)
        if key in PERIOD_KEYS or key in names:
            raise ConfigError(
                f"{where}: key {key!r} next to class_path; put constructor arguments under init_args "
                f"(or write the entry as kind: {spec['class_path']} with {key!r} beside it)"
            )
        if key == "kind":
            raise ConfigError(f"{where}: give either class_path (with init_args) or kind, not both")
        raise ConfigError(f"{where}: unknown key {key!r} next to class_path; {closest(key, _CLASS_PATH_KEYS)}")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ConfigError(f"{where}.init_args: expected a mapping of constructor arguments, got {init_args!r}")
    wrapper: dict[str, Any] = {}
    if isinstance(cls, type):
        adapted, wrapper = _adapt(cls, dict(init_args), f"{where}.init_args")
        spec = {**spec, "init_args": adapted}
    try:
        return _wrapped(instantiate(dict(spec), where), wrapper, where)
    except ConfigError as err:
        raise _located(err, where) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {getattr(cls, '__name__', cls)} refused its init_args: {err}") from None


def _from_kind(spec: Mapping[str, Any], where: str) -> Any:
    cls = resolve_kind(spec["kind"], where)
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    periods = [k for k in PERIOD_KEYS if k in kwargs]
    if len(periods) > 1:
        raise ConfigError(f"{where}: give at most one of {', '.join(PERIOD_KEYS)}; found {', '.join(periods)}")
    kwargs, wrapper = _adapt(cls, kwargs, where)
    names, var_kw = _accepted(cls)
    if not var_kw:
        for key in kwargs:
            if key not in names:
                raise ConfigError(
                    f"{where}: unknown key {key!r} for kind {spec['kind']!r} ({cls.__name__}); "
                    f"{closest(key, [*names, 'kind'])}"
                )
    built = {k: instantiate(v, f"{where}.{k}") for k, v in kwargs.items()}
    return _wrapped(_construct(cls, built, where), wrapper, where)


def build_callback(spec: Any, where: str = "callbacks[0]") -> Callback:
    """Build one callback from a spec (see the module docstring); a ``Callback`` instance is returned as is.

    Raises
    ------
    ConfigError
        A malformed entry, an unknown class, kind or key, or a constructor that refused
        its arguments; the message starts with ``where``.
    """
    if isinstance(spec, Callback):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping with class_path (and init_args) or kind, or a callback name; got {spec!r}"
        )
    if "class_path" in spec:
        if "kind" in spec:
            raise ConfigError(f"{where}: give either class_path (with init_args) or kind, not both")
        return _check_callback(_from_class_path(spec, where), where)
    if "kind" in spec:
        return _check_callback(_from_kind(spec, where), where)
    first = next(iter(spec), None)
    hint = closest(str(first), ["class_path", "kind"]) if first is not None else ""
    raise ConfigError(
        f"{where}: a callback entry needs class_path (Lightning CLI style) or kind (short name or import path)"
        + (f"; found key {first!r}: {hint}" if hint else "")
    )


def build_callbacks(specs: Any, where: str = "") -> list[Callback]:
    """Build the callbacks of a YAML list, in list order.

    Parameters
    ----------
    specs
        A list of entries (``None`` gives ``[]``); each a ``class_path`` mapping, a
        ``kind`` mapping, a short name or import path string, or a ``Callback``.
    where
        Where the list comes from, for messages (e.g. ``"trainer.yaml: callbacks"``);
        entries are named ``<where>[i]``.

    Returns
    -------
    list
        The callbacks, in list order.

    Raises
    ------
    ConfigError
        ``specs`` is not a list, or an entry is wrong (see :func:`build_callback`).

    Example::

        from matsciml.lightning.callbacks.builder import build_callbacks

        callbacks = build_callbacks(
            [{"kind": "ema", "decay": 0.999}, {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}],
            where="trainer.yaml: callbacks",
        )
        trainer = lightning.pytorch.Trainer(callbacks=callbacks)
    """
    name = where or "callbacks"
    if specs is None:
        return []
    if isinstance(specs, (Mapping, str)) or not isinstance(specs, (list, tuple)):
        raise ConfigError(f"{name}: expected a list of callback entries, got {type(specs).__name__}")
    return [build_callback(spec, f"{name}[{i}]") for i, spec in enumerate(specs)]
