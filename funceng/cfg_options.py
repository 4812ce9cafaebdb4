"""Command-line overrides of a config: MMEngine's ``--cfg-options KEY=VALUE`` (`DictAction`, `parse_value`),
applied to a config's variables (`apply_cfg_options`), top-level variables first re-read from the files
(`split_variable_options`, `funceng.config.load_config`)."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Mapping
from typing import Any

from funceng.errors import ConfigError, did_you_mean


class DictAction(argparse.Action):
    """MMEngine's argparse action: ``--cfg-options a.b=1 c=[1,2]`` into ``{"a.b": 1, "c": [1, 2]}``."""

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            if "=" not in item:
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            key, raw = item.split("=", 1)
            options[key] = parse_value(raw)
        setattr(namespace, self.dest, options)


def parse_value(text: str) -> Any:
    """``1`` -> 1, ``[1,2]`` -> [1, 2], ``true`` -> True, ``None`` -> None; anything else stays a string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_variable_options(
    cfg: Mapping[str, Any], options: list[str], runner_args: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """``(variables, other options)``: ``NAME=VALUE`` options that set a top-level variable of the config which is
    not a Runner argument (``max_epochs=1``), to substitute where the file assigns it (`load_config`), and the
    rest, for `apply_cfg_options`."""
    variables, rest = {}, []
    for option in options:
        dotted, _, raw = option.partition("=")
        top = dotted.split(".")[0]
        if "=" in option and top in cfg and top not in runner_args:
            if "." in dotted:
                raise ConfigError(
                    f"--cfg-options {dotted}: {top!r} is a config variable that other entries may be computed from; "
                    f"override it whole ({top}=...) or the Runner argument that uses it"
                )
            variables[top] = parse_value(raw)
        else:
            rest.append(option)
    return variables, rest


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
                    raise ConfigError(
                        f"--cfg-options {dotted}: unknown key {where!r}{did_you_mean(key, set(node))} "
                        f"(known here: {sorted(node)})"
                    )
            if last:
                node[key] = parse_value(raw)
            else:
                if node[key] is None:
                    node[key] = {}
                node = node[key]
