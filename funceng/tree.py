"""Walking nested containers of tensors: states (nested dicts or TensorDicts) and batches.

A state is split into a *template*, the same nesting with each tensor replaced by its index, and the flat list
of its *leaves*, depth first in key order. Steps compile over the leaves, checkpoints store them one file each,
and the template says where each one sits. Batches may nest tuples, lists, namedtuples and dicts
(`map_tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor


def walk(tree: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(key path, leaf)`` for every leaf of ``tree``, depth first in key order. A leaf is a tensor, or an int
    in a template; anything else that is not a mapping is an error. (A list, not a generator: it traces into
    compiled steps.)"""
    if isinstance(tree, (Tensor, int)):
        return [(path, tree)]
    if not (isinstance(tree, Mapping) or hasattr(tree, "items")):
        raise TypeError(f"a tree's leaves must be tensors or dicts, got {type(tree).__name__} at {'/'.join(path)}")
    return [item for key, value in tree.items() for item in walk(value, (*path, key))]


def leaves(tree: Any) -> list[Tensor]:
    """Every tensor of ``tree``, depth first in key order."""
    return [leaf for _, leaf in walk(tree)]


def flatten(tree: Any) -> tuple[Any, list[Tensor]]:
    """``(template, leaves)``: the nesting of ``tree`` with each tensor replaced by its index in ``leaves``."""
    found: list[Tensor] = []

    def replace(node: Any) -> Any:
        if isinstance(node, Tensor):
            found.append(node)
            return len(found) - 1
        return {key: replace(value) for key, value in node.items()}

    return replace(tree), found


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


def leaf_paths(template: Any, sep: str = "/") -> list[str]:
    """The key path of each leaf of a template, in leaf order (``"opt_state/0/exp_avg/fc.weight"``)."""
    by_index = {index: sep.join(path) for path, index in walk(template)}
    return [by_index[i] for i in sorted(by_index)]


def find_leaf(template: Any, name: str) -> int | None:
    """Index of the first leaf whose own key is ``name`` (depth first), e.g. the learning rate in an optimizer
    state; ``None`` if there is none."""
    return next((index for path, index in walk(template) if path and path[-1] == name), None)


def map_tensors(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, through dicts, lists, tuples and namedtuples; other
    values are kept as they are."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(fn, value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(fn, value) for value in batch)
    return batch


def describe_difference(expected: Any, got: Any, path: str = "") -> str:
    """Where two templates first differ, for error messages: the keys missing or unexpected at the first
    mapping whose key sets differ, as full dotted paths."""
    where = path or "<root>"
    if isinstance(expected, dict) and isinstance(got, dict):
        prefix = f"{path}." if path else ""
        missing = [prefix + str(k) for k in expected if k not in got]
        extra = [prefix + str(k) for k in got if k not in expected]
        if missing or extra:
            parts = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {extra}"] * bool(extra)
            return " and ".join(parts)
        for key in expected:
            if expected[key] != got[key]:
                return describe_difference(expected[key], got[key], prefix + str(key))
        return f"at {where}: the same keys in another order"
    return f"at {where}: a tensor and a sub-dict differ"
