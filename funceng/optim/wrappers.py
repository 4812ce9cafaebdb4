"""Transforms of transforms: gradient accumulation and per-parameter groups."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from funceng.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    apply_if,
    first_param,
    identity,
    same_or_new,
    scalar,
    values,
    zeros_like,
)
from funceng.optim.transforms import set_to_zero

Labeler = Callable[[str, torch.Tensor], str] | Mapping[str, str]


def accumulate(tx: GradientTransformation, every: int, total: int | None = None) -> GradientTransformation:
    """Gradient accumulation: apply ``tx`` to the mean of ``every`` consecutive updates.

    Each call adds ``u`` to ``acc``; on every ``every``-th call ``tx`` sees ``acc / every`` and ``acc`` is reset;
    on the others the returned update is zero and ``tx``'s state is unchanged. Branchless: no host sync.

    ``total``: the number of calls in the run (its iterations). If ``every`` does not divide it, the last
    incomplete window is applied too, at the last call, as the mean of its ``total % every`` updates
    (MMEngine's ``OptimWrapper`` rule).
    """
    if every < 1:
        raise ValueError(f"accumulate: every must be >= 1, got {every}")
    if every == 1:
        return tx

    remainder = total % every if total else 0
    divisible = total - remainder if total else 0

    def init(params: Params) -> OptState:
        like = first_param(params)
        state = {"mini_step": scalar(0, like, torch.int64), "acc": zeros_like(params), "inner": tx.init(params)}
        if remainder:
            state["calls"] = scalar(0, like, torch.int64)
        return state

    def update(updates: Updates, state: OptState, params: Params | None = None):
        mini_step, acc = state["mini_step"], values(state["acc"])
        mini_step.add_(1)
        is_last = mini_step == every
        divisor: int | torch.Tensor = every
        if remainder:
            calls = state["calls"]
            calls.add_(1)
            in_last_window = calls > divisible
            is_last = is_last | (calls == total)
            divisor = torch.where(in_last_window, remainder, every).to(torch.float64)
        if updates:
            torch._foreach_add_(acc, values(updates))
            torch._foreach_copy_(values(updates), acc)
            torch._foreach_div_(values(updates), divisor)
            torch._foreach_mul_(acc, (~is_last).to(acc[0].dtype))
        updates, state["inner"] = apply_if(is_last, tx, updates, state["inner"], params)
        mini_step.mul_((~is_last).to(torch.int64))
        return updates, state

    return GradientTransformation(init, update)


def _entry_for(table: Callable | Mapping, name: str, param: torch.Tensor, missing: str):
    """``table(name, param)`` or ``table[name]``; a mapping without ``name`` raises ``KeyError`` saying
    ``"{missing} for parameter {name!r}"``."""
    if callable(table):
        return table(name, param)
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"{missing} for parameter {name!r}") from None


def partition(transforms: Mapping[str, GradientTransformation], labels: Labeler) -> GradientTransformation:
    """Different transforms for different parameter groups (MMEngine's ``paramwise_cfg``, optax's
    ``multi_transform``). ``labels`` maps each parameter name to a key of ``transforms``, as a dict or a
    function ``(name, param) -> label``. The state of group ``k`` lives under key ``k``.
    """

    def groups(params: Params) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {label: [] for label in transforms}
        for name, p in params.items():
            label = _entry_for(labels, name, p, "partition: no label")
            if label not in out:
                raise KeyError(f"partition: parameter {name!r} has label {label!r}; known: {sorted(transforms)}")
            out[label].append(name)
        return out

    cache: dict[tuple[str, ...], dict[str, list[str]]] = {}  # labels are a pure function of the names

    def groups_of(tree: Params) -> dict[str, list[str]]:
        key = tuple(tree)
        if key not in cache:
            cache[key] = groups(tree)
        return cache[key]

    def init(params: Params) -> OptState:
        names_by_label = groups_of(params)
        return {label: tx.init({n: params[n] for n in names_by_label[label]}) for label, tx in transforms.items()}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        names_by_label = groups_of(updates)
        new_state = {}
        for label, tx in transforms.items():
            names = names_by_label[label]
            sub_params = {n: params[n] for n in names} if params is not None else None
            sub_updates, new_state[label] = tx.update({n: updates[n] for n in names}, state[label], sub_params)
            updates.update(sub_updates)
        return updates, same_or_new(state, new_state)

    return GradientTransformation(init, update)


Mask = Callable[[str, torch.Tensor], bool] | Mapping[str, bool]


def masked(tx: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Applies ``tx`` only to the parameters where ``mask`` is true; the others' updates pass through unchanged
    (optax's ``masked``).

    Warning: "unchanged" means the *raw input* of this transform. Used as the whole optimizer,
    ``masked(adam(lr), mask)`` adds the unmasked parameters' raw gradients to them (an update of ``+g``, with
    no learning rate). It is meant inside a chain, e.g. ``chain(masked(add_decayed_weights(wd), mask), sgd(lr))``
    for weight decay on some parameters only. To leave parameters alone, use `freeze` or `set_to_zero`, or
    ``requires_grad_(False)`` before building the state.
    """

    def label(name: str, p: torch.Tensor) -> str:
        return "masked" if _entry_for(mask, name, p, "mask: no entry") else "unmasked"

    return partition({"masked": tx, "unmasked": identity()}, label)


def freeze(mask: Mask) -> GradientTransformation:
    """Zero updates (`set_to_zero`) for the parameters where ``mask`` is true (optax's ``freeze``); the others'
    updates pass through.

    Place it *last* in a chain, ``chain(adamw(lr), freeze(mask))``: the frozen parameters then stay the same
    bit for bit, though the transforms before it still keep state for them and weight decay is still computed.
    Freezing with ``requires_grad_(False)`` before `TrainState.create` is cheaper: no gradient, no optimizer
    state. Placed first, a later transform (weight decay, a momentum buffer) would still move them.
    """
    return masked(set_to_zero(), mask)
