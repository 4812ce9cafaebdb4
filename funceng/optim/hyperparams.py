"""Hyperparameters held in the optimizer state (optax's ``inject_hyperparams``): what lets a schedule drive the
momentum, the betas or the weight decay of any optimizer, not only its learning rate, with no recompilation.

``inject_hyperparams(adamw, ("lr", "betas", "weight_decay"))(lr=1e-3)`` is `funceng.optim.adamw` whose named
hyperparameters live in ``state["hyperparams"]`` as float64 tensors (a tuple such as ``betas`` as a 1-D tensor).
Each update builds the optimizer from the current tensors, so writing a new value into the state (a schedule
inside the compiled step, a plateau rule between steps) changes the next update. The optimizer's other state
lives under ``state["inner"]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from funceng.optim.base import GradientTransformation, OptState, Params, Updates, first_param

HYPERPARAMS = "hyperparams"


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], names: Sequence[str]
) -> Callable[..., GradientTransformation]:
    """``factory`` with the hyperparameters ``names`` in the state; call the result with ``factory``'s arguments."""

    defaults = {k: p.default for k, p in inspect.signature(factory).parameters.items() if p.default is not p.empty}
    unknown = [name for name in names if name not in defaults]
    if unknown:
        raise TypeError(f"inject_hyperparams: {getattr(factory, '__name__', factory)} has no hyperparameter {unknown}")

    def build(**kwargs: Any) -> GradientTransformation:
        kwargs = {**{name: defaults[name] for name in names}, **kwargs}
        initial = {name: kwargs[name] for name in names}

        def init(params: Params) -> OptState:
            like = first_param(params)
            device = like.device if like is not None else None
            values = {name: torch.tensor(value, dtype=torch.float64, device=device) for name, value in initial.items()}
            return {HYPERPARAMS: values, "inner": factory(**{**kwargs, **_unpacked(values)}).init(params)}

        def update(updates: Updates, state: OptState, params: Params | None = None):
            inner = factory(**{**kwargs, **_unpacked(state[HYPERPARAMS])})
            updates, state["inner"] = inner.update(updates, state["inner"], params)
            return updates, state

        return GradientTransformation(init, update)

    return build


def _unpacked(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A 1-D tensor stands for a tuple (``betas``): passed as a tuple of 0-d tensors."""
    return {name: tuple(value.unbind()) if value.ndim else value for name, value in values.items()}


def find_hyperparams(opt_state: Any) -> list[tuple[tuple[str, ...], dict]]:
    """``(path, hyperparams dict)`` of every injected optimizer in ``opt_state``, depth first; the path is the
    keys leading to it (e.g. ``("inner", "1", "lr_mult=0.1,decay_mult=1.0")``)."""
    found = []

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if hasattr(node, "keys") and not isinstance(node, torch.Tensor):  # a dict or a TensorDict
            if HYPERPARAMS in node:
                found.append((path, node[HYPERPARAMS]))
            for key in node.keys():
                if key != HYPERPARAMS:
                    visit(node[key], (*path, key))

    visit(opt_state, ())
    return found
