"""Gradients of the loss with respect to a state's parameters, computed one of three ways.

Each is a callable ``grads_fn(params, buffers, batch, scale) -> (grads, loss, logs)``: ``grads`` keyed like
``params`` (zeros for parameters the loss does not use), the unscaled ``loss`` and the logged values, all
detached. ``scale`` (fp16 loss scaling) multiplies the loss before differentiation, or is ``None``.

- `EagerGradients`: the model bound to the state's tensors and ``torch.autograd.grad``; as fast as a
  hand-written loop.
- `FunctionalGradients`: ``torch.func.grad`` over ``torch.func.functional_call``; traces into one compiled graph.
- `ShardedGradients`: FSDP2's own backward, whose hooks reduce-scatter the averaged gradients.
"""

from __future__ import annotations

import contextlib
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


class ModelFunction(nn.Module):
    """``fn(model, batch)`` as a module, so ``torch.func.functional_call`` can swap the model's tensors."""

    def __init__(self, model: nn.Module, fn: LossFn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)

    def call_with(self, params: dict[str, Tensor], buffers: dict[str, Tensor], batch: Any) -> Any:
        """``fn(model, batch)`` with the model computing with ``params`` and ``buffers`` instead of its own."""
        tensors = {f"model.{k}": v for k, v in params.items()}
        tensors.update({f"model.{k}": v for k, v in buffers.items()})
        return torch.func.functional_call(self, tensors, (batch,))


class EagerGradients:
    def __init__(self, model: nn.Module, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str):
        self.model, self.loss_fn, self.amp_dtype, self.device_type = model, loss_fn, amp_dtype, device_type

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        slots = binding.bind(self.model, params, buffers).params
        with autocast(self.device_type, self.amp_dtype):
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        grads = torch.autograd.grad(_scaled(loss, scale), slots, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())]
        return dict(zip(params, grads)), loss.detach(), logs


class FunctionalGradients:
    def __init__(self, model: nn.Module, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str):
        self.loss_module = ModelFunction(model, loss_fn)
        self.amp_dtype, self.device_type = amp_dtype, device_type

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        def loss_of(p, b):
            with autocast(self.device_type, self.amp_dtype):
                loss, logs = parse_loss(self.loss_module.call_with(p, b, batch))
            return _scaled(loss, scale), (loss.detach(), logs)

        grads, (loss, logs) = torch.func.grad(loss_of, has_aux=True)(params, buffers)
        return grads, loss, logs


class ShardedGradients:
    """FSDP2: the model already computes with the state's rows (they are its sharded parameters' storage); its
    backward hooks reduce-scatter the averaged gradients into each parameter's ``.grad``, taken (and cleared)
    here."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, amp_dtype: torch.dtype | None, device_type: str):
        self.model, self.loss_fn, self.amp_dtype, self.device_type = model, loss_fn, amp_dtype, device_type

    def __call__(self, params: dict, buffers: dict, batch: Any, scale: Tensor | None) -> Grads:
        with autocast(self.device_type, self.amp_dtype):
            loss, logs = parse_loss(self.loss_fn(self.model, batch))
        _scaled(loss, scale).backward()
        grads = {}
        for (name, param), local in zip(self.model.named_parameters(), params.values()):
            grads[name] = torch.zeros_like(local) if param.grad is None else param.grad.to_local()
            param.grad = None
        return grads, loss.detach(), logs
