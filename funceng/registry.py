"""The one resolver from a config's ``type`` to what it names: a `Registry` per kind of component.

A ``type`` is a registered name (``"SGD"``, ``"LoggerHook"``) or the class or function itself. Registries whose
``by_name`` is set stand for components funceng implements itself: a class given there is looked up by its
``__name__`` (``torch.optim.SGD`` means funceng's ``"SGD"``). The others build what they are given.

Registering a second, different object under a name that is taken raises. Classes registered automatically
(every `funceng.evaluator.BaseMetric` subclass, say) may share a name; looking such a name up raises, naming
where each was defined, instead of picking one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from funceng.errors import ConfigError, check_keys, did_you_mean


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

    def __init__(self, kind: str, *, by_name: bool = False, fallback: Callable[[str], Any] | None = None):
        self.kind, self.by_name, self.fallback = kind, by_name, fallback
        self._entries: dict[str, list[Any]] = {}

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
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, where: str) -> Any:
        """The object registered as ``name``; unknown and ambiguous names are errors naming ``where``."""
        entries = self._entries.get(name, [])
        if len(entries) > 1:
            raise ConfigError(
                f"{where}: {self.kind} name {name!r} is ambiguous: it names {', '.join(_origin(e) for e in entries)}; "
                "pass the class itself as type"
            )
        if entries:
            return entries[0]
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

    def build(self, cfg: Any, where: str, default_type: Any = None, **defaults: Any) -> Any:
        """``resolve(cfg["type"])(**defaults, **rest of cfg)``. A key the factory does not take is an error naming
        it and the closest one it does; so is a `TypeError` from the call, naming ``where``."""
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
