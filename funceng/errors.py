"""Every error funceng raises on purpose, and the helpers that word config errors.

Each message names the problem: the config key, the file, the iteration or the rank, and what was expected.
This module imports nothing from funceng, so any module may raise these errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value that funceng cannot use; the message names the key and what was expected."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or not a funceng checkpoint; the message names the file."""


class DonatedStateError(RuntimeError):
    """A state was used after being donated to a step."""


class DistributedError(RuntimeError):
    """A collective failed (a rank died, hung past the timeout, or the process group could not start)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(where: str, cfg: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raises a `ConfigError` naming the first key of ``cfg`` that is not ``allowed``, and the closest one."""
    allowed = set(allowed)
    for key in cfg:
        if key not in allowed:
            suggestion = did_you_mean(key, allowed)
            raise ConfigError(f"{where}: unknown key {key!r}{suggestion}; expected one of {sorted(allowed)}")


class MissingExtraError(ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the feature and the
    ``pip install 'funceng[<extra>]'`` that brings it."""


def require(module: str, extra: str, feature: str, package: str | None = None) -> Any:
    """Imports optional ``module`` for ``feature``, or raises `MissingExtraError` naming the missing ``package``
    (default: the module's top-level name) and the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the {package or module.split('.')[0]!r} package, which is not installed: "
            f"pip install 'funceng[{extra}]'",
            name=module,
        ) from exc
