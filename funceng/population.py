"""Populations: N members of one architecture trained together, as one `TrainState` whose every leaf has a leading
member dimension (``state["params", "fc.weight"]`` is ``[N, out, in]``; ``state["step"]`` is ``[N]``).

- `create`: member ``i`` initialised exactly as a single-model state built with ``seed=seeds[i]``;
- `stack` / `member`: a population from ordinary states and back (``member(stack(states), i)`` equals
  ``states[i]``, its generator included);
- `set_hyperparams`: per-member hyperparameters (an lr sweep), written into the optimizer state;
- `size`: the number of members (``None`` for an ordinary state).

Steps over a population are in `funceng.population_step`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from funceng import tree
from funceng.optim import GradientTransformation
from funceng.state import TrainState, check_state

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def size(state: Any) -> int | None:
    """The number of members of a population state, ``None`` for a single-model state (its ``step`` is 0-d)."""
    check_state(state)
    step = state["step"]
    return int(step.shape[0]) if step.ndim == 1 else None


def _members_of(state: Any) -> int:
    n = size(state)
    if n is None:
        raise ValueError(
            "expected a population state (every leaf with a leading member dimension, built with "
            "funceng.population.create or stack); this is a single-model state"
        )
    return n


def reinitialise(model: nn.Module) -> None:
    """Draws fresh weights for ``model`` as its constructor did: ``reset_parameters()`` of every submodule that has
    one, in module order, then ``init_weights()`` when the model defines it (MMEngine's `BaseModule`)."""
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        init_weights()


def _member_model(model: ModelOrFactory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(model, nn.Module):
        reinitialise(model)
        return model
    built = model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"population.create: the model factory returned {type(built).__name__}, not an nn.Module")
    return built


def create(
    model: ModelOrFactory,
    tx: GradientTransformation,
    *,
    seeds: Sequence[int],
    hyperparams: Mapping[str, Sequence[float] | Tensor] | None = None,
) -> TrainState:
    """A population of ``len(seeds)`` members of ``model`` trained by ``tx``.

    Member ``i`` is what ``torch.manual_seed(seeds[i])`` followed by building the model and
    ``TrainState.create(model, tx, seed=seeds[i])`` gives: pass a factory (the model class, or a function
    returning the model) to have it rebuilt per member, exactly; or a model, re-initialised per member with
    `reinitialise` (exact for models whose constructor draws its weights through ``reset_parameters``, as every
    ``torch.nn`` layer does). The global generator is left as it was. ``hyperparams``: per-member values, see
    `set_hyperparams`.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("population.create: seeds is empty; a population needs at least one member")
    states = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            states.append(TrainState.create(_member_model(model, seed), tx, seed=seed))
    population = stack(states)
    if hyperparams:
        set_hyperparams(population, **hyperparams)
    return population


def stack(states: Sequence[TrainState]) -> TrainState:
    """One population state from ordinary states of the same model and optimizer (each leaf stacked)."""
    if not states:
        raise ValueError("population.stack: no states given")
    for state in states:
        check_state(state)
        if size(state) is not None:
            raise ValueError("population.stack: expected single-model states; one is already a population")
    template, first = tree.flatten(states[0].to_dict())
    paths = tree.leaf_paths(template)
    columns = [[leaf] for leaf in first]
    for i, state in enumerate(states[1:], start=1):
        other_template, leaves = tree.flatten(state.to_dict())
        if other_template != template:
            raise ValueError(
                f"population.stack: state {i} has another structure than state 0: "
                f"{tree.describe_difference(template, other_template)}"
            )
        for column, leaf, path, reference in zip(columns, leaves, paths, first):
            if leaf.shape != reference.shape or leaf.dtype != reference.dtype or leaf.device != reference.device:
                raise ValueError(
                    f"population.stack: leaf {path!r} of state {i} is {leaf.dtype} {tuple(leaf.shape)} on "
                    f"{leaf.device}, but state 0's is {reference.dtype} {tuple(reference.shape)} on {reference.device}"
                )
            column.append(leaf)
    stacked = [torch.stack(column) for column in columns]
    return TrainState(tree.unflatten(template, stacked), batch_size=[]).lock_()


def member(state: TrainState, index: int, copy: bool = True) -> TrainState:
    """Member ``index`` of a population as an ordinary `TrainState`: an independent copy, or with ``copy=False``
    views of the population's rows (to evaluate a member without copying it; a train step must not be given
    views)."""
    n = _members_of(state)
    if not -n <= index < n:
        raise IndexError(f"population.member: index {index} out of range for a population of {n} members")
    template, leaves = tree.flatten(state.to_dict())
    rows = [leaf[index].clone() if copy else leaf[index] for leaf in leaves]
    return TrainState(tree.unflatten(template, rows), batch_size=[]).lock_()


def hyperparameter_leaves(opt_state: Any, name: str, caller: str) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` of every optimizer-state leaf whose own key is ``name`` (``lr`` of each transform or
    param group; an injected hyperparameter such as ``weight_decay``). None is an error naming ``caller`` and the
    way to keep the hyperparameter in the state."""
    if isinstance(opt_state, TensorDict):
        opt_state = opt_state.to_dict()
    found = [("/".join(path), leaf) for path, leaf in tree.walk(opt_state) if path and path[-1] == name]
    if not found:
        raise KeyError(
            f"{caller}: the optimizer state keeps no {name!r}, so it cannot differ per member. Build the optimizer "
            f"with funceng.optim.inject_hyperparams(factory, ({name!r},))(...) to keep it in the state"
        )
    return found


def scale_hyperparams(state: TrainState, **factors: Sequence[float] | Tensor) -> None:
    """Multiplies every optimizer-state leaf named ``name`` by member ``i``'s factor, in place:
    ``scale_hyperparams(state, lr=[0.5, 1, 2])`` keeps the ratios between param groups (``lr_mult``)."""
    n = _members_of(state)
    for name, factor in factors.items():
        for _, leaf in hyperparameter_leaves(state["opt_state"], name, "scale_hyperparams"):
            column = torch.as_tensor(factor, dtype=leaf.dtype).to(leaf.device)
            if column.shape != (n,):
                raise ValueError(
                    f"scale_hyperparams: {name} needs one factor per member ({n}), got {tuple(column.shape)}"
                )
            leaf.mul_(column.reshape(n, *[1] * (leaf.ndim - 1)))


def set_hyperparams(state: TrainState, **values: Sequence[float] | Tensor) -> None:
    """Writes per-member hyperparameters into a population's optimizer state, in place:
    ``set_hyperparams(state, lr=[1e-3, 3e-3, 1e-2], weight_decay=[0, 1e-4, 1e-4])``.

    Each value has one entry per member (a row per member for a tuple hyperparameter such as ``betas``) and is
    written into every optimizer-state leaf of that name. A hyperparameter the optimizer does not keep in its
    state (a plain float closed over) cannot differ per member: that is an error naming the way out,
    `funceng.optim.inject_hyperparams`.
    """
    n = _members_of(state)
    opt_state = state["opt_state"]
    for name, value in values.items():
        for path, leaf in hyperparameter_leaves(opt_state, name, "set_hyperparams"):
            column = torch.as_tensor(value, dtype=leaf.dtype).to(leaf.device)
            if column.shape != leaf.shape:
                raise ValueError(
                    f"set_hyperparams: {name}={list(map(float, column.flatten()))[:8]} has shape "
                    f"{tuple(column.shape)}; the population's {path!r} has shape {tuple(leaf.shape)} "
                    f"(one value per member of {n})"
                )
            leaf.copy_(column)
