"""How the Runner calls the model: MMEngine's ``forward(*inputs, mode)`` contract, or the functional API's
``loss_fn(model, batch)`` and ``predict_fn(model, batch)`` for a plain ``nn.Module``.

With the functions, the same module and functions that train by hand (``make_train_step(model, tx, loss_fn)``)
train through the Runner: its state has the module's own parameter names, so a state or checkpoint moves
between the two.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from funceng.errors import ConfigError


def follows_mode_contract(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes MMEngine's ``mode`` argument (a `funceng.model.BaseModel` does)."""
    try:
        return "mode" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def check_model_functions(
    model: nn.Module, loss_fn: Callable | None, predict_fn: Callable | None, trains: bool, evaluates: bool
) -> tuple[Callable | None, Callable | None]:
    """``(loss_fn, predict_fn)`` after checking that the Runner can call ``model`` for what it is asked to do
    (``trains``: a train loop is configured; ``evaluates``: a val or test loop); ``None`` means ``mode=``."""
    from funceng.runner.imperative_step import overrides_train_step

    for name, fn in (("loss_fn", loss_fn), ("predict_fn", predict_fn)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name}: expected a function {name}(model, batch), got {type(fn).__name__}")
    if follows_mode_contract(model):
        if loss_fn is not None and overrides_train_step(model):
            raise ConfigError(
                f"loss_fn: {type(model).__name__} overrides train_step (MMEngine's imperative training), which "
                "computes its own loss; drop loss_fn or the train_step override"
            )
        return loss_fn, predict_fn
    name = type(model).__name__
    if trains and loss_fn is None:
        raise ConfigError(
            f"model: {name}.forward takes no 'mode' argument (MMEngine's BaseModel contract), so the Runner cannot "
            "compute a loss from it: give loss_fn=lambda model, batch: <scalar loss or dict with 'loss'> (what "
            "funceng.make_train_step takes), or subclass funceng.model.BaseModel"
        )
    if evaluates and predict_fn is None:
        raise ConfigError(
            f"model: {name}.forward takes no 'mode' argument, so validation and testing need "
            "predict_fn=lambda model, batch: <what the metrics' process receives>, e.g. model(batch[0]) for "
            "funceng.metrics.Accuracy, which then takes the labels from the batch"
        )
    return loss_fn, predict_fn
