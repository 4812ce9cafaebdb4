"""``torch.optim``-compatible optimizers built by chaining transforms (same argument names and defaults)."""

from __future__ import annotations

from funceng.optim.base import GradientTransformation, chain
from funceng.optim.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.SGD``: ``u <- g + wd p``; momentum ``trace``; ``p <- p - lr u``."""
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, dampening, nesterov))
    elif nesterov:
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening == 0")
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.Adam``: L2 ``u <- g + wd p`` before the moments; ``p <- p - lr adam(u)``."""
    parts = [add_decayed_weights(weight_decay)] if weight_decay else []
    parts += [scale_by_adam(*betas, eps), scale_by_learning_rate(lr)]
    return chain(*parts)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """``torch.optim.AdamW``: decoupled decay, ``p <- p - lr (adam(g) + wd p)``."""
    parts = [scale_by_adam(*betas, eps)]
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts.append(scale_by_learning_rate(lr))
    return chain(*parts)
