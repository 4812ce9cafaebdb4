"""MMEngine's imperative optimizer wrappers: `OptimWrapper`, `AmpOptimWrapper` and `OptimWrapperDict`.

An `OptimWrapper` around a ``torch.optim`` optimizer behaves as MMEngine's: ``update_params(loss)`` scales the
loss for gradient accumulation, calls ``backward``, and every ``accumulative_counts`` calls clips the gradients
(``clip_grad``), steps and zeroes them.

The Runner turns such a wrapper (or a config) into funceng's functional optimizer and *binds* the wrapper to its
state (`bind`): ``step`` then applies the functional transform to the gradients the backward pass left on the
model's parameters, writing the new parameters and optimizer state into the state's tensors in place. That is
how an overridden ``BaseModel.train_step(data, optim_wrapper)`` (MMEngine's way to write a GAN) trains while the
state stays one TensorDict and a checkpoint stays the state. The wrapped ``torch.optim`` optimizer is then only
read for its hyperparameters (``param_groups``), never stepped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from funceng.errors import ConfigError
from funceng.logging import MessageHub

AMP_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
}


class BoundUpdate:
    """What a bound wrapper's ``step`` does: ``update(named grads)`` applies the functional optimizer to the
    state; ``current()`` are the current values of the wrapper's groups' scheduled hyperparameters (``lr``,
    ``momentum``, ``betas``, ...), one dict per group; ``groups`` their configured hyperparameters."""

    def __init__(self, names: list[str], update: Callable[[dict], None], current: Callable[[], list[dict]], groups):
        self.names, self.update, self.current, self.groups = names, update, current, groups


class ReadOnlyGroup(dict):
    """A parameter group of a bound wrapper, as read from ``optimizer.param_groups``. The values live in the
    state (the lr follows ``param_scheduler``), so writing one is an error rather than a change that never
    takes effect."""

    def __setitem__(self, key, value):
        raise TypeError(
            f"param_groups[...][{key!r}] cannot be set on a funceng optimizer: its hyperparameters are part of the "
            "compiled update and the learning rate follows param_scheduler; set them in optim_wrapper or "
            "param_scheduler instead"
        )


class _GroupsView:
    """``optim_wrapper.optimizer`` of a bound wrapper: ``param_groups`` with the current learning rates."""

    def __init__(self, bound: BoundUpdate):
        self._bound = bound

    @property
    def param_groups(self) -> list[ReadOnlyGroup]:
        return [ReadOnlyGroup({**g, **now}) for g, now in zip(self._bound.groups, self._bound.current())]

    def step(self, closure=None):
        raise TypeError("optim_wrapper.optimizer.step(): call optim_wrapper.step() (or update_params(loss))")

    def zero_grad(self, set_to_none: bool = True):
        raise TypeError("optim_wrapper.optimizer.zero_grad(): call optim_wrapper.zero_grad()")


class OptimWrapper:
    """MMEngine's ``OptimWrapper``: ``optimizer`` (a ``torch.optim`` optimizer, or nothing when built by the
    Runner from a config), ``accumulative_counts`` and ``clip_grad`` (``dict(max_norm=...)`` or
    ``dict(type="value", clip_value=...)``)."""

    def __init__(self, optimizer: Any = None, accumulative_counts: int = 1, clip_grad: Mapping | None = None):
        if accumulative_counts < 1:
            raise ValueError(f"OptimWrapper.accumulative_counts must be >= 1, got {accumulative_counts}")
        self._optimizer = optimizer
        self._accumulative_counts = accumulative_counts
        self.clip_grad_kwargs = dict(clip_grad or {})
        self._inner_count = 0
        self._max_counts = -1
        self._bound: BoundUpdate | None = None
        self._bound_params: list[nn.Parameter] = []

    # -- what the Runner sets -----------------------------------------------------------------------------------

    def bind(self, model: nn.Module, bound: BoundUpdate) -> None:
        """Makes ``step`` update a funceng state (see the module docstring) for ``model``'s parameters."""
        if getattr(self, "_scaler", None) is not None:
            raise ConfigError(
                "AmpOptimWrapper(dtype='float16') cannot train a funceng state imperatively: its loss scaler would "
                "live outside the state. Use dtype='bfloat16' (no loss scaling), or the default train_step with "
                "optim_wrapper=dict(type='AmpOptimWrapper', dtype='float16', optimizer=...) (scaling in the state)"
            )
        self._bound = bound
        named = dict(model.named_parameters())  # the same Parameter objects for the whole run (binding sets .data)
        self._bound_params = [named[n] for n in bound.names]

    def initialize_count_status(self, model: nn.Module, init_counts: int, max_counts: int) -> None:
        self._inner_count, self._max_counts = init_counts, max_counts

    # -- MMEngine's interface -------------------------------------------------------------------------------------

    @property
    def optimizer(self) -> Any:
        return _GroupsView(self._bound) if self._bound is not None else self._optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _params(self) -> list[nn.Parameter]:
        if self._bound is not None:
            return self._bound_params
        return [p for g in self._optimizer.param_groups for p in g["params"]]

    def update_params(self, loss: torch.Tensor, step_kwargs: dict | None = None, zero_kwargs: dict | None = None):
        """``backward(scale_loss(loss))``; every ``accumulative_counts`` calls (and at the last iteration)
        ``step`` and ``zero_grad``."""
        loss = self.scale_loss(loss)
        self.backward(loss)
        if self.should_update():
            self.step(**(step_kwargs or {}))
            self.zero_grad(**(zero_kwargs or {}))

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss divided by the number of iterations its gradients are averaged over (the remainder in a
        last, incomplete window), as MMEngine's."""
        counts = self._accumulative_counts
        if counts == 1:
            return loss
        if self._max_counts != -1 and self._inner_count >= self._max_counts - self._max_counts % counts:
            return loss / (self._max_counts % counts)
        return loss / counts

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)
        self._inner_count += 1

    def should_update(self) -> bool:
        return self._inner_count % self._accumulative_counts == 0 or self._inner_count == self._max_counts

    def step(self, **kwargs: Any) -> None:
        self._clip_grad()
        if self._bound is None:
            self._optimizer.step(**kwargs)
            return
        if kwargs:
            raise TypeError(f"optim_wrapper.step({', '.join(kwargs)}=...): a funceng state's update takes no arguments")
        grads = {}
        for name, param in zip(self._bound.names, self._bound_params):
            grads[name] = torch.zeros_like(param) if param.grad is None else param.grad
        self._bound.update(grads)

    def zero_grad(self, **kwargs: Any) -> None:
        if self._bound is None:
            self._optimizer.zero_grad(**kwargs)
            return
        for p in self._params():
            p.grad = None

    def _clip_grad(self) -> None:
        if not self.clip_grad_kwargs:
            return
        params = [p for p in self._params() if p.grad is not None]
        cfg = dict(self.clip_grad_kwargs)
        if cfg.pop("type", "norm") == "value":
            torch.nn.utils.clip_grad_value_(params, **cfg)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, **cfg)
            MessageHub.get_current_instance().update_scalar("train/grad_norm", float(grad_norm))  # as MMEngine's

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Where the forward pass runs: nothing to set up here (funceng averages gradients across ranks in the
        step); `AmpOptimWrapper` enters autocast."""
        yield

    def get_lr(self) -> dict[str, list[float]]:
        return {"lr": [group["lr"] for group in self.param_groups]}

    def get_momentum(self) -> dict[str, list[float]]:
        momentum = []
        for group in self.param_groups:
            momentum.append(group["betas"][0] if "betas" in group else group.get("momentum", 0))
        return {"momentum": momentum}

    def state_dict(self) -> dict:
        if self._bound is not None:
            raise TypeError("a bound optimizer wrapper's state is part of the TrainState: save the state")
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self._bound is not None:
            raise TypeError("a bound optimizer wrapper's state is part of the TrainState: load the state")
        self._optimizer.load_state_dict(state_dict)


class AmpOptimWrapper(OptimWrapper):
    """MMEngine's ``AmpOptimWrapper``: the forward pass (``optim_context``) under autocast to ``dtype``.

    Standalone (around a ``torch.optim`` optimizer) it scales float16 losses with ``torch.amp.GradScaler``, as
    MMEngine's. Bound by the Runner, float16 is refused for an overridden ``train_step`` (the default step has
    dynamic loss scaling in the state): use ``"bfloat16"``.
    """

    def __init__(self, loss_scale: str | float = "dynamic", dtype: Any = "float16", **kwargs: Any):
        super().__init__(**kwargs)
        if dtype not in AMP_DTYPES:
            raise ValueError(f"AmpOptimWrapper.dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
        self.cast_dtype = AMP_DTYPES[dtype]
        self.loss_scale = loss_scale
        self._scaler = None
        if self._optimizer is not None and self.cast_dtype == torch.float16:
            init_scale = 2.0**16 if loss_scale == "dynamic" else float(loss_scale)
            self._scaler = torch.amp.GradScaler(init_scale=init_scale, enabled=True)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        super().backward(loss, **kwargs)

    def step(self, **kwargs: Any) -> None:
        if self._scaler is None:
            return super().step(**kwargs)
        self._scaler.unscale_(self._optimizer)
        self._clip_grad()
        self._scaler.step(self._optimizer, **kwargs)
        self._scaler.update()

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else "cpu"
        with torch.autocast(device_type=device, dtype=self.cast_dtype):
            yield


class OptimWrapperDict(dict):
    """MMEngine's ``OptimWrapperDict``: named `OptimWrapper` objects, one per part of a model
    (``optim_wrapper["generator"]``), for an overridden ``train_step``."""

    def __init__(self, **optim_wrappers: OptimWrapper):
        for name, wrapper in optim_wrappers.items():
            if not isinstance(wrapper, OptimWrapper):
                raise TypeError(f"OptimWrapperDict[{name!r}]: expected an OptimWrapper, got {type(wrapper).__name__}")
        super().__init__(optim_wrappers)

    def get_lr(self) -> dict[str, list[float]]:
        return {f"{name}.lr": wrapper.get_lr()["lr"] for name, wrapper in self.items()}

    def get_momentum(self) -> dict[str, list[float]]:
        return {f"{name}.momentum": wrapper.get_momentum()["momentum"] for name, wrapper in self.items()}

    def initialize_count_status(self, model: nn.Module, init_counts: int, max_counts: int) -> None:
        for wrapper in self.values():
            wrapper.initialize_count_status(model, init_counts, max_counts)

    def update_params(self, loss: torch.Tensor, *args: Any, **kwargs: Any):
        raise NotImplementedError(
            "OptimWrapperDict.update_params: update each part with optim_wrapper[name].update_params(loss)"
        )

    @contextlib.contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        raise NotImplementedError("OptimWrapperDict.optim_context: use optim_wrapper[name].optim_context(module)")
        yield
