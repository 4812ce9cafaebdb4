"""`TrainState`: the whole training state as one locked TensorDict.

Keys (fixed for the life of a run, so compiled steps never see a new structure):

- ``params``: ``{name: tensor}`` for every ``model.named_parameters()`` name, frozen ones included;
- ``buffers``: ``{name: tensor}`` for every ``model.named_buffers()`` (BatchNorm statistics, ...);
- ``opt_state``: the optimizer's state (`funceng.optim`) for the *trainable* parameters (``requires_grad``),
  learning rates included, as tensors;
- ``step``: int64 count of train steps taken; ``loss_scale``: fp16 dynamic loss scale and growth tracker;
- ``rng``: the state of the torch generators the step draws from (``cpu``, and ``cuda`` on CUDA).

Donation. A train step updates the tensors of its input state in place (no second copy of parameters or
optimizer state) and returns a new `TrainState` object holding them; the input object is then *donated*
(`donate`): any further use of it raises `DonatedStateError`. Keep a copy with ``state.clone()`` before the
step, or build the step with ``donate=False``, to keep the old value.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn

from funceng import loss_scale, rng, tree
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


def trainable_names(model: nn.Module) -> list[str]:
    """The parameters a step trains: those with ``requires_grad`` (``torch.optim`` skips the others too)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class TrainState(TensorDict):
    """A locked TensorDict with the keys listed in the module docstring; build it with `TrainState.create`."""

    @classmethod
    def create(cls, model: nn.Module, tx: GradientTransformation, *, seed: int = 0) -> TrainState:
        """The initial state for ``model`` trained by ``tx``.

        The state owns copies of the model's parameters and buffers, so states created from one model are
        independent (re-initialise the model between calls to build several). The model is pointed at the
        state's tensors when a step first runs with it, which frees the model's own copy. Parameters with
        ``requires_grad=False`` are kept in ``params`` but get no optimizer state: steps leave them unchanged.
        For a model sharded with `funceng.sharding.fully_shard_model` the state holds this rank's rows of each
        parameter, the very storage of the model's sharded parameters.
        """
        if is_sharded(model):
            params, buffers = local_params(model), dict(model.named_buffers())
        else:
            params = {name: p.detach().clone() for name, p in model.named_parameters()}
            buffers = {name: b.clone() for name, b in model.named_buffers()}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        state = cls(
            {
                "params": params,
                "buffers": buffers,
                "opt_state": tx.init({name: params[name] for name in trainable_names(model)}),
                "step": torch.zeros((), dtype=torch.int64, device=device),
                "loss_scale": loss_scale.init(device),
                "rng": rng.generator_states(seed, device),
            },
            batch_size=[],
        )
        return state.lock_()


class _DonatedTrainState(TrainState):
    """What a donated `TrainState` object becomes: every use raises `DonatedStateError`."""

    def __getattribute__(self, name: str) -> Any:
        if name in _STILL_ANSWERED:
            return object.__getattribute__(self, name)
        if name == "_is_locked":  # tensordict asks a lock parent this; a donated state holds nothing locked
            return False
        raise DonatedStateError(_donated_message())

    def __repr__(self) -> str:
        return "TrainState(<donated>)"


_STILL_ANSWERED = {"__class__", "__dict__", "__repr__", "__str__", "__sizeof__", "__weakref__", "__format__"}
_TYPE_MACHINERY = {
    *("__getattribute__", "__new__", "__init__", "__init_subclass__", "__subclasshook__", "__class_getitem__"),
    *("__doc__", "__module__", "__annotations__", "__slots__", "__abstractmethods__", "__hash__"),
}


def _raise_donated(self, *args, **kwargs):
    raise DonatedStateError(_donated_message())


# Operators and protocols (len, iter, in, ==, +, pickling, setattr, ...) are looked up on the type, not through
# __getattribute__: each of TensorDict's raises too.
for _name in dir(TensorDict):
    if _name.startswith("__") and callable(getattr(TensorDict, _name, None)):
        if _name not in _STILL_ANSWERED and _name not in _TYPE_MACHINERY:
            setattr(_DonatedTrainState, _name, _raise_donated)


