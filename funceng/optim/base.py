"""The optimizer interface: a `GradientTransformation` is a pair of pure functions.

Trees are flat ``dict[str, Tensor]`` keyed by parameter name (the names of ``model.named_parameters()``);
an optimizer state is a nested ``dict`` whose leaves are tensors.

Storage contract (what makes these transforms as lean as ``torch.optim``): ``update`` may overwrite the
``updates`` it receives and the tensors of ``state`` in place, and returns them. It never writes to
``params`` and never returns a tensor of ``state`` as an update. Callers that want to keep their inputs pass
copies; `funceng.make_train_step` does exactly that when asked not to donate its input state.
A transform written in a purely functional style (returning new tensors) is equally valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funceng import tree
from funceng.optim import arith

Params = dict[str, Tensor]
Updates = dict[str, Tensor]
OptState = dict[str, Any]


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params], tuple[Updates, OptState]]


def values(flat: Mapping[str, Tensor]) -> list[Tensor]:
    """The leaves of a flat tree, in key order."""
    return list(flat.values())


def zeros_like(params: Params) -> dict[str, Tensor]:
    """A zero tensor shaped like each parameter."""
    return {name: torch.zeros_like(p) for name, p in params.items()}


def scalar(value: float | Tensor, like: Tensor | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """A 0-d tensor on the device of ``like`` (hyperparameters live in the state as tensors)."""
    device = like.device if like is not None else None
    return torch.as_tensor(value, dtype=dtype, device=device).clone()


def first_param(params: Params) -> Tensor | None:
    """The first parameter, whose device new state tensors go to (``None`` for no parameters)."""
    return next(iter(params.values()), None)


def step_count(params: Params) -> Tensor:
    """A 0-d int64 count of updates, on the parameters' device."""
    return scalar(0, first_param(params), torch.int64)


def torch_scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` keeps its per-step scalars in (its ``_get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def prepare_gradients(updates: Updates, params: Params, weight_decay: float | Tensor = 0.0, maximize: bool = False):
    """The gradients of ``updates`` as a list, in place: negated with ``maximize``, then with L2 weight decay
    ``g <- g + wd p`` (``torch.optim``'s order)."""
    grads = values(updates)
    if maximize:
        torch._foreach_neg_(grads)
    if arith.is_set(weight_decay):
        arith.add_(grads, [params[n] for n in updates], weight_decay)
    return grads


def identity() -> GradientTransformation:
    """Leaves updates unchanged."""
    return GradientTransformation(lambda params: {}, lambda updates, state, params=None: (updates, state))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` in order; the state of the i-th lives under key ``str(i)``."""

    def init(params: Params) -> OptState:
        return {str(i): tx.init(params) for i, tx in enumerate(transforms)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        new_state = {}
        for i, tx in enumerate(transforms):
            updates, new_state[str(i)] = tx.update(updates, state[str(i)], params)
        return updates, same_or_new(state, new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``p <- p + u`` for every parameter, in place (the params are donated); returns ``params``."""
    if params:
        with torch.no_grad():
            torch._foreach_add_(values(params), [updates[name] for name in params])
    return params


def apply_if(
    flag: Tensor, tx: GradientTransformation, updates: Updates, state: OptState, params: Params | None
) -> tuple[Updates, OptState]:
    """Runs ``tx.update`` but keeps its effect only where the 0-d bool ``flag`` is true, without a host sync.

    The update is always computed; then the state is blended with a copy taken beforehand
    (``lerp`` with weight 0 or 1 is exact) and the updates are multiplied by 0 or 1. ``updates`` must be
    finite. Used by gradient accumulation (apply every k-th micro-step) and fp16 step skipping.
    """
    old_leaves = tree.leaves(state)
    floats = [t for t in old_leaves if t.is_floating_point()]
    others = [t for t in old_leaves if not t.is_floating_point()]
    float_backup = torch._foreach_mul(floats, 1) if floats else []
    other_backup = [t.clone() for t in others]  # step counters: one per transform, not per parameter
    updates, new_state = tx.update(updates, state, params)
    commit_state(state, new_state)
    keep_old = (~flag).to(torch.float32)
    if floats:
        torch._foreach_lerp_(floats, float_backup, keep_old)
    for t, old in zip(others, other_backup):
        t.copy_(torch.where(flag, t, old))
    if updates:
        torch._foreach_mul_(values(updates), flag.to(next(iter(updates.values())).dtype))
    return updates, state


def update_in_place(
    tx: GradientTransformation, updates: Updates, state: OptState, params: Params | None, only_if: Tensor | None = None
) -> Updates:
    """``tx.update`` with the new optimizer state written into the storage of ``state``; returns the updates.

    ``only_if`` (a 0-d bool tensor, or ``None`` for always): the step takes effect only where it is true
    (`apply_if`), without a host sync.
    """
    if only_if is not None:
        return apply_if(only_if, tx, updates, state, params)[0]
    updates, new_state = tx.update(updates, state, params)
    commit_state(state, new_state)
    return updates


def same_or_new(state: OptState, new_state: OptState) -> OptState:
    """``state`` itself when every entry of ``new_state`` is the same object (updated in place), else
    ``new_state``: lets `commit_state` skip the common in-place case with one identity check."""
    unchanged = all(new_state[key] is value for key, value in state.items())
    return state if unchanged and len(new_state) == len(state) else new_state


def commit_state(state: OptState, new_state: OptState) -> None:
    """Writes ``new_state`` into the storage of ``state`` where a transform returned new tensors."""
    if new_state is state:
        return
    for old, new in zip(tree.leaves(state), tree.leaves(new_state), strict=True):
        if old is not new:
            old.copy_(new)
