"""The one resolver from a config's ``type`` to what it names: a `Registry` per kind of component, and every
registry a run uses, under MMEngine's names (``MODELS``, ``HOOKS``, ``OPTIMIZERS``, ...).

A ``type`` is a registered name (``"SGD"``, ``"LoggerHook"``), a name with a scope (``"mmengine.SGD"``), a dotted
import path (``"torch.nn.Linear"``) or the class or function itself. Registries whose ``by_name`` is set stand for
components funceng implements itself: a class given there is looked up by its ``__name__`` (``torch.optim.SGD``
means funceng's ``"SGD"``). The others build what they are given.

Registering a second, different object under a name that is taken raises (unless ``force=True``). Classes
registered automatically (every `funceng.evaluator.BaseMetric` subclass, say) may share a name; looking such a
name up raises, naming where each was defined, instead of picking one. A registry fills itself on first use by
importing the modules that define funceng's own components (``locations``), and asks its ``parent`` for names it
does not know, as MMEngine's registries of downstream libraries do.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from funceng.errors import ConfigError, check_keys, did_you_mean, require


def type_name(value: Any) -> str:
    """A ``type`` as it reads in a message: the name itself, or the class's or function's name."""
    return value if isinstance(value, str) else getattr(value, "__name__", repr(value))


def keyword_parameters(factory: Callable) -> set[str] | None:
    """The keyword arguments ``factory`` accepts, or ``None`` if it takes any (``**kwargs``) or cannot tell."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type_name(obj))}"


class Registry:
    """Names of one kind of component (``kind``: "hook", "optimizer", ...) and the objects they stand for.

    ``by_name``: a non-string ``type`` is resolved by its name (funceng's own implementation of it).
    ``fallback``: a function ``name -> object or None`` consulted for unknown names (torchvision's datasets).
    """

    def __init__(
        self,
        kind: str,
        *,
        by_name: bool = False,
        fallback: Callable[[str], Any] | None = None,
        locations: tuple[str, ...] | list[str] = (),
        parent: Registry | None = None,
        scope: str | None = None,
        build_func: Callable[..., Any] | None = None,
    ):
        self.kind, self.by_name, self.fallback = kind, by_name, fallback
        self.name = kind  # MMEngine's attribute
        self.locations, self.parent, self.scope = tuple(locations), parent, scope
        self.build_func = build_func  # MMEngine's: build(cfg, ...) calls build_func(cfg, ..., registry=self)
        self._entries: dict[str, list[Any]] = {}
        self._imported = not self.locations

    def _import_locations(self) -> None:
        if not self._imported:
            self._imported = True
            for module in self.locations:
                importlib.import_module(module)

    def register_module(self, name: str | list[str] | None = None, force: bool = False, module: Any = None) -> Any:
        """MMEngine's decorator: ``@MODELS.register_module()``, ``register_module(name="X")`` or
        ``register_module(module=cls)``; ``force=True`` replaces what a name held."""
        if module is None:
            return lambda target: self.register_module(name, force, target)
        for key in [name] if name is None or isinstance(name, str) else name:
            if force:
                self._entries.pop(key or type_name(module), None)
            self.register(module, name=key)
        return module

    def register(self, obj: Any = None, *, name: str | None = None, implicit: bool = False) -> Any:
        """Registers ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator. A different object
        already registered under that name raises, unless ``obj`` is registered ``implicitly`` (then a lookup of
        the name raises instead). An object defined again at the same place (a script run twice) replaces the
        earlier one."""
        if obj is None:
            return lambda target: self.register(target, name=name, implicit=implicit)
        key = name or type_name(obj)
        entries = [e for e in self._entries.get(key, []) if e is not obj and _origin(e) != _origin(obj)]
        if entries and not implicit:
            raise ConfigError(
                f"{self.kind} name {key!r} is already registered for {_origin(entries[0])}; "
                f"cannot register {_origin(obj)} under the same name"
            )
        self._entries[key] = [*entries, obj]
        return obj

    def __contains__(self, name: str) -> bool:
        self._import_locations()
        return name in self._entries or (self.parent is not None and name in self.parent)

    def __len__(self) -> int:
        self._import_locations()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} names)"

    @property
    def module_dict(self) -> dict[str, Any]:
        """``{name: object}`` (MMEngine's view; an ambiguous name shows its first object)."""
        self._import_locations()
        return {name: entries[0] for name, entries in self._entries.items()}

    def names(self) -> list[str]:
        self._import_locations()
        return sorted(self._entries)

    def get(self, name: str, where: str | None = None) -> Any:
        """The object registered as ``name``; unknown and ambiguous names are errors naming ``where``.
        (MMEngine's ``get`` returns ``None`` for an unknown name; this one says which names are close.)"""
        where = where or self.kind
        self._import_locations()
        _, dot, short = name.rpartition(".")
        if dot and name not in self._entries:
            if short in self._entries:  # "mmengine.SGD", "mmdet.ResNet": a scope prefix
                name = short
            else:
                found = _import_path(name)
                if found is not None:
                    return self.resolve(found, where) if self.by_name else found
        entries = self._entries.get(name, [])
        if len(entries) > 1:
            raise ConfigError(
                f"{where}: {self.kind} name {name!r} is ambiguous: it names {', '.join(_origin(e) for e in entries)}; "
                "pass the class itself as type"
            )
        if entries:
            return entries[0]
        if self.parent is not None and name in self.parent:
            return self.parent.get(name, where)
        found = self.fallback(name) if self.fallback else None
        if found is not None:
            return found
        raise ConfigError(
            f"{where}: unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; known: {self.names()}"
        )

    def resolve(self, value: Any, where: str) -> Any:
        """What the config value ``type=value`` stands for."""
        if isinstance(value, str) or self.by_name:
            return self.get(type_name(value), where)
        if not callable(value):
            raise ConfigError(f"{where}: expected a {self.kind} name or class, got {value!r}")
        return value

    def build(
        self,
        cfg: Any,
        where: str | None = None,
        default_type: Any = None,
        default_args: Mapping[str, Any] | None = None,
        **defaults: Any,
    ) -> Any:
        """``resolve(cfg["type"])(**defaults, **rest of cfg)``. A key the factory does not take is an error naming
        it and the closest one it does; so is a `TypeError` from the call, naming ``where``. ``default_args``
        (MMEngine's name) are defaults too, and may hold the ``type``."""
        if self.build_func is not None:
            return self.build_func(cfg, default_args=default_args, registry=self, **defaults)
        where = where or self.kind
        if default_args:
            default_args = dict(default_args)
            default_type = default_args.pop("type", default_type)
            defaults = {**default_args, **defaults}
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where}: expected a {self.kind} or a dict with 'type', got {type(cfg).__name__}")
        cfg = dict(cfg)
        kind = cfg.pop("type", default_type)
        if kind is None:
            raise ConfigError(f"{where}: missing 'type'; known: {self.names()}")
        factory = self.resolve(kind, f"{where}.type")
        accepted = keyword_parameters(factory)
        if accepted is not None:
            check_keys(where, cfg, accepted - set(defaults))
        try:
            return factory(**{**defaults, **cfg})
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def _import_path(path: str) -> Any:
    """The object a dotted import path names (``"torch.nn.Linear"``), or ``None``."""
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def _torchvision_dataset(name: str) -> Any:
    """torchvision's dataset ``name``, or ``None``; without torchvision (an optional extra) an unknown dataset
    name is an error that says so, since it may name one of torchvision's."""
    datasets = require(
        "torchvision.datasets", "vision", f"dataset type {name!r} (not registered; torchvision's datasets)"
    )
    return getattr(datasets, name, None)


