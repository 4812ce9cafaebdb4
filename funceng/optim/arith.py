"""Foreach arithmetic whose coefficient is a Python number or a 0-d tensor (a hyperparameter the state holds,
`funceng.optim.hyperparams`). A number takes torch's fused ``alpha=``/``value=`` forms; a tensor, which those
forms do not accept, takes one more pass (no host sync either way)."""

from __future__ import annotations

import torch
from torch import Tensor

Coefficient = float | Tensor


def is_set(value: Coefficient) -> bool:
    """Whether a hyperparameter may be non-zero: a tensor always may (its value changes between steps)."""
    return isinstance(value, Tensor) or value != 0


def add_(xs: list[Tensor], ys: list[Tensor], alpha: Coefficient = 1.0) -> None:
    """``x <- x + alpha * y``."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
    else:
        torch._foreach_add_(xs, ys, alpha=alpha)


def lerp_(xs: list[Tensor], ys: list[Tensor], weight: Coefficient) -> None:
    """``x <- x + weight * (y - x)``."""
    if isinstance(weight, Tensor):
        diff = torch._foreach_sub(ys, xs)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(xs, diff)
    else:
        torch._foreach_lerp_(xs, ys, weight)


def addcmul_(xs: list[Tensor], a: list[Tensor], b: list[Tensor], value: Coefficient = 1.0) -> None:
    """``x <- x + value * a * b``."""
    if isinstance(value, Tensor):
        torch._foreach_addcmul_(xs, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcmul_(xs, a, b, value=value)


def addcdiv_(xs: list[Tensor], a: list[Tensor], b: list[Tensor], value: Coefficient = 1.0) -> None:
    """``x <- x + value * a / b``."""
    if isinstance(value, Tensor):
        torch._foreach_addcdiv_(xs, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcdiv_(xs, a, b, value=value)


def update_moments_(
    exp_avg: list[Tensor], exp_avg_sq: list[Tensor], grads: list[Tensor], b1: Coefficient, b2: Coefficient
) -> None:
    """Adam's moment estimates: ``m <- m + (1-b1)(g - m)``, ``v <- b2 v + (1-b2) g^2``."""
    lerp_(exp_avg, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sq, b2)
    addcmul_(exp_avg_sq, grads, grads, 1 - b2)
