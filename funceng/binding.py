"""Pointing a module's parameters and buffers at a state's tensors, without copying."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ModuleBinding:
    """The parameter and buffer slots of ``model`` in the order of the given names.

    ``bind`` makes the module compute with the given tensors: parameters share their storage
    (``p.data = t``), buffers are the tensors themselves, so a forward pass updates BatchNorm statistics in the
    state. Re-binding the same tensors again is a cheap identity check.
    """

    def __init__(self, model: nn.Module, param_names: list[str], buffer_names: list[str]):
        self.params = [model.get_parameter(name) for name in param_names]
        self.buffer_slots = []
        for name in buffer_names:
            owner, _, attr = name.rpartition(".")
            self.buffer_slots.append((model.get_submodule(owner), attr))
        self._bound: tuple[list[Tensor], list[Tensor]] = ([], [])

    def bind(self, params: list[Tensor], buffers: list[Tensor]) -> None:
        bound_params, bound_buffers = self._bound
        if not _same(bound_params, params):
            with torch.no_grad():
                for slot, tensor in zip(self.params, params, strict=True):
                    slot.data = tensor
        if not _same(bound_buffers, buffers):
            for (module, attr), tensor in zip(self.buffer_slots, buffers, strict=True):
                module._buffers[attr] = tensor
        self._bound = (params, buffers)


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
