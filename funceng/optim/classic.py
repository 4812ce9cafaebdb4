"""``torch.optim``'s Rprop (sign-based steps), ASGD (averaged SGD) and SparseAdam (lazy Adam), with torch's
argument names and defaults.
Each docstring gives the update for one parameter ``p`` with gradient ``g`` (negated first with ``maximize``)."""

from __future__ import annotations

import torch
from torch import Tensor

from funceng.optim import arith
from funceng.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    first_param,
    prepare_gradients,
    scalar,
    step_count,
    torch_scalar_dtype,
    values,
)
from funceng.optim.base import zeros_like as zeros

Hyper = float | Tensor


def rprop(
    lr: Hyper = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50),
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Rprop``: per coordinate, ``s <- clamp(s * f, *step_sizes)`` with ``f = etas[1]`` where ``g``
    kept its sign since the last step, ``etas[0]`` where it flipped (and then ``g <- 0``), else 1;
    ``p <- p - sign(g) s``; the previous gradient is kept. ``s`` starts at ``lr`` (later lr values do not
    change it, as in torch: it is the lr of the first step)."""
    eta_minus, eta_plus = etas
    low, high = step_sizes

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "prev": zeros(params), "step_size": zeros(params)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if not updates:
            return updates, state
        grads = prepare_gradients(updates, params, maximize=maximize)
        prev, step_size = values(state["prev"]), values(state["step_size"])
        torch._foreach_add_(step_size, (state["count"] == 0).to(torch.float64) * lr)  # s <- lr on the first step
        state["count"].add_(1)
        sign = torch._foreach_mul(grads, prev)
        torch._foreach_sign_(sign)
        kept = torch._foreach_clamp_min(sign, 0.0)  # 1 where the sign was kept, else 0
        flipped = torch._foreach_clamp_max(sign, 0.0)  # -1 where it flipped, else 0
        factor = torch._foreach_mul(kept, eta_plus - 1)
        torch._foreach_add_(factor, flipped, alpha=1 - eta_minus)
        torch._foreach_add_(factor, 1.0)
        torch._foreach_mul_(step_size, factor)
        torch._foreach_clamp_min_(step_size, low)
        torch._foreach_clamp_max_(step_size, high)
        torch._foreach_add_(flipped, 1.0)  # 0 where it flipped: that gradient counts as 0
        torch._foreach_mul_(grads, flipped)
        torch._foreach_copy_(prev, grads)
        torch._foreach_sign_(grads)
        torch._foreach_mul_(grads, step_size)
        torch._foreach_neg_(grads)
        return updates, state

    return GradientTransformation(init, update)


def asgd(
    lr: Hyper = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.ASGD``: ``p <- p (1 - lambd eta) - eta g``; the average ``ax <- ax + mu (p - ax)``;
    then ``eta <- lr / (1 + lambd lr t)^alpha`` and ``mu <- 1 / max(1, t - t0)`` for the next step. The average
    is ``state["ax"]``; ``eta`` starts at the first step's ``lr``. ``eta`` and ``mu`` are kept in torch's scalar
    dtype (float32 unless the default dtype is float64), so the numbers are torch's."""

    def init(params: Params) -> OptState:
        like = first_param(params)
        return {
            "count": scalar(0, like, torch.int64),
            "eta": scalar(0.0, like, torch_scalar_dtype()),
            "mu": scalar(1.0, like, torch_scalar_dtype()),
            "ax": zeros(params),
        }

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads = prepare_gradients(updates, params, maximize=maximize)
        weights = [params[n] for n in updates]
        if arith.is_set(weight_decay):
            arith.add_(grads, weights, weight_decay)
        first = state["count"] == 0
        state["eta"].copy_(torch.where(first, lr, state["eta"]))
        eta, mu = state["eta"].to(torch.float64), state["mu"].to(torch.float64)
        state["count"].add_(1)
        # u = -lambd eta p - eta g
        torch._foreach_mul_(grads, -eta)
        torch._foreach_add_(grads, torch._foreach_mul(weights, -lambd * eta))
        new_weights = torch._foreach_add(weights, grads)
        arith.lerp_(values(state["ax"]), new_weights, mu)
        t = state["count"].to(torch.float64)
        state["eta"].copy_(lr / torch.pow(1 + lambd * lr * t, alpha))
        state["mu"].copy_(1 / torch.clamp(t - t0, min=1.0))
        return updates, state

    return GradientTransformation(init, update)


def sparse_adam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SparseAdam`` (lazy Adam): Adam's moments and step at the entries where the gradient is
    present, the others untouched. funceng's gradients are dense, so "present" means non-zero: where torch's
    sparse gradient (an ``nn.Embedding(sparse=True)``'s) stores an explicit zero, funceng skips the entry."""
    b1, b2 = betas

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "exp_avg": zeros(params), "exp_avg_sq": zeros(params)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if not updates:
            return updates, state
        grads = prepare_gradients(updates, params, maximize=maximize)
        exp_avg, exp_avg_sq = values(state["exp_avg"]), values(state["exp_avg_sq"])
        present = [(g != 0).to(g.dtype) for g in grads]
        state["count"].add_(1)
        t = state["count"].to(torch.float64)
        delta = torch._foreach_sub(grads, exp_avg)  # m <- m + (1-b1)(g - m) where present
        torch._foreach_mul_(delta, 1 - b1)
        torch._foreach_mul_(delta, present)
        torch._foreach_add_(exp_avg, delta)
        delta = torch._foreach_mul(grads, grads)  # v <- v + (1-b2)(g^2 - v) where present
        torch._foreach_sub_(delta, exp_avg_sq)
        torch._foreach_mul_(delta, 1 - b2)
        torch._foreach_mul_(delta, present)
        torch._foreach_add_(exp_avg_sq, delta)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, eps)
        step_size = lr * torch.sqrt(1 - torch.pow(b2, t)) / (1 - torch.pow(b1, t))
        torch._foreach_copy_(grads, exp_avg)
        torch._foreach_div_(grads, denom)
        torch._foreach_mul_(grads, present)
        torch._foreach_mul_(grads, -step_size)
        return updates, state

    return GradientTransformation(init, update)
