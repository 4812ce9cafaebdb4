"""Whether many tensors are finite, found with one foreach max-norm per dtype and no Python op per tensor.

The max-norm of a tensor is infinite or NaN exactly when one of its elements is (it cannot overflow, unlike a
sum of squares), so a list of tensors needs one ``torch._foreach_norm(tensors, inf)`` per dtype and one
``isfinite``. The result is a tensor: reading it is the caller's choice of when to sync.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """A bool tensor with one entry per tensor of ``tensors``: whether all its elements are finite (integer and
    bool tensors always are)."""
    flags = torch.ones(len(tensors), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.numel():
            by_dtype.setdefault(t.dtype, []).append(i)
    for indices in by_dtype.values():
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in indices], math.inf))
        flags[torch.tensor(indices, device=flags.device)] = norms.isfinite()
    return flags


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether every element of every tensor of ``tensors`` is finite."""
    return finite_flags(tensors).all()


def first_nonfinite(state: Any) -> str | None:
    """The key path (``"params/fc.weight"``) of the first parameter or buffer of a TrainState that holds a NaN or
    an infinity, or ``None`` (one host sync)."""
    parts = [part for part in ("params", "buffers") if part in state.keys()]
    named = [(f"{part}/{name}", t) for part in parts for name, t in state[part].items()]
    if not named:
        return None
    flags = finite_flags([t for _, t in named]).tolist()
    return None if all(flags) else named[flags.index(False)][0]
