"""One registry of names for tasks, encoders, datasets, transforms and callbacks.

A class becomes known to experiment YAMLs, the runner, the task's ``encoder_class``, the
data module and the callback builder by one decorator in the module that defines it::

    from matsciml.registry import register_encoder

    @register_encoder(aliases=["my_gnn"])
    class MyGNN(torch.nn.Module):
        ...

after which a model config can say ``encoder_class: {class_path: MyGNN}`` (or ``my_gnn``).
Dotted import paths (``my_package.models.MyGNN``) keep working everywhere, and importing a
module by its path registers what it decorates.

Where names come from
---------------------
* The toolkit's own classes: the packages listed in :data:`BUILTIN_MODULES` are imported,
  with all their submodules, the first time a name of that kind is looked up (so importing
  this module imports nothing, and a new module in one of those packages needs no other edit).
* Third-party plugins: every entry point of the group ``matsciml.plugins`` is loaded at the
  first lookup. An entry point names a module (``my_plugin = my_package.matsciml_plugin``)
  whose import runs its ``register_*`` decorators. In ``pyproject.toml``::

      [project.entry-points."matsciml.plugins"]
      my_plugin = "my_package.matsciml_plugin"

Lookups are by exact name first, then by alias, then case- and underscore-insensitively;
an unknown name raises :class:`~matsciml.common.errors.ConfigError` with the closest names.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from matsciml.common.errors import ConfigError, closest

__all__ = [
    "KINDS",
    "BUILTIN_MODULES",
    "PLUGIN_GROUP",
    "Registry",
    "registry",
    "register",
    "register_task",
    "register_encoder",
    "register_dataset",
    "register_transform",
    "register_callback",
    "lookup",
    "lookup_any",
    "names",
    "import_path",
    "resolve",
]

T = TypeVar("T")

#: The kinds of things that have names.
KINDS = ("task", "encoder", "dataset", "transform", "callback")

#: Modules whose import registers the toolkit's own classes of each kind.
#: A package is imported with all its submodules, so a new module in it needs no other edit.
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "task": ("matsciml.models.tasks",),
    "encoder": ("matsciml.models",),
    "dataset": ("matsciml.datasets",),
    "transform": ("matsciml.datasets.transforms",),
    "callback": ("matsciml.lightning.callbacks",),
}

_LOG = logging.getLogger(__name__)

#: Entry-point group of third-party plugins.
PLUGIN_GROUP = "matsciml.plugins"


#: Old package prefixes mapped to the current ones when a path is imported.
_PREFIX_MAP = {"pytorch_lightning.": "lightning.pytorch."}


def import_path(path: str, where: str = "") -> Any:
    """Import a dotted path (``"package.module.Name"``) and return the object.

    ``pytorch_lightning.`` paths are read as ``lightning.pytorch.``.

    Raises
    ------
    ConfigError
        The module or the name does not exist; the message lists the closest names.
    """
    at = f" ({where})" if where else ""
    path = path.strip()
    for old, new in _PREFIX_MAP.items():
        if path.startswith(old):
            path = new + path[len(old) :]
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"class_path {path!r}{at} is neither a registered name nor a dotted import path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        parent, _, child = module_name.rpartition(".")
        hint = ""
        if parent:
            try:
                pmod = importlib.import_module(parent)
                hint = "; " + closest(child, [n for n in dir(pmod) if not n.startswith("_")])
            except ImportError:
                pass
        raise ConfigError(f"class_path {path!r}{at}: cannot import module {module_name!r} ({err}){hint}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"class_path {path!r}{at}: {module_name} has no {attr!r}; {closest(attr, names)}") from None


def _norm(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _import_with_submodules(name: str) -> None:
    """Import module ``name`` and, when it is a package, every submodule below it.

    Private modules (``_name``) are skipped; so is a submodule whose optional third-party
    dependency is missing (its names are then simply not registered, and a lookup lists
    what is). Any other import error inside the package is raised: it is a bug to see.
    """
    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{name}."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] == "matsciml":
                raise  # a broken import inside the package is a bug to show, not an optional extra
            _LOG.debug("matsciml.registry: skipped %s (%s)", info.name, err)


class Registry:
    """Names -> objects for each kind in :data:`KINDS`.

    Parameters
    ----------
    builtin_modules
        Per kind, the modules imported before the first lookup of that kind.
    plugin_group
        Entry-point group loaded before the first lookup of any kind (``None``: none).
    """

    def __init__(self, builtin_modules: dict[str, tuple[str, ...]], plugin_group: str | None = PLUGIN_GROUP):
        self._builtin = dict(builtin_modules)
        self._plugin_group = plugin_group
        self._entries: dict[str, dict[str, Any]] = {kind: {} for kind in builtin_modules}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in builtin_modules}
        self._loaded: set[str] = set()
        self._plugins_loaded = False

    # ------------------------------------------------------------------ registration
    def _kind(self, kind: str) -> str:
        if kind not in self._entries:
            raise ConfigError(f"unknown registry kind {kind!r}; {closest(kind, list(self._entries))}")
        return kind

    def add(self, kind: str, obj: Any, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
        """Register ``obj`` as ``name`` (default: its ``__name__``) with optional ``aliases``.

        Registering the same object again under the same name is a no-op (modules may be
        re-imported); another object under a taken name raises :class:`ConfigError`.
        """
        entries = self._entries[self._kind(kind)]
        key = name or obj.__name__
        for label in (key, *aliases):
            taken = entries.get(self._aliases[kind].get(label, label))
            if taken is not None and taken is not obj:
                raise ConfigError(
                    f"{kind} name {label!r} is already registered for {getattr(taken, '__qualname__', taken)}; "
                    "choose another name"
                )
        entries[key] = obj
        for alias in aliases:
            self._aliases[kind][alias] = key
        return obj

    def remove(self, kind: str, name: str) -> None:
        """Forget ``name`` of ``kind`` and its aliases (tests and interactive sessions)."""
        self._entries[self._kind(kind)].pop(name, None)
        for alias in [a for a, key in self._aliases[kind].items() if key == name]:
            del self._aliases[kind][alias]

    def decorator(self, kind: str, name: str | None = None, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """``@registry.decorator("encoder", aliases=[...])`` registers the decorated class."""
        aliases = tuple(aliases)

        def wrap(obj: T) -> T:
            self.add(kind, obj, name, aliases)
            return obj

        return wrap

    # ------------------------------------------------------------------ loading
    def _load_plugins(self) -> None:
        if self._plugins_loaded or self._plugin_group is None:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self._plugin_group):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must name itself, not break every lookup silently
                raise ConfigError(
                    f"matsciml plugin {ep.name!r} ({ep.value}) failed to load: {type(err).__name__}: {err}"
                ) from err

    def _load(self, kind: str) -> None:
        self._load_plugins()
        if kind in self._loaded:
            return
        self._loaded.add(kind)
        for module in self._builtin.get(kind, ()):
            _import_with_submodules(module)

    # ------------------------------------------------------------------ lookups
    def names(self, kind: str, aliases: bool = False) -> list[str]:
        """Sorted registered names of ``kind`` (with aliases when asked)."""
        self._load(self._kind(kind))
        out = list(self._entries[kind])
        if aliases:
            out += list(self._aliases[kind])
        return sorted(out)

    def find(self, kind: str, name: str) -> Any | None:
        """The object registered as ``name`` of ``kind``, or ``None``."""
        self._load(self._kind(kind))
        entries, aliases = self._entries[kind], self._aliases[kind]
        if name in entries:
            return entries[name]
        if name in aliases:
            return entries[aliases[name]]
        wanted = _norm(name)
        for label, key in [*((k, k) for k in entries), *aliases.items()]:
            if _norm(label) == wanted:
                return entries[key]
        return None

    def get(self, kind: str, name: str | Any, where: str = "") -> Any:
        """Resolve ``name`` of ``kind``: an object (returned unchanged), a name, or a dotted path.

        Raises
        ------
        ConfigError
            Unknown name (the message lists the closest names of that kind) or bad import path.
        """
        if not isinstance(name, str):
            return name
        found = self.find(kind, name)
        if found is not None:
            return found
        if "." in name:
            return import_path(name, where)
        at = f" ({where})" if where else ""
        raise ConfigError(
            f"{kind} {name!r}{at} is not a known {kind} class; {closest(name, self.names(kind, aliases=True))}"
        )

    def find_any(self, name: str) -> Any | None:
        """The object registered as ``name`` under any kind (first kind in :data:`KINDS` order)."""
        for kind in self._entries:
            found = self.find(kind, name)
            if found is not None:
                return found
        return None

    def all_names(self) -> list[str]:
        """Every registered name of every kind."""
        return sorted({n for kind in self._entries for n in self.names(kind)})


#: The toolkit's registry.
registry = Registry(BUILTIN_MODULES)


def register(kind: str, name: str | None = None, aliases: Iterable[str] = ()) -> Callable[[T], T]:
    """Decorator registering a class of ``kind`` (one of :data:`KINDS`)."""
    return registry.decorator(kind, name, aliases)


def register_task(cls: T | None = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
    """Register a task class (``@register_task`` or ``@register_task(aliases=[...])``)."""
    return _decorate("task", cls, name, aliases)


def register_encoder(cls: T | None = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
    """Register an encoder class (``@register_encoder`` or ``@register_encoder(aliases=[...])``)."""
    return _decorate("encoder", cls, name, aliases)


def register_dataset(cls: T | None = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
    """Register a dataset class (``@register_dataset`` or ``@register_dataset(aliases=[...])``)."""
    return _decorate("dataset", cls, name, aliases)


def register_transform(cls: T | None = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
    """Register a data transform class."""
    return _decorate("transform", cls, name, aliases)


def register_callback(cls: T | None = None, *, name: str | None = None, aliases: Iterable[str] = ()) -> Any:
    """Register a callback class (its short name becomes usable as ``kind:``)."""
    return _decorate("callback", cls, name, aliases)


def _decorate(kind: str, cls: Any, name: str | None, aliases: Iterable[str]) -> Any:
    if cls is not None:
        return registry.add(kind, cls, name, tuple(aliases))
    return registry.decorator(kind, name, aliases)


def lookup(kind: str, name: str | Any, where: str = "") -> Any:
    """Resolve ``name`` of ``kind`` through :data:`registry` (see :meth:`Registry.get`)."""
    return registry.get(kind, name, where)


def lookup_any(name: str) -> Any | None:
    """The object registered as ``name`` under any kind, or ``None``."""
    return registry.find_any(name)


def names(kind: str, aliases: bool = False) -> list[str]:
    """Sorted registered names of ``kind``."""
    return registry.names(kind, aliases)


def resolve(name: str | Any, kind: str | None = None, where: str = "") -> Any:
    """Resolve a registered name (of ``kind``, or of any kind when ``None``) or a dotted path.

    An object that is not a string is returned unchanged.

    Raises
    ------
    ConfigError
        Neither a registered name nor an importable path; the message lists the closest names.
    """
    if not isinstance(name, str):
        return name
    if kind is not None:
        return registry.get(kind, name, where)
    name = name.strip()
    if "." in name:
        return import_path(name, where)
    found = registry.find_any(name)
    if found is not None:
        return found
    at = f" ({where})" if where else ""
    raise ConfigError(
        f"class_path {name!r}{at} is neither a registered name nor a dotted import path like 'torch.nn.SiLU'; "
        f"{closest(name, registry.all_names())}"
    )
