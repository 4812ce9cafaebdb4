"""Building blocks of the optimizers; each docstring states the math for one parameter ``p``, update ``u``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from funceng import dist
from funceng.optim import arith
from funceng.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    first_param,
    scalar,
    values,
    zeros_like,
)

Schedule = Callable[[Tensor], Tensor]
ScalarOrSchedule = float | Schedule


def add_decayed_weights(weight_decay: float | Tensor) -> GradientTransformation:
    """``u <- u + weight_decay * p`` (L2 regularisation as ``torch.optim``'s ``weight_decay``)."""

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params):
        if arith.is_set(weight_decay) and updates:
            arith.add_(values(updates), [params[n] for n in updates], weight_decay)
        return updates, state

    return GradientTransformation(init, update)


def trace(momentum: float | Tensor, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum as in ``torch.optim.SGD``.

    ``b <- momentum * b + (1 - dampening) * u`` (``b <- u`` on the first step), then ``u <- u + momentum * b``
    with Nesterov, else ``u <- b``.
    """
    if nesterov and ((not isinstance(momentum, Tensor) and momentum <= 0) or dampening != 0):
        raise ValueError("Nesterov momentum requires momentum > 0 and dampening == 0")

    def init(params: Params) -> OptState:
        state = {"momentum_buffer": zeros_like(params)}
        if dampening:
            state["count"] = scalar(0, first_param(params), torch.int64)
        return state

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if not updates:
            return updates, state
        grads, bufs = values(updates), values(state["momentum_buffer"])
        if dampening:
            # The buffer starts at zero, so an undamped first step gives b = u exactly, as torch's clone.
            count = state["count"]
            torch._foreach_mul_(grads, 1.0 - dampening * (count != 0).to(torch.float64))
            count.add_(1)
        if nesterov:  # u + momentum * b needs u after b is updated
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            arith.add_(grads, bufs, momentum)
        elif isinstance(momentum, Tensor):  # a scheduled momentum: b <- momentum * b + u in place, no temporary
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            torch._foreach_copy_(grads, bufs)
        else:  # b <- momentum * b + u, computed in the gradients' storage: two passes over memory, not three
            torch._foreach_add_(grads, bufs, alpha=momentum)
            torch._foreach_copy_(bufs, grads)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_adam(
    b1: float | Tensor = 0.9, b2: float | Tensor = 0.999, eps: float = 1e-8, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's moment estimates, as ``torch.optim.Adam``.

    ``m <- b1 m + (1-b1) u``, ``v <- b2 v + (1-b2) u^2``, ``t <- t + 1``,
    ``u <- (m / (1 - b1^t)) / (sqrt(v') / sqrt(1 - b2^t) + eps)`` with ``v' = v``, or with ``amsgrad`` the
    running maximum ``v' <- max(v', v)``.
    """

    def init(params: Params) -> OptState:
        state = {
            "count": scalar(0, first_param(params), torch.int64),
            "exp_avg": zeros_like(params),
            "exp_avg_sq": zeros_like(params),
        }
        if amsgrad:
            state["max_exp_avg_sq"] = zeros_like(params)
        return state

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if not updates:
            return updates, state
        count = state["count"]
        count.add_(1)
        grads, mu, nu = values(updates), values(state["exp_avg"]), values(state["exp_avg_sq"])
        arith.update_moments_(mu, nu, grads, b1, b2)
        t = count.to(torch.float64)
        bias_correction1 = 1 - torch.pow(b1, t)
        bias_correction2_sqrt = torch.sqrt(1 - torch.pow(b2, t))
        if amsgrad:
            torch._foreach_maximum_(values(state["max_exp_avg_sq"]), nu)
            nu = values(state["max_exp_avg_sq"])
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_copy_(grads, mu)  # the gradients are consumed: reuse their storage for the update
        torch._foreach_div_(grads, bias_correction1)
        torch._foreach_div_(grads, denom)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """``u <- -lr * u``.

    A float ``lr`` is kept in the state as a tensor (``state["lr"]``) that may be overwritten between steps;
    a schedule is evaluated at the state's ``count`` of updates on every step (``lr = schedule(count)``).
    Either way a new value never triggers a recompilation.
    """
    is_schedule = callable(learning_rate)
    if isinstance(learning_rate, Tensor):  # held by the caller's state (`funceng.optim.inject_hyperparams`)
        return _scale_by_tensor(learning_rate)

    def init(params: Params) -> OptState:
        like = first_param(params)
        if is_schedule:
            count = scalar(0, like, torch.int64)
            return {"count": count, "lr": scalar(learning_rate(count), like)}
        return {"lr": scalar(learning_rate, like)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        lr = state["lr"]
        if is_schedule:
            lr.copy_(learning_rate(state["count"]))
            state["count"].add_(1)
        if updates:
            torch._foreach_mul_(values(updates), -lr)
        return updates, state

    return GradientTransformation(init, update)


def _scale_by_tensor(lr: Tensor) -> GradientTransformation:
    def update(updates: Updates, state: OptState, params: Params | None = None):
        if updates:
            torch._foreach_mul_(values(updates), -lr)
        return updates, state

    return GradientTransformation(lambda params: {}, update)


def clip_by_global_norm(max_norm: float, eps: float = 1e-6, across_ranks: bool = False) -> GradientTransformation:
    """``u <- u * min(1, max_norm / (||u||_2 + eps))`` over all leaves, as ``torch.nn.utils.clip_grad_norm_``.

    The norm before clipping is kept in ``state["grad_norm"]`` for logging. ``across_ranks``: each rank holds
    some rows of the gradient (a sharded model), so ``||u||^2`` is the sum over ranks of the local ones.
    """

    def init(params: Params) -> OptState:
        return {"grad_norm": scalar(0.0, first_param(params), torch.float32)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if not updates:
            return updates, state
        grads = values(updates)
        if across_ranks:
            local = torch.stack(torch._foreach_norm(grads)).square().sum()
            total = (dist.mean_across_ranks([local])[0] * dist.get_world_size()).sqrt()
        else:
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + eps), max=1.0))
        state["grad_norm"].copy_(total)
        return updates, state

    return GradientTransformation(init, update)


def clip_by_value(clip_value: float) -> GradientTransformation:
    """``u <- clamp(u, -clip_value, clip_value)``, as ``torch.nn.utils.clip_grad_value_``."""

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if updates:
            torch._foreach_clamp_min_(values(updates), -clip_value)
            torch._foreach_clamp_max_(values(updates), clip_value)
        return updates, state

    return GradientTransformation(init, update)


def negate() -> GradientTransformation:
    """``u <- -u``: ascend instead of descend (``torch.optim``'s ``maximize=True``)."""

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if updates:
            torch._foreach_neg_(values(updates))
        return updates, state

    return GradientTransformation(lambda params: {}, update)


def set_to_zero() -> GradientTransformation:
    """``u <- -0.0``: no update, no state (optax's ``set_to_zero``). The zero is negative so that ``p + u`` is
    ``p`` bit for bit, ``-0.0`` weights included; use it for parameters that must stay exactly as they are."""

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if updates:
            torch._foreach_zero_(values(updates))
            torch._foreach_neg_(values(updates))
        return updates, state

    return GradientTransformation(init, update)