def donate(state: TrainState) -> TrainState:
    """Moves ``state``'s contents into a new `TrainState` object and returns it; ``state`` becomes donated.

    O(1): the new object takes over the old one's attributes (the nested TensorDicts and their tensors) as
    they are. Caches tensordict keeps while locked (key views) refer to the object they were made for, so the
    new object starts without them.
    """
    new = TrainState.__new__(TrainState)
    contents = object.__getattribute__(state, "__dict__")
    contents.pop("_cache", None)
    object.__setattr__(new, "__dict__", contents)
    object.__setattr__(state, "__dict__", {})
    object.__setattr__(state, "__class__", _DonatedTrainState)
    return new


def is_donated(state: Any) -> bool:
    return type(state) is _DonatedTrainState


def check_state(state: Any) -> None:
    """Raises a clear error for something that is not a live TrainState."""
    if is_donated(state):
        raise DonatedStateError(_donated_message())
    if not isinstance(state, TensorDict):
        raise TypeError(f"expected a TrainState (TensorDict), got {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state.keys()]
    if missing:
        raise KeyError(f"state is missing keys {missing}; build it with funceng.TrainState.create(model, tx)")


# -- what a state for a given model and optimizer looks like ------------------------------------------------------


def _meta(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}


def _opt_state_like(model: nn.Module, tx: GradientTransformation, params: dict[str, Tensor]) -> Any:
    """``tx.init`` of the trainable parameters, on the meta device where the transform allows it (no memory)."""
    trainable = trainable_names(model)
    try:
        return tx.init(_meta({name: params[name] for name in trainable}))
    except (NotImplementedError, RuntimeError):  # an init that needs real values: build it once for real
        with torch.no_grad():
            return tx.init({name: params[name].detach() for name in trainable})


def expected_state(model: nn.Module, tx: GradientTransformation | None) -> tuple[dict, list[torch.device]]:
    """The state that ``TrainState.create(model, tx)`` builds, as a nested dict of meta tensors (shapes and dtypes
    only), and the device each leaf must be on, in leaf order. Without ``tx``: ``params`` and ``buffers`` only."""
    params = local_params(model) if is_sharded(model) else {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    device = next(iter(params.values())).device if params else torch.device("cpu")
    expected: dict[str, Any] = {"params": _meta(params), "buffers": _meta(buffers)}
    if tx is not None:
        expected["opt_state"] = _opt_state_like(model, tx, params)
        expected["step"] = torch.empty((), dtype=torch.int64, device="meta")
        expected["loss_scale"] = loss_scale.init(torch.device("meta"))
        expected["rng"] = rng.generator_states(0, device)
    devices = []
    for path, _ in tree.walk(expected):
        if path[0] == "params":
            devices.append(params[path[1]].device)
        elif path[0] == "buffers":
            devices.append(buffers[path[1]].device)
        elif path[0] == "rng":
            devices.append(torch.device("cpu"))
        else:
            devices.append(device)
    return expected, devices


def check_leaves(expected: list[Tensor], devices: list[torch.device], leaves: list[Tensor], paths: list[str]) -> None:
    """Raises a `ValueError` naming the first leaf whose shape, dtype or device differs from what is expected."""
    for want, device, got, path in zip(expected, devices, leaves, paths, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype or got.device != device:
            raise ValueError(
                f"state leaf {path!r} is a {got.dtype} tensor of shape {tuple(got.shape)} on {got.device}, but the "
                f"model and optimizer of this step need {want.dtype} of shape {tuple(want.shape)} on {device}. "
                "Was the state created for another model (or another version of it)?"
            )
        if got.requires_grad:
            raise ValueError(
                f"state leaf {path!r} requires grad (it carries autograd history): a state holds plain tensors. "
                "Build it with TrainState.create, or detach the tensors you put in it"
            )
