"""Learning-rate schedules: pure, branchless functions ``step -> lr``.

Each builder returns a function of the number of updates done so far (``0`` for the first update), taking an
int or an integer tensor and returning a 0-d float64 tensor on the step's device, so evaluating a schedule inside
a compiled step never syncs nor recompiles. The values equal those of the matching
``torch.optim.lr_scheduler`` class after ``step`` calls of ``scheduler.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Schedule = Callable[[int | Tensor], Tensor]


def _t(step: int | Tensor) -> Tensor:
    return torch.as_tensor(step).to(torch.float64)


def constant(value: float) -> Schedule:
    """``lr = value``."""
    return lambda step: _t(step) * 0.0 + value


def constant_factor(base_lr: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    """``ConstantLR``: ``lr = base_lr * factor`` for ``step < total_iters``, then ``base_lr``."""

    def schedule(step):
        t = _t(step)
        return base_lr * torch.where(t < total_iters, t.new_tensor(factor), 1.0)

    return schedule


def linear(base_lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5) -> Schedule:
    """``LinearLR``: ``lr = base_lr * (start + (end - start) * min(step, total_iters) / total_iters)``."""

    def schedule(step):
        frac = torch.clamp(_t(step), max=total_iters) / total_iters
        return base_lr * (start_factor + (end_factor - start_factor) * frac)

    return schedule


def linear_warmup(base_lr: float, warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    """Linear ramp from ``start_factor * base_lr`` to ``base_lr`` over ``warmup_steps``, then constant."""
    return linear(base_lr, start_factor, 1.0, warmup_steps)


def step(base_lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``StepLR``: ``lr = base_lr * gamma ** floor(step / step_size)``."""
    return lambda s: base_lr * torch.pow(gamma, torch.floor(_t(s) / step_size))


def multi_step(base_lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``MultiStepLR``: ``lr = base_lr * gamma ** (number of milestones <= step)``."""
    marks = sorted(milestones)

    def schedule(s):
        t = _t(s)
        passed = sum((t >= m).to(torch.float64) for m in marks) if marks else t * 0.0
        return base_lr * torch.pow(gamma, passed)

    return schedule


def exponential(base_lr: float, gamma: float) -> Schedule:
    """``ExponentialLR``: ``lr = base_lr * gamma ** step``."""
    return lambda s: base_lr * torch.pow(gamma, _t(s))


def cosine_annealing(base_lr: float, T_max: int, eta_min: float = 0.0) -> Schedule:  # noqa: N803 (torch's name)
    """``CosineAnnealingLR``: ``lr = eta_min + (base_lr - eta_min) (1 + cos(pi step / T_max)) / 2``."""
    return lambda s: eta_min + (base_lr - eta_min) * (1 + torch.cos(math.pi * _t(s) / T_max)) / 2


def polynomial(base_lr: float, total_iters: int = 5, power: float = 1.0, eta_min: float = 0.0) -> Schedule:
    """``PolynomialLR`` (and MMEngine's ``PolyLR`` with ``eta_min``):
    ``lr = (base_lr - eta_min) (1 - min(step, total_iters) / total_iters) ** power + eta_min``."""

    def schedule(s):
        frac = torch.clamp(_t(s), max=total_iters) / total_iters
        return (base_lr - eta_min) * torch.pow(1 - frac, power) + eta_min

    return schedule


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """``OneCycleLR``: anneal ``max_lr / div_factor -> max_lr -> max_lr / div_factor / final_div_factor``
    (three phases: ``initial -> max -> initial -> min``), each phase ``cos`` or ``linear``."""
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"one_cycle: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    initial = max_lr / div_factor
    final = initial / final_div_factor
    if three_phase:
        phases = [
            (float(pct_start * total_steps) - 1, initial, max_lr),
            (float(2 * pct_start * total_steps) - 2, max_lr, initial),
            (total_steps - 1, initial, final),
        ]
    else:
        phases = [(float(pct_start * total_steps) - 1, initial, max_lr), (total_steps - 1, max_lr, final)]

    def anneal(start: float, end: float, pct: Tensor) -> Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(s):
        t = _t(s)
        begin, values = 0.0, []
        for end_step, start, end in phases:
            values.append((end_step, anneal(start, end, (t - begin) / (end_step - begin))))
            begin = end_step
        lr = values[-1][1]
        for end_step, value in reversed(values[:-1]):
            lr = torch.where(t <= end_step, value, lr)
        return lr

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedules end to end: ``schedules[i]`` runs from ``boundaries[i-1]`` with its own step restarted at 0
    (``SequentialLR``'s ``milestones``)."""
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join: {len(schedules)} schedules need {len(schedules) - 1} boundaries, got {len(boundaries)}"
        )

    def schedule(s):
        t = _t(s)
        lr = schedules[-1](t - (boundaries[-1] if boundaries else 0))
        for i in reversed(range(len(boundaries))):
            start = boundaries[i - 1] if i else 0
            lr = torch.where(t < boundaries[i], schedules[i](t - start), lr)
        return lr

    return schedule
