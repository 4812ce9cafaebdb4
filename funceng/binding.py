"""The model bound to a state: a module's parameters and buffers pointed at a state's tensors, without copying.

A bound model computes with the state's tensors: parameters share their storage (``p.data = t``) and buffers
are the state's tensors themselves, so an eager forward pass updates BatchNorm statistics in the state. After a
compiled step (which never touches the module) `bind` makes ``model`` reflect the state again.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn


class ModuleBinding:
    """The parameter and buffer slots of ``model`` for the given names, in that order."""

    def __init__(self, model: nn.Module, param_names: list[str], buffer_names: list[str]):
        self.param_names, self.buffer_names = tuple(param_names), tuple(buffer_names)
        self.params = [model.get_parameter(name) for name in param_names]
        self.buffer_slots = []
        for name in buffer_names:
            owner, _, attr = name.rpartition(".")
            self.buffer_slots.append((model.get_submodule(owner), attr))
        self._bound: tuple[list[Tensor], list[Tensor]] = ([], [])

    def bind(self, params: list[Tensor], buffers: list[Tensor]) -> None:
        """Points the slots at ``params`` and ``buffers``; binding the same tensors again is an identity check."""
        bound_params, bound_buffers = self._bound
        if not _same(bound_params, params):
            with torch.no_grad():
                for slot, tensor in zip(self.params, params, strict=True):
                    slot.data = tensor
        if not _same(bound_buffers, buffers):
            for (module, attr), tensor in zip(self.buffer_slots, buffers, strict=True):
                module._buffers[attr] = tensor
        self._bound = (params, buffers)


_bindings: weakref.WeakKeyDictionary[nn.Module, ModuleBinding] = weakref.WeakKeyDictionary()


def bind(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> ModuleBinding:
    """Makes ``model`` compute with ``params`` and ``buffers`` (keyed by ``named_parameters`` and
    ``named_buffers`` names, as dicts or TensorDicts); returns the model's binding, whose ``params`` are the
    slots to differentiate."""
    param_names, buffer_names = tuple(params.keys()), tuple(buffers.keys())
    binding = _bindings.get(model)
    if binding is None or binding.param_names != param_names or binding.buffer_names != buffer_names:
        binding = _bindings[model] = ModuleBinding(model, list(param_names), list(buffer_names))
    binding.bind(list(params.values()), list(buffers.values()))
    return binding


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
