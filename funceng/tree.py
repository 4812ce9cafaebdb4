"""Nested dicts (or TensorDicts) of tensors as a structure template plus a flat list of leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

Template = dict[str, Any]  # nested dicts whose leaves are indices into the list of tensors


def flatten(tree: Any) -> tuple[Any, list[Tensor]]:
    """``(template, leaves)``: the nesting of ``tree`` with each tensor replaced by its index in ``leaves``."""
    leaves: list[Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, Tensor):
            leaves.append(node)
            return len(leaves) - 1
        return {key: walk(value) for key, value in node.items()}

    return walk(tree), leaves


def unflatten(template: Any, leaves: list[Tensor]) -> Any:
    """The nested dicts of ``template`` with each index replaced by its tensor."""
    if isinstance(template, int):
        return leaves[template]
    return {key: unflatten(value, leaves) for key, value in template.items()}


def unflattener(template: Any) -> Callable[[list[Tensor]], Any]:
    """A fast `unflatten` for one template: runs of consecutive leaves become ``dict(zip(keys, leaves[a:b]))``."""
    if isinstance(template, int):
        return lambda leaves: leaves[template]
    keys, values = list(template), list(template.values())
    if values and all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1)):
        start, stop = values[0], values[-1] + 1
        return lambda leaves: dict(zip(keys, leaves[start:stop]))
    parts = [(key, unflattener(value)) for key, value in template.items()]
    return lambda leaves: {key: part(leaves) for key, part in parts}


def find_leaf(template: Any, name: str) -> int | None:
    """Index of the first leaf called ``name`` (depth first), e.g. the learning rate in an optimizer state."""
    if isinstance(template, dict):
        for key, value in template.items():
            if key == name and isinstance(value, int):
                return value
            found = find_leaf(value, name)
            if found is not None:
                return found
    return None


def describe_difference(expected: Any, got: Any, path: str = "") -> str:
    """Where two templates first differ, for error messages."""
    if isinstance(expected, dict) and isinstance(got, dict):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        if missing or extra:
            return f"at {path or '<root>'}: missing keys {missing}, unexpected keys {extra}"
        for key in expected:
            if expected[key] != got[key]:
                return describe_difference(expected[key], got[key], f"{path}.{key}" if path else key)
    return f"at {path or '<root>'}: a tensor and a sub-dict differ"
