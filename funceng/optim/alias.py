"""``torch.optim``-compatible optimizers built by chaining transforms (same argument names and defaults)."""

from __future__ import annotations

from torch import Tensor

from funceng.optim.arith import is_set
from funceng.optim.base import GradientTransformation, chain
from funceng.optim.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    negate,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

Hyper = float | Tensor  # a tensor when the state holds it (`funceng.optim.inject_hyperparams`)


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: Hyper = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD``: ``u <- g + wd p`` (``-g`` with ``maximize``); momentum ``trace``; ``p <- p - lr u``."""
    parts = [negate()] if maximize else []
    if is_set(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    if is_set(momentum):
        parts.append(trace(momentum, dampening, nesterov))
    elif nesterov:
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening == 0")
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam``: L2 ``u <- g + wd p`` before the moments; ``p <- p - lr adam(u)``.
    ``decoupled_weight_decay=True`` is `adamw`."""
    if decoupled_weight_decay:
        return adamw(lr, betas, eps, weight_decay, amsgrad, maximize)
    parts = [negate()] if maximize else []
    if is_set(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts += [scale_by_adam(*betas, eps, amsgrad=amsgrad), scale_by_learning_rate(lr)]
    return chain(*parts)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.AdamW``: decoupled decay, ``p <- p - lr (adam(g) + wd p)``."""
    parts = [negate()] if maximize else []
    parts.append(scale_by_adam(*betas, eps, amsgrad=amsgrad))
    if is_set(weight_decay):
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
