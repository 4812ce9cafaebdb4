"""MMEngine's ``param_scheduler`` dicts as one learning-rate schedule: a pure function of the optimizer's update
count, evaluated inside the train step (see `funceng.schedules` for the curves themselves).

Each scheduler acts on ``[begin, end)``, in epochs when ``by_epoch`` (taking its value at epoch starts unless
``convert_to_iter_based``) or in iterations, and holds its last value after ``end``; active schedulers multiply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from funceng import schedules
from funceng.errors import ConfigError, check_keys
from funceng.registry import PARAM_SCHEDULERS as SCHEDULERS
from funceng.registry import keyword_parameters, type_name
from funceng.runner import compat

INF = 10**12
COMMON_KEYS = {"type", "begin", "end", "by_epoch", "convert_to_iter_based", "last_step", "verbose"}


@dataclass(frozen=True)
class Span:
    """Where one scheduler acts: the optimizer's base lr, its length in its own steps, and iterations per step
    of a scheduler counted in epochs but converted to iterations (else 1)."""

    base_lr: float
    length: int
    scale: int


@SCHEDULERS.register(name="ConstantLR")
def constant_lr(span: Span, factor: float = 1 / 3):
    return schedules.constant_factor(1.0, factor, span.length - 1)


@SCHEDULERS.register(name="LinearLR")
def linear_lr(span: Span, start_factor: float = 1 / 3, end_factor: float = 1.0):
    return schedules.linear(1.0, start_factor, end_factor, span.length - 1)


@SCHEDULERS.register(name="StepLR")
def step_lr(span: Span, step_size: int, gamma: float = 0.1):
    return schedules.step(1.0, step_size * span.scale, gamma)


@SCHEDULERS.register(name="MultiStepLR")
def multi_step_lr(span: Span, milestones: Sequence[int], gamma: float = 0.1):
    return schedules.multi_step(1.0, [m * span.scale for m in milestones], gamma)


@SCHEDULERS.register(name="ExponentialLR")
def exponential_lr(span: Span, gamma: float):
    return schedules.exponential(1.0, gamma ** (1.0 / span.scale))


@SCHEDULERS.register(name="CosineAnnealingLR")
def cosine_annealing_lr(
    span: Span,
    T_max: float | None = None,
    eta_min: float = 0.0,  # noqa: N803 (MMEngine's name)
    eta_min_ratio: float | None = None,
):
    t_max = (span.length / span.scale if T_max is None else T_max) * span.scale
    ratio = eta_min_ratio if eta_min_ratio is not None else eta_min / span.base_lr
    return schedules.cosine_annealing(1.0, t_max, ratio)


@SCHEDULERS.register(name="PolyLR")
def poly_lr(span: Span, eta_min: float = 0.0, power: float = 1.0):
    return schedules.polynomial(1.0, span.length, power, eta_min / span.base_lr)


@SCHEDULERS.register(name="OneCycleLR")
def one_cycle_lr(
    span: Span,
    eta_max: float,
    total_steps: int | None = None,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
):
    total = (span.length / span.scale if total_steps is None else total_steps) * span.scale
    return schedules.one_cycle(
        eta_max / span.base_lr, int(total), pct_start, anneal_strategy, div_factor, final_div_factor, three_phase
    )


def _part(cfg: Mapping, where: str, base_lr: float, epoch_length: int):
    """``(begin, end, unit, iter_based, factor)`` of one scheduler, its factor a function of its local step."""
    if "type" not in cfg:
        raise ConfigError(f"{where}: missing 'type'; supported: {SCHEDULERS.names()}")
    factory = SCHEDULERS.resolve(cfg["type"], f"{where}.type")
    args = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    own_keys = keyword_parameters(factory) - {"span"}
    check_keys(f"{where} ({type_name(cfg['type'])})", cfg, COMMON_KEYS | own_keys)
    if cfg.get("verbose"):
        compat.ignored("param_scheduler.verbose")
    if cfg.get("last_step", -1) != -1:
        raise ConfigError(
            f"{where}.last_step: the position of a resumed run comes from its checkpoint; leave last_step at -1"
        )
    by_epoch = cfg.get("by_epoch", True)
    unit = epoch_length if by_epoch else 1
    iter_based = not by_epoch or cfg.get("convert_to_iter_based", False)
    scale = unit if iter_based else 1
    begin = cfg.get("begin", 0) * unit
    end = min(cfg.get("end", INF) * unit, INF)
    if end <= begin:
        raise ConfigError(f"{where}: end ({cfg.get('end')}) must be greater than begin ({cfg.get('begin', 0)})")
    length = (end - begin) if iter_based else math.ceil((end - begin) / unit)
    try:
        factor = factory(Span(base_lr, length, scale), **args)
    except TypeError as exc:
        raise ConfigError(f"{where} ({type_name(cfg['type'])}): {exc}") from exc
    return begin, end, unit, iter_based, factor


def build_lr_schedule(
    param_scheduler: Mapping | Sequence[Mapping] | None, base_lr: float, epoch_length: int, accumulate: int = 1
) -> Callable | None:
    """The learning rate as a function of the optimizer's update count (``None`` without schedulers).

    Schedulers count iterations; with ``accumulate`` iterations per update, update ``n`` happens at iteration
    ``n * accumulate + accumulate - 1`` and takes that iteration's value.
    """
    if not param_scheduler:
        return None
    cfgs = [param_scheduler] if isinstance(param_scheduler, Mapping) else list(param_scheduler)
    parts = [_part(cfg, f"param_scheduler[{i}]", base_lr, epoch_length) for i, cfg in enumerate(cfgs)]

    def schedule(update):
        t = torch.as_tensor(update).to(torch.float64)
        if accumulate > 1:
            t = t * accumulate + (accumulate - 1)
        lr = t * 0.0 + base_lr
        for begin, end, unit, iter_based, factor in parts:
            local = torch.clamp(t, max=end - 1) - begin
            if not iter_based:
                local = torch.floor(local / unit)
            lr = lr * torch.where(t >= begin, factor(torch.clamp(local, min=0)), 1.0)
        return lr

    return schedule
