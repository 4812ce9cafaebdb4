"""``torch.optim.Muon``: momentum orthogonalised by a Newton-Schulz iteration, for 2-D weight matrices."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from funceng.optim.base import GradientTransformation, OptState, Params, Updates, zeros_like

# torch's defaults (torch.optim._muon)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


def orthogonalize(matrix: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The quintic Newton-Schulz iteration in bfloat16, as torch's ``_zeropower_via_newtonschulz``: about
    ``U V^T`` of ``matrix = U S V^T``."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.bfloat16()
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    return 1.0


def muon(
    lr: float | Tensor = 1e-3,
    weight_decay: float | Tensor = 0.1,
    momentum: float | Tensor = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = EPS,
    ns_steps: int = NS_STEPS,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """``b <- lerp(b, g, 1-momentum)``; ``o = orthogonalize(lerp(g, b, momentum))`` with Nesterov, else of ``b``;
    ``p <- p (1 - lr wd) - lr * ratio(shape) * o``. Every parameter must be a matrix (use another optimizer for
    the others, e.g. with `funceng.optim.partition`). The orthogonalisation is per parameter."""
    if ns_steps >= 100:
        raise ValueError("Muon: ns_steps must be below 100")

    def init(params: Params) -> OptState:
        for name, p in params.items():
            if p.ndim != 2:
                raise ValueError(
                    f"Muon updates 2-D parameters only; {name!r} has shape {tuple(p.shape)} (give it to another "
                    "optimizer with funceng.optim.partition)"
                )
        return {"momentum_buffer": zeros_like(params)}

    def update(updates: Updates, state: OptState, params: Params):
        for name, g in updates.items():
            buf, p = state["momentum_buffer"][name], params[name]
            keep = momentum.to(g.dtype) if isinstance(momentum, Tensor) else momentum  # a scheduled momentum
            buf.lerp_(g, 1 - keep)
            direction = g.lerp(buf, keep) if nesterov else buf
            ortho = orthogonalize(direction, ns_coefficients, ns_steps, eps)
            g.copy_(ortho.to(g.dtype) * (-lr * _lr_ratio(adjust_lr_fn, p.shape)))
            g.sub_(p * (lr * weight_decay))
        return updates, state

    return GradientTransformation(init, update)
