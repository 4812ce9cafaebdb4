"""``torch.optim``'s per-coordinate adaptive optimizers: Adagrad, RMSprop, Adadelta, Adamax, NAdam, RAdam,
Adafactor. Same argument names and defaults as torch; each docstring gives the update for one parameter ``p``
with gradient ``g`` (negated first with ``maximize``; ``g <- g + wd p`` is L2 weight decay). Hyperparameters
typed ``Hyper`` may be 0-d tensors held by the state (`funceng.optim.inject_hyperparams`), so a schedule can
drive them."""

from __future__ import annotations

import math

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


def _filled(params: Params, value: float) -> dict[str, Tensor]:
    return {n: torch.full_like(p, value) for n, p in params.items()}


def adagrad(
    lr: Hyper = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: Hyper = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adagrad``: ``s <- s + g^2``; ``p <- p - lr / (1 + (t-1) lr_decay) * g / (sqrt(s) + eps)``."""

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "sum": _filled(params, initial_accumulator_value)}

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads, sums = prepare_gradients(updates, params, weight_decay, maximize), values(state["sum"])
        state["count"].add_(1)
        clr = lr / (1 + (state["count"].to(torch.float64) - 1) * lr_decay)
        torch._foreach_addcmul_(sums, grads, grads)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, eps)
        torch._foreach_div_(grads, std)
        torch._foreach_mul_(grads, -clr)
        return updates, state

    return GradientTransformation(init, update)


def rmsprop(
    lr: Hyper = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum: Hyper = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RMSprop``: ``v <- alpha v + (1-alpha) g^2``; centered: ``m <- lerp(m, g, 1-alpha)``,
    ``d = sqrt(v - m^2) + eps`` (else ``sqrt(v) + eps``); momentum: ``b <- momentum b + g / d``,
    ``p <- p - lr b``, else ``p <- p - lr g / d``."""
    with_momentum = arith.is_set(momentum)

    def init(params: Params) -> OptState:
        state = {"count": step_count(params), "square_avg": zeros(params)}
        if centered:
            state["grad_avg"] = zeros(params)
        if with_momentum:
            state["momentum_buffer"] = zeros(params)
        return state

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads, square_avg = prepare_gradients(updates, params, weight_decay, maximize), values(state["square_avg"])
        state["count"].add_(1)
        torch._foreach_mul_(square_avg, alpha)
        torch._foreach_addcmul_(square_avg, grads, grads, value=1 - alpha)
        if centered:
            grad_avg = values(state["grad_avg"])
            torch._foreach_lerp_(grad_avg, grads, 1 - alpha)
            avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avg)
        torch._foreach_add_(avg, eps)
        if with_momentum:
            buf = values(state["momentum_buffer"])
            torch._foreach_mul_(buf, momentum)
            torch._foreach_addcdiv_(buf, grads, avg)
            torch._foreach_copy_(grads, buf)
        else:
            torch._foreach_div_(grads, avg)
        torch._foreach_mul_(grads, -lr)
        return updates, state

    return GradientTransformation(init, update)


def adadelta(
    lr: Hyper = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: Hyper = 0.0, maximize: bool = False
) -> GradientTransformation:
    """``torch.optim.Adadelta``: ``v <- rho v + (1-rho) g^2``, ``d = sqrt(a + eps) / sqrt(v + eps) * g``,
    ``a <- rho a + (1-rho) d^2``, ``p <- p - lr d``."""

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "square_avg": zeros(params), "acc_delta": zeros(params)}

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads = prepare_gradients(updates, params, weight_decay, maximize)
        square_avg, acc_delta = values(state["square_avg"]), values(state["acc_delta"])
        state["count"].add_(1)
        torch._foreach_mul_(square_avg, rho)
        torch._foreach_addcmul_(square_avg, grads, grads, value=1 - rho)
        std = torch._foreach_add(square_avg, eps)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(acc_delta, eps)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(acc_delta, rho)
        torch._foreach_addcmul_(acc_delta, delta, delta, value=1 - rho)
        torch._foreach_copy_(grads, delta)
        torch._foreach_mul_(grads, -lr)
        return updates, state

    return GradientTransformation(init, update)


