"""`TrainState`: the whole training state as one locked TensorDict.

Keys (fixed for the life of a run, so compiled steps never see a new structure):

- ``params``: ``{name: tensor}`` for every ``model.named_parameters()`` name;
- ``buffers``: ``{name: tensor}`` for every ``model.named_buffers()`` (BatchNorm statistics, ...);
- ``opt_state``: the optimizer's state (`funceng.optim`), learning rates included, as tensors;
- ``step``: int64 count of train steps taken; ``loss_scale``: fp16 dynamic loss scale and growth tracker;
- ``rng``: the state of the torch generators the step draws from (``cpu``, and ``cuda`` on CUDA).

Donation. A train step updates the tensors of its input state in place (no second copy of parameters or
optimizer state) and returns a new `TrainState` object holding them; the input object is then *donated*:
it is emptied and any further use raises `DonatedStateError`. Keep a copy with ``state.clone()`` before the
step, or build the step with ``donate=False``, to keep the old value.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import nn

from funceng import binding, loss_scale, rng
from funceng.errors import DonatedStateError
from funceng.optim import GradientTransformation
from funceng.sharding import is_sharded, local_params

REQUIRED_KEYS = ("params", "buffers", "opt_state", "step", "loss_scale", "rng")


def _donated_message() -> str:
    return (
        "this TrainState was donated to a train step: its tensors now hold the next state, which the step "
        "returned. Use the returned state (`state, metrics = step(state, batch)`), or clone the state before "
        "the step / build the step with donate=False to keep this value."
    )


class TrainState(TensorDict):
    """A locked TensorDict with the keys listed in the module docstring; build it with `TrainState.create`."""

    @classmethod
    def create(cls, model: nn.Module, tx: GradientTransformation, *, seed: int = 0) -> TrainState:
        """The initial state for ``model`` trained by ``tx``.

        The state owns copies of the model's parameters and buffers; the model is then re-pointed at the
        state's tensors, so the two share storage and no second copy of the weights stays alive. For a model
        sharded with `funceng.sharding.fully_shard_model` the state holds this rank's rows of each parameter.
        """
        sharded = is_sharded(model)
        if sharded:  # this rank's rows, the very storage of the model's sharded parameters (see funceng.sharding)
            params, buffers = local_params(model), dict(model.named_buffers())
        else:
            params = {name: p.detach().clone() for name, p in model.named_parameters()}
            buffers = {name: b.clone() for name, b in model.named_buffers()}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        state = cls(
            {
                "params": params,
                "buffers": buffers,
                "opt_state": tx.init(params),
                "step": torch.zeros((), dtype=torch.int64, device=device),
                "loss_scale": loss_scale.init(device),
                "rng": rng.generator_states(seed, device),
            },
            batch_size=[],
        )
        state.lock_()
        if not sharded:
            binding.bind(model, params, buffers)
        return state

    def __getitem__(self, key: Any) -> Any:
        if self.__dict__.get("_donated"):
            raise DonatedStateError(_donated_message())
        return super().__getitem__(key)

    def __repr__(self) -> str:
        if self.__dict__.get("_donated"):
            return "TrainState(<donated>)"
        return super().__repr__()


def successor(state: TrainState, donate: bool) -> TrainState:
    """The state after an in-place step, as a new `TrainState` object over the same tensors.

    With ``donate`` the new object takes over the old one's contents (an O(1) move, no re-nesting) and the old
    object becomes an empty, donated state. Without it ``state`` must be a private copy, which is moved too.
    """
    new = TrainState.__new__(TrainState)
    new.__dict__ = state.__dict__
    state.__dict__ = TrainState({}, batch_size=[]).__dict__
    state.__dict__["_donated"] = donate
    return new


def check_state(state: Any) -> None:
    """Raises a clear error for something that is not a live TrainState."""
    if isinstance(state, TrainState) and state.__dict__.get("_donated"):
        raise DonatedStateError(_donated_message())
    if not isinstance(state, TensorDict):
        raise TypeError(f"expected a TrainState (TensorDict), got {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state.keys()]
    if missing:
        raise KeyError(f"state is missing keys {missing}; build it with funceng.TrainState.create(model, tx)")