def build_from_cfg(cfg: Mapping[str, Any], registry: Registry, default_args: Mapping[str, Any] | None = None) -> Any:
    """MMEngine's ``build_from_cfg``: ``registry.build(cfg, default_args=default_args)``."""
    return registry.build(cfg, default_args=default_args)


# -- the registries, by MMEngine's names; each lists the modules that define funceng's own entries ---------------

_RUNNER = "funceng.runner"
MODELS = Registry("model", locations=("funceng.model",))  # models and data preprocessors, as in MMEngine
WEIGHT_INITIALIZERS = Registry("weight initializer", locations=("funceng.model",))
DATASETS = Registry("dataset", fallback=_torchvision_dataset, locations=("funceng.dataset",))
TRANSFORMS = Registry("transform", locations=("funceng.dataset",))
DATA_SAMPLERS = Registry("sampler", by_name=True, locations=(_RUNNER,))
FUNCTIONS = Registry("collate function", by_name=True, locations=(_RUNNER,))
METRICS = Registry("metric", locations=("funceng.evaluator",))
EVALUATOR = Registry("evaluator", locations=("funceng.evaluator",))
HOOKS = Registry("hook", locations=("funceng.hooks",))
LOOPS = Registry("loop", locations=(_RUNNER,))  # a class given is used: a custom loop
OPTIMIZERS = Registry("optimizer", by_name=True, locations=(_RUNNER,))  # torch.optim.SGD and "SGD": funceng's sgd
OPTIM_WRAPPERS = Registry("optimizer wrapper", by_name=True, locations=(_RUNNER,))
OPTIM_WRAPPER_CONSTRUCTORS = Registry("optimizer wrapper constructor", locations=("funceng.optim",))
PARAM_SCHEDULERS = Registry("scheduler", by_name=True, locations=(_RUNNER,))  # torch's classes and MMEngine's names
MODEL_WRAPPERS = Registry("model wrapper", by_name=True, locations=(_RUNNER,))
VISBACKENDS = Registry("backend", locations=(_RUNNER,))
VISUALIZERS = Registry("visualizer", locations=(_RUNNER,))
LOG_PROCESSORS = Registry("log processor", locations=(_RUNNER,))
RUNNERS = Registry("runner", locations=(_RUNNER,))
