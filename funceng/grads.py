"""Gradients of the loss with respect to a state's parameters, computed one of three ways.

Each is built for the names of the parameters to train (the model's ``requires_grad`` ones) and called as
``grads_fn(params, buffers, batch, scale) -> (grads, loss, logs)``: ``grads`` holds one gradient per trained
parameter (zeros where the loss does not use it), none for frozen ones; the unscaled ``loss`` and the logged
values; all free of autograd history, even when the loss runs through other modules that require grad (a GAN's
discriminator, a teacher). ``scale`` (fp16 loss scaling) multiplies the loss before differentiation, or is
``None``.

- `EagerGradients`: the model bound to the state's tensors and ``torch.autograd.grad``; as fast as a
  hand-written loop.
- `FunctionalGradients`: ``torch.func.grad`` over ``torch.func.functional_call``; traces into one compiled graph.
  The buffers of the other modules the loss function names are passed in too, so it may update them in place
  (BatchNorm statistics of a discriminator in training mode), which ``grad`` forbids for captured tensors.
- `ShardedGradients`: FSDP2's own backward, whose hooks reduce-scatter the averaged gradients.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from funceng import binding
from funceng.loss import parse_loss

LossFn = Callable[[nn.Module, Any], Any]
Grads = tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype``, or no autocast for ``None``."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _scaled(loss: Tensor, scale: Tensor | None) -> Tensor:
    return loss if scale is None else loss * scale


def modules_used_by(fn: Any, model: nn.Module) -> list[nn.Module]:
    """The modules other than ``model`` (and its submodules) that ``fn`` names: its closure's and its globals'
    (a GAN discriminator in a generator's loss, a teacher). Found from the code, so a module reached another way
    (an attribute of an object) is not listed."""
    try:
        names = inspect.getclosurevars(fn)
    except (TypeError, ValueError):  # not a Python function (a partial, a callable object), or an empty cell
        return []
    own = {id(m) for m in model.modules()}
    found = [v for v in (*names.nonlocals.values(), *names.globals.values()) if isinstance(v, nn.Module)]
    return list({id(m): m for m in found if id(m) not in own}.values())


class ModelFunction(nn.Module):
    """``fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap the model's tensors, and the
    buffers of the ``others`` modules ``fn`` uses (passed in as inputs, they may be updated in place)."""

    def __init__(self, model: nn.Module, fn: LossFn, others: list[nn.Module] = ()):
        super().__init__()
        self.model, self.fn = model, fn
        self.others = nn.ModuleList(others)
        # found once, by identity, here: inside a compiled step, id() of a buffer would make torch.compile guard
        # on that very tensor, and recompile for every state the model is bound to
        seen, self.other_buffer_names = {id(b) for b in model.buffers()}, []
        for name, buffer in self.others.named_buffers(prefix="others", remove_duplicate=False):
            if id(buffer) not in seen:
                seen.add(id(buffer))
                self.other_buffer_names.append(name)

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)

    def other_buffers(self) -> dict[str, Tensor]:
        """The buffers of the other modules, each tensor once, and none of the model's."""
        return {name: self.get_buffer(name) for name in self.other_buffer_names}

    def call_with(self, params: dict, buffers: dict, batch: Any, other_buffers: dict | None = None) -> Any:
        """``fn(model, batch)`` with the model computing with ``params`` and ``buffers`` instead of its own."""
        tensors = {f"model.{k}": v for k, v in params.items()}
        tensors.update({f"model.{k}": v for k, v in buffers.items()})
        tensors.update(other_buffers or {})
        return torch.func.functional_call(self, tensors, (batch,))


class EagerGradients:
    def __init__(self, model, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str, trained: list[str]):
        self.model, self.loss_fn, self.amp_dtype, self.device_type = model, loss_fn, amp_dtype, device_type
        self.trained = trained
        self._slots: tuple[binding.ModuleBinding, list[Tensor]] | None = None  # (a binding, its trained slots)

    def _trained_slots(self, bound: binding.ModuleBinding) -> list[Tensor]:
        if self._slots is None or self._slots[0] is not bound:
            by_name = dict(zip(bound.param_names, bound.params))
            self._slots = (bound, [by_name[name] for name in self.trained])
        return self._slots[1]

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        slots = self._trained_slots(binding.bind(self.model, params, buffers))
        with autocast(self.device_type, self.amp_dtype):
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        grads = torch.autograd.grad(_scaled(loss, scale), slots, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, slots)]
        return dict(zip(self.trained, grads)), loss.detach(), logs


class FunctionalGradients:
    def __init__(self, model, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str, trained: list[str]):
        # torch.func.grad lets the loss update only tensors it receives: the buffers of the other modules the loss
        # uses (BatchNorm statistics in training mode) are passed in beside the model's
        self.loss_module = ModelFunction(model, loss_fn, modules_used_by(loss_fn, model))
        self.amp_dtype, self.device_type = amp_dtype, device_type
        self.trained = trained
        self.all_trained = len(trained) == len(list(model.parameters()))

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        trained = params if self.all_trained else {name: params[name] for name in self.trained}

        def loss_of(p, b, other_buffers):
            with autocast(self.device_type, self.amp_dtype):
                loss, logs = parse_loss(self.loss_module.call_with({**params, **p}, b, batch, other_buffers))
            return _scaled(loss, scale), (loss.detach(), logs)

        # grad differentiates inside; the no_grad outside keeps modules the loss closes over that require grad
        # (a discriminator, a teacher) from recording the step's arithmetic into an ever-growing graph
        with torch.no_grad():
            grads, (loss, logs) = torch.func.grad(loss_of, has_aux=True)(
                trained, buffers, self.loss_module.other_buffers()
            )
        return grads, loss, logs


class ShardedGradients:
    """FSDP2: the model already computes with the state's rows (they are its sharded parameters' storage); its
    backward hooks reduce-scatter the averaged gradients into each parameter's ``.grad``, taken (and cleared)
    here."""

    def __init__(self, model, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str, trained: list[str]):
        self.model, self.loss_fn, self.amp_dtype, self.device_type = model, loss_fn, amp_dtype, device_type
        self.trained = trained

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        with autocast(self.device_type, self.amp_dtype):
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        _scaled(loss, scale).backward()
        grads = {}
        for name in self.trained:
            param = self.model.get_parameter(name)
            grads[name] = torch.zeros_like(params[name]) if param.grad is None else param.grad.to_local()
            param.grad = None
        return grads, loss.detach(), logs
