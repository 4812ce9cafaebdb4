"""MMEngine-style config files: a Python file whose top-level variables are the Runner's arguments."""

from __future__ import annotations

import ast
import runpy
import sys
import types
from pathlib import Path
from typing import Any

from funceng.errors import ConfigError


def load_config(path: str | Path) -> dict[str, Any]:
    """The top-level variables of the Python file ``path`` (modules and ``_private`` names left out).

    The file runs with its own folder on ``sys.path``, so it may import the model and metric it names.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    sys.path.insert(0, str(path.parent))
    try:
        namespace = runpy.run_path(str(path), run_name=f"funceng_config_{path.stem}")
    finally:
        sys.path.remove(str(path.parent))
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def parse_value(text: str) -> Any:
    """``1`` -> 1, ``[1,2]`` -> [1, 2], ``true`` -> True, ``None`` -> None; anything else stays a string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_cfg_options(cfg: dict[str, Any], options: list[str], new_top_level: set[str] = frozenset()) -> None:
    """Applies ``a.b=value`` overrides in place. Every key must already exist, except a top-level key in
    ``new_top_level`` (the Runner's own arguments), so a typo is an error naming it."""
    for option in options:
        if "=" not in option:
            raise ConfigError(f"--cfg-options {option!r}: expected KEY=VALUE, e.g. train_cfg.max_epochs=3")
        dotted, raw = option.split("=", 1)
        keys = dotted.split(".")
        node: Any = cfg
        created = False  # below a newly created Runner argument every key is new
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if not isinstance(node, dict):
                raise ConfigError(f"--cfg-options {dotted}: {'.'.join(keys[:depth])} is not a dict")
            if key not in node:
                if created or (depth == 0 and key in new_top_level):
                    node[key] = {} if not last else None
                    created = True
                else:
                    raise ConfigError(f"--cfg-options {dotted}: unknown key {where!r} (known here: {sorted(node)})")
            if last:
                node[key] = parse_value(raw)
            else:
                if node[key] is None:
                    node[key] = {}
                node = node[key]
