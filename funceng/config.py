"""MMEngine-style config files: a Python file whose top-level variables are the Runner's arguments, and
MMEngine's `Config` over them (``_base_`` inheritance, attribute access, ``merge_from_dict``, ``dump``)."""

from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import pprint
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funceng.errors import ConfigError, did_you_mean


def load_config(path: str | Path, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The top-level variables of the config file ``path`` (modules and ``_private`` names left out), merged
    over those of its ``_base_`` files (see `Config`).

    A Python file runs with its own folder on ``sys.path``, so it may import the model and metric it names.
    ``variables``: new values for top-level variables, substituted where the files assign them, so that every
    entry computed from one (``train_cfg = dict(max_epochs=max_epochs)``) sees the new value; a variable that no
    file assigns is an error naming the closest one.
    """
    variables = dict(variables or {})
    assigned: set[str] = set()
    cfg = _read(Path(path).resolve(), (), variables, assigned)
    missing = set(variables) - assigned
    for name in sorted(missing):
        raise ConfigError(f"config {path}: no top-level variable {name!r} to override{did_you_mean(name, set(cfg))}")
    return cfg


def _override_assignments(text: str, path: Path, variables: Mapping[str, Any], assigned: set[str]) -> Any:
    """``text`` compiled with the top-level assignments of ``variables`` replaced by their new values."""
    tree = ast.parse(text, str(path))
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names = [t.id for t in targets if isinstance(t, ast.Name) and t.id in variables]
        if names and len(targets) == 1:
            node.value = ast.copy_location(ast.parse(repr(variables[names[0]]), mode="eval").body, node.value)
            assigned.add(names[0])
    return compile(ast.fix_missing_locations(tree), str(path), "exec")


_BASE_REFERENCE = re.compile(r"\{\{\s*_base_\.([\w\.]+)\s*\}\}")
_PLACEHOLDER = "_funceng_base_reference_"


def _substitute_text(text: str, path: Path) -> str:
    """MMEngine's text substitutions: ``{{ fileDirname }}`` and the other predefined variables, ``{{ $VAR:default }}``
    from the environment, and ``{{ _base_.name }}`` as a placeholder that `_resolve_base_references` replaces."""
    predefined = {
        "fileDirname": str(path.parent),
        "fileBasename": path.name,
        "fileBasenameNoExtension": path.stem,
        "fileExtname": path.suffix,
    }
    for name, value in predefined.items():
        text = re.sub(r"\{\{\s*" + name + r"\s*\}\}", value.replace("\\", "/"), text)

    def env(match: re.Match) -> str:
        name, colon, default = match.group(1).partition(":")
        if name not in os.environ and not colon:
            raise ConfigError(f"config file {path}: environment variable {name} is not set and has no default")
        return os.environ.get(name, default)

    text = re.sub(r"\{\{\s*\$(\w+(?::[^}]*)?)\s*\}\}", env, text)
    return _BASE_REFERENCE.sub(lambda m: repr(_PLACEHOLDER + m.group(1)), text)


def _resolve_base_references(value: Any, base: Mapping[str, Any], path: Path) -> Any:
    if isinstance(value, str) and value.startswith(_PLACEHOLDER):
        node: Any = base
        for key in value[len(_PLACEHOLDER) :].split("."):
            if not isinstance(node, Mapping) or key not in node:
                raise ConfigError(
                    f"config file {path}: {{{{_base_.{value[len(_PLACEHOLDER) :]}}}}} is not in its _base_"
                )
            node = node[key]
        return copy.deepcopy(node)
    if isinstance(value, Mapping):
        return {k: _resolve_base_references(v, base, path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_base_references(v, base, path) for v in value)
    return value


def _run_file(path: Path, variables: Mapping[str, Any], assigned: set[str]) -> dict[str, Any]:
    if path.suffix not in (".py", ".json"):
        raise ConfigError(f"config file {path}: only .py and .json configs are supported")
    text = _substitute_text(path.read_text(), path)
    if path.suffix == ".json":
        loaded = json.loads(text)
        assigned.update(set(variables) & set(loaded))
        return {**loaded, **{k: v for k, v in variables.items() if k in loaded}}
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": f"funceng_config_{path.stem}"}
    sys.path.insert(0, str(path.parent))
    try:
        exec(_override_assignments(text, path, variables, assigned), namespace)
    finally:
        sys.path.remove(str(path.parent))
    return {
        k: v
        for k, v in namespace.items()
        if (not k.startswith("_") or k in ("_base_",)) and not isinstance(v, types.ModuleType)
    }


def _merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: dicts merge key by key unless the child's has ``_delete_=True``."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping):
            value = dict(value)
            if value.pop("_delete_", False) or not isinstance(merged.get(key), Mapping):
                merged[key] = _merge({}, value)
            else:
                merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read(
    path: Path,
    chain: tuple[Path, ...],
    variables: Mapping[str, Any] = {},
    assigned: set[str] | None = None,  # noqa: B006
) -> dict[str, Any]:
    if path in chain:
        raise ConfigError(f"config file {path}: _base_ inheritance loops ({' -> '.join(map(str, chain + (path,)))})")
    if not path.is_file():
        where = f" (a _base_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}")
    assigned = set() if assigned is None else assigned
    overrides = variables
    variables = _run_file(path, overrides, assigned)
    bases = variables.pop("_base_", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_vars = _read((path.parent / base).resolve(), (*chain, path), overrides, assigned)
        for key in set(merged) & set(base_vars):
            raise ConfigError(f"config file {path}: _base_ files both define {key!r}")
        merged.update(base_vars)
    imports = variables.get("custom_imports")
    if imports:
        _import_custom(imports, path)
    return _merge(merged, _resolve_base_references(variables, merged, path))


def _import_custom(custom_imports: Mapping[str, Any], path: Path) -> None:
    modules = custom_imports.get("imports", [])
    for module in [modules] if isinstance(modules, str) else modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if not custom_imports.get("allow_failed_imports", False):
                raise ConfigError(f"config file {path}: custom_imports cannot import {module!r}: {exc}") from exc


class ConfigDict(dict):
    """A dict whose keys read as attributes too (``cfg.model.type``); nested dicts are ConfigDicts."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = _wrap(value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; keys: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = _wrap(value)

    def __deepcopy__(self, memo):
        return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict[str, Any]:
        return _unwrap(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, ConfigDict):
        return ConfigDict(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


class Config:
    """MMEngine's ``Config``: a config file's variables (after ``_base_`` inheritance) as a `ConfigDict`.

    ``Config.fromfile(path)``: a ``.py`` (or ``.json``) file; ``_base_ = "base.py"`` or a list of them, relative
    to the file, are read first and the file's variables merged over theirs (dicts key by key; a dict with
    ``_delete_=True`` replaces); ``{{_base_.name}}`` takes a base's value, ``{{fileDirname}}`` (and
    ``fileBasename``, ``fileBasenameNoExtension``, ``fileExtname``) the file's, ``{{$VAR:default}}`` the
    environment's. ``custom_imports = dict(imports=[...])`` are imported. Differences from MMEngine: the
    ``read_base()`` (lazy import) style is not supported; YAML configs are not read.
    """

    def __init__(self, cfg_dict: Mapping[str, Any] | None = None, filename: str | Path | None = None):
        object.__setattr__(self, "_cfg_dict", ConfigDict(cfg_dict or {}))
        object.__setattr__(self, "filename", str(filename) if filename is not None else None)

    @staticmethod
    def fromfile(
        filename: str | Path,
        use_predefined_variables: bool = True,
        import_custom_modules: bool = True,
        use_environment_variables: bool = True,
        lazy_import: bool | None = None,
    ) -> Config:
        """MMEngine's options are accepted at the values funceng always uses, and refused otherwise."""
        given = dict(
            use_predefined_variables=use_predefined_variables,
            import_custom_modules=import_custom_modules,
            use_environment_variables=use_environment_variables,
        )
        for option, value in {**given, "lazy_import": not lazy_import}.items():
            if not value:
                raise ConfigError(
                    f"Config.fromfile({option}={lazy_import if option == 'lazy_import' else value}) is not supported: "
                    "funceng always substitutes predefined and environment variables, imports custom_imports, and "
                    "reads configs eagerly"
                )
        path = Path(filename).resolve()
        return Config(_read(path, ()), filename=path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg_dict, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._cfg_dict[name] = _wrap(value)

    def __getitem__(self, name: str) -> Any:
        return self._cfg_dict[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._cfg_dict[name] = _wrap(value)

    def __contains__(self, name: str) -> bool:
        return name in self._cfg_dict

    def __iter__(self):
        return iter(self._cfg_dict)

    def __len__(self) -> int:
        return len(self._cfg_dict)

    def keys(self):
        return self._cfg_dict.keys()

    def items(self):
        return self._cfg_dict.items()

    def get(self, name: str, default: Any = None) -> Any:
        return self._cfg_dict.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return self._cfg_dict.to_dict()

    def copy(self) -> Config:
        return Config(copy.deepcopy(self._cfg_dict), self.filename)

    def __repr__(self) -> str:
        return f"Config (path: {self.filename}): {self.to_dict()}"

    def merge_from_dict(self, options: Mapping[str, Any], allow_list_keys: bool = True) -> None:
        """Sets ``{"a.b.c": value}`` (a list element by its index, ``"a.0.b"``); dict values merge."""
        for dotted, value in options.items():
            keys = dotted.split(".")
            node: Any = self._cfg_dict
            for depth, key in enumerate(keys[:-1]):
                node = _child(node, key, ".".join(keys[: depth + 1]), allow_list_keys, create=True)
            last = keys[-1]
            if isinstance(node, list):
                node[_index(node, last, dotted, allow_list_keys)] = _wrap(value)
            elif isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
                node[last] = _wrap(_merge(dict(node[last]), value))
            else:
                node[last] = _wrap(value)

    @property
    def pretty_text(self) -> str:
        """The config as a Python file: one ``name = value`` line per variable."""
        lines = []
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {pprint.pformat(_as_source(value), width=100, sort_dicts=False)}")
        return "\n".join(lines) + "\n"

    @property
    def text(self) -> str:
        return Path(self.filename).read_text() if self.filename else self.pretty_text

    def dump(self, file: str | Path | None = None) -> str | None:
        """Writes the config to ``file`` (``.py``: `pretty_text`; ``.json``); without a file, returns the text."""
        if file is None:
            return self.pretty_text
        file = Path(file)
        text = json.dumps(_as_source(self.to_dict()), indent=2) if file.suffix == ".json" else self.pretty_text
        file.write_text(text)
        return None


class _Source:
    """A class or function in a dumped config: written as its import path, which the registries resolve."""

    def __init__(self, obj: Any):
        self.path = f"{obj.__module__}.{obj.__qualname__}"

    def __repr__(self) -> str:
        return repr(self.path)


def _as_source(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_source(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_source(v) for v in value)
    if isinstance(value, (type, types.FunctionType)):
        return _Source(value).path
    return value


def _index(node: list, key: str, dotted: str, allow_list_keys: bool) -> int:
    if not allow_list_keys or not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"merge_from_dict {dotted!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _child(node: Any, key: str, where: str, allow_list_keys: bool, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, where, allow_list_keys)]
    if key not in node or not isinstance(node[key], (Mapping, list)):
        if not create:
            raise ConfigError(f"config has no {where!r}")
        node[key] = ConfigDict()
    return node[key]


from funceng.cfg_options import DictAction, apply_cfg_options, parse_value, split_variable_options  # noqa: E402

__all__ = [
    "Config",
    "ConfigDict",
    "DictAction",
    "apply_cfg_options",
    "load_config",
    "parse_value",
    "split_variable_options",
]