def adamax(
    lr: Hyper = 2e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adamax``: ``m <- lerp(m, g, 1-b1)``, ``u <- max(b2 u, |g| + eps)``,
    ``p <- p - lr / (1 - b1^t) * m / u``."""
    b1, b2 = betas

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "exp_avg": zeros(params), "exp_inf": zeros(params)}

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads = prepare_gradients(updates, params, weight_decay, maximize)
        exp_avg, exp_inf = values(state["exp_avg"]), values(state["exp_inf"])
        state["count"].add_(1)
        arith.lerp_(exp_avg, grads, 1 - b1)
        torch._foreach_mul_(exp_inf, b2)
        torch._foreach_abs_(grads)
        torch._foreach_add_(grads, eps)
        torch._foreach_maximum_(exp_inf, grads)
        clr = lr / (1 - torch.pow(b1, state["count"].to(torch.float64)))
        torch._foreach_copy_(grads, exp_avg)
        torch._foreach_div_(grads, exp_inf)
        torch._foreach_mul_(grads, -clr)
        return updates, state

    return GradientTransformation(init, update)


def nadam(
    lr: Hyper = 2e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.NAdam``: ``mu_t = b1 (1 - 0.96^(t psi) / 2)``, ``P <- P mu_t``; Adam's moments;
    ``d = sqrt(v / (1 - b2^t)) + eps``; ``p <- p - lr (1-mu_t)/(1-P) g/d - lr mu_{t+1}/(1 - P mu_{t+1}) m/d``
    (with ``decoupled_weight_decay``, first ``p <- p (1 - lr wd)``)."""
    b1, b2 = betas

    def init(params: Params) -> OptState:
        like = first_param(params)
        return {
            "count": step_count(params),
            "mu_product": scalar(1.0, like, torch_scalar_dtype()),  # torch's dtype, so its rounding too
            "exp_avg": zeros(params),
            "exp_avg_sq": zeros(params),
        }

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        decay = weight_decay if not decoupled_weight_decay else 0.0
        grads = prepare_gradients(updates, params, decay, maximize)
        exp_avg, exp_avg_sq = values(state["exp_avg"]), values(state["exp_avg_sq"])
        state["count"].add_(1)
        t = state["count"].to(torch.float64)
        bias_correction2 = 1 - torch.pow(b2, t)
        mu = b1 * (1.0 - 0.5 * torch.pow(0.96, t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * torch.pow(0.96, (t + 1) * momentum_decay))
        state["mu_product"].mul_(mu.to(state["mu_product"].dtype))
        mu_product = state["mu_product"].to(torch.float64)
        arith.update_moments_(exp_avg, exp_avg_sq, grads, b1, b2)
        denom = torch._foreach_div(exp_avg_sq, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        avg_coef = -lr * mu_next / (1.0 - mu_product * mu_next)
        step = torch._foreach_div(exp_avg, denom)
        torch._foreach_mul_(step, avg_coef)
        torch._foreach_div_(grads, denom)
        torch._foreach_mul_(grads, grad_coef)
        torch._foreach_add_(grads, step)
        if decoupled_weight_decay and arith.is_set(weight_decay):
            arith.add_(grads, [params[n] for n in updates], -lr * weight_decay)
        return updates, state

    return GradientTransformation(init, update)


def radam(
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RAdam``: Adam's moments; ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``; where ``rho_t > 5``,
    ``p <- p - lr m/(1-b1^t) * r_t sqrt(1-b2^t) / (sqrt(v) + eps)`` with the rectification ``r_t``, else
    ``p <- p - lr m/(1-b1^t)`` (branchless: chosen with ``torch.where``)."""
    b1, b2 = betas

    def init(params: Params) -> OptState:
        return {"count": step_count(params), "exp_avg": zeros(params), "exp_avg_sq": zeros(params)}

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        decay = weight_decay if not decoupled_weight_decay else 0.0
        grads = prepare_gradients(updates, params, decay, maximize)
        exp_avg, exp_avg_sq = values(state["exp_avg"]), values(state["exp_avg_sq"])
        state["count"].add_(1)
        t = state["count"].to(torch.float64)
        arith.update_moments_(exp_avg, exp_avg_sq, grads, b1, b2)
        bias_correction1 = 1 - torch.pow(b1, t)
        bias_correction2 = 1 - torch.pow(b2, t)
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * torch.pow(b2, t) / bias_correction2
        rectified = rho_t > 5.0
        rect = torch.sqrt(
            torch.clamp((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), min=0)
        )
        # adaptive = sqrt(1 - b2^t) / (sqrt(v) + eps) where rectified; the factor is 1 elsewhere
        adaptive = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(adaptive, eps)
        torch._foreach_reciprocal_(adaptive)
        torch._foreach_mul_(adaptive, torch.where(rectified, torch.sqrt(bias_correction2) * rect, 0.0))
        torch._foreach_add_(adaptive, torch.where(rectified, 0.0, 1.0))
        torch._foreach_copy_(grads, exp_avg)
        torch._foreach_div_(grads, bias_correction1)
        torch._foreach_mul_(grads, adaptive)
        torch._foreach_mul_(grads, -lr)
        if decoupled_weight_decay and arith.is_set(weight_decay):
            arith.add_(grads, [params[n] for n in updates], -lr * weight_decay)
        return updates, state

    return GradientTransformation(init, update)


def adafactor(
    lr: Hyper = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: Hyper = 0.0,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adafactor``: factored second moments (row and column means of ``g^2`` for a matrix, a full
    one for a vector) with ``beta2_t = 1 - t^beta2_decay``; relative step ``alpha = max(eps2, rms(p)) *
    min(lr, 1/sqrt(t))``; update ``g / sqrt(v)`` clipped to RMS ``d``; decoupled weight decay. Its matrix
    products are per parameter (a loop over parameters, as torch's)."""
    eps1, eps2 = eps

    def init(params: Params) -> OptState:
        state: OptState = {"count": step_count(params), "row_var": {}, "col_var": {}, "variance": {}}
        for name, p in params.items():
            if p.dim() > 1:
                state["row_var"][name] = p.new_zeros((*p.shape[:-1], 1))
                state["col_var"][name] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
            else:
                state["variance"][name] = torch.zeros_like(p)
        return state

    def update(updates: Updates, state: OptState, params: Params):
        if not updates:
            return updates, state
        grads = values(updates)
        if maximize:
            torch._foreach_neg_(grads)
        state["count"].add_(1)
        t = state["count"].to(torch.float64)
        one_minus_beta2 = torch.pow(t, beta2_decay)
        rho = torch.clamp(1 / torch.sqrt(t), max=lr)
        decay = lr * weight_decay if arith.is_set(weight_decay) else None
        for name, g in updates.items():
            p = params[name]
            floor = eps1 if eps1 is not None else torch.finfo(p.dtype).eps
            alpha = torch.clamp(torch.linalg.vector_norm(p) / math.sqrt(p.numel()), min=eps2) * rho
            if p.dim() > 1:
                row_var, col_var = state["row_var"][name], state["col_var"][name]
                weight = one_minus_beta2.to(g.dtype)
                row_var.lerp_(torch.linalg.vector_norm(g, dim=-1, keepdim=True).square_().div_(g.size(-1)), weight)
                col_var.lerp_(torch.linalg.vector_norm(g, dim=-2, keepdim=True).square_().div_(g.size(-2)), weight)
                estimate = row_var @ col_var
                estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=floor))
            else:
                variance = state["variance"][name]
                variance.lerp_(g * g, one_minus_beta2.to(g.dtype))
                estimate = variance.clone()
            step = estimate.clamp_(min=floor * floor).rsqrt_().mul_(g)
            denom = torch.clamp(torch.linalg.vector_norm(step) / (math.sqrt(step.numel()) * d), min=1.0)
            g.copy_(step.mul_(-alpha / denom))
            if decay is not None:  # decoupled: p <- p (1 - lr wd) before the step
                g.sub_(p * decay)
        return updates, state

    return GradientTransformation(init, update)
