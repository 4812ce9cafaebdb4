"""MMEngine's parameter schedulers, one rule each: how a scheduler moves a hyperparameter of one param group
from its current value at its ``step``-th step (MMEngine's ``_get_value``).

MMEngine chains schedulers recursively: each rule starts from the group's *current* value, which the schedulers
before it may have moved, so the same formulas are kept here, term for term, to give MMEngine's floats bit for
bit. `funceng.runner.param_scheduler` steps the rules as MMEngine's ``ParamSchedulerHook`` does and turns the
values into tables that the compiled step reads.

Each rule is registered under MMEngine's three names: ``<Kind>LR`` (the learning rate), ``<Kind>Momentum``
(``momentum``, or ``betas[0]`` of the Adam family) and ``<Kind>ParamScheduler`` (any ``param_name``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from funceng.errors import ConfigError
from funceng.registry import PARAM_SCHEDULERS

Group = dict[str, Any]


class Rule:
    """One scheduler's formula. ``epoch_args``: the arguments counted in epochs, multiplied by the epoch length
    when ``convert_to_iter_based=True``."""

    epoch_args: tuple[str, ...] = ()
    name = ""

    def setup(self, groups: list[Group], param: str, begin: int, end: int) -> None:
        """Checks against the span ``[begin, end)`` and prepares the groups before the first step."""

    def value(self, step: int, current: float, base: float, group: Group) -> float:
        raise NotImplementedError


class Step(Rule):
    epoch_args = ("step_size",)

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size, self.gamma = step_size, gamma

    def value(self, step, current, base, group):
        return current if step == 0 or step % self.step_size != 0 else current * self.gamma


class MultiStep(Rule):
    epoch_args = ("milestones",)

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1):
        self.milestones, self.gamma = Counter(milestones), gamma

    def value(self, step, current, base, group):
        return current * self.gamma ** self.milestones[step] if step in self.milestones else current


class Constant(Rule):
    def __init__(self, factor: float = 1.0 / 3):
        if not 0 <= factor <= 1:
            raise ConfigError(f"factor must be between 0 and 1, got {factor}")
        self.factor = factor

    def setup(self, groups, param, begin, end):
        self.total = end - begin - 1

    def value(self, step, current, base, group):
        if step == 0:
            return current * self.factor
        return current * (1.0 / self.factor) if step == self.total else current


class Exponential(Rule):
    def __init__(self, gamma: float):
        self.gamma = gamma

    def value(self, step, current, base, group):
        return current if step == 0 else current * self.gamma


class _WithEtaMin(Rule):
    eta_min: float | None
    eta_min_ratio: float | None

    def _eta_min(self, base: float) -> float:
        return self.eta_min if self.eta_min_ratio is None else base * self.eta_min_ratio


class CosineAnnealing(_WithEtaMin):
    epoch_args = ("T_max",)

    def __init__(self, T_max: int | None = None, eta_min: float | None = None, eta_min_ratio: float | None = None):  # noqa: N803
        if eta_min is not None and eta_min_ratio is not None:
            raise ConfigError("give eta_min or eta_min_ratio, not both")
        self.T_max, self.eta_min, self.eta_min_ratio = T_max, eta_min, eta_min_ratio
        if eta_min is None and eta_min_ratio is None:
            self.eta_min = 0.0

    def setup(self, groups, param, begin, end):
        self.T_max = self.T_max or (end - begin)

    def value(self, step, current, base, group):
        t_max, eta_min = self.T_max, self._eta_min(base)
        if step == 0:
            return current
        if (step - 1 - t_max) % (2 * t_max) == 0:
            return current + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        ratio = (1 + math.cos(math.pi * step / t_max)) / (1 + math.cos(math.pi * (step - 1) / t_max))
        return ratio * (current - eta_min) + eta_min


class Linear(Rule):
    def __init__(self, start_factor: float = 1.0 / 3, end_factor: float = 1.0):
        for name, factor in (("start_factor", start_factor), ("end_factor", end_factor)):
            if not 0 <= factor <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {factor}")
        self.start, self.end = start_factor, end_factor

    def setup(self, groups, param, begin, end):
        self.total = end - begin - 1

    def value(self, step, current, base, group):
        if step == 0:
            return current * self.start
        slope = self.end - self.start
        return current * (1.0 + slope / (self.total * self.start + (step - 1) * slope))


class Poly(Rule):
    def __init__(self, eta_min: float = 0.0, power: float = 1.0):
        self.eta_min, self.power = eta_min, power

    def setup(self, groups, param, begin, end):
        self.total = end - begin - 1

    def value(self, step, current, base, group):
        if step == 0:
            return current
        return (current - self.eta_min) * (1 - 1 / (self.total - step + 1)) ** self.power + self.eta_min


class OneCycle(Rule):
    """Sets the value outright (not relative to the current one) from the group's ``initial_/max_/min_`` values."""

    epoch_args = ("total_steps",)

    def __init__(
        self,
        eta_max: float | Sequence[float] = 0.0,
        total_steps: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ):
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= 0):
            raise ConfigError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise ConfigError(f"pct_start must be a float between 0 and 1, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ConfigError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.eta_max, self.total_steps, self.pct_start = eta_max, total_steps, pct_start
        self.cos, self.div, self.final_div, self.three_phase = (
            anneal_strategy == "cos",
            div_factor,
            final_div_factor,
            three_phase,
        )

    def setup(self, groups, param, begin, end):
        if param != "lr":
            raise ConfigError(f"OneCycle schedules the learning rate only, got param_name={param!r}")
        self.total_steps = self.total_steps or end - begin
        total, pct = self.total_steps, self.pct_start
        if self.three_phase:
            self.phases = [(float(pct * total) - 1, "initial", "max"), (float(2 * pct * total) - 2, "max", "initial")]
        else:
            self.phases = [(float(pct * total) - 1, "initial", "max")]
        self.phases.append((total - 1, "initial" if self.three_phase else "max", "min"))
        eta_max = self.eta_max if isinstance(self.eta_max, (list, tuple)) else [self.eta_max] * len(groups)
        if len(eta_max) != len(groups):
            raise ConfigError(f"eta_max: expected {len(groups)} values (one per param group), got {len(eta_max)}")
        for group, top in zip(groups, eta_max):
            group[f"initial_{param}"] = top / self.div
            group[f"max_{param}"] = top
            group[f"min_{param}"] = group[f"initial_{param}"] / self.final_div
        self.param = param

    def value(self, step, current, base, group):
        if step > self.total_steps:
            raise ConfigError(
                f"OneCycle: the run steps it {step + 1} times but total_steps is {self.total_steps} (MMEngine "
                "stops there too): raise total_steps or set end"
            )
        start_step = 0.0
        for i, (end_step, start, end) in enumerate(self.phases):
            if step <= end_step or i == len(self.phases) - 1:
                pct = (step - start_step) / (end_step - start_step)
                a, b = group[f"{start}_{self.param}"], group[f"{end}_{self.param}"]
                return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1) if self.cos else (b - a) * pct + a
            start_step = end_step
        raise AssertionError("unreachable")


class CosineRestart(_WithEtaMin):
    epoch_args = ("periods",)

    def __init__(
        self,
        periods: Sequence[int],
        restart_weights: Sequence[float] = (1,),
        eta_min: float | None = None,
        eta_min_ratio: float | None = None,
    ):
        if (eta_min is None) == (eta_min_ratio is None):
            raise ConfigError("give exactly one of eta_min and eta_min_ratio")
        if len(periods) != len(restart_weights):
            raise ConfigError(f"periods ({len(periods)}) and restart_weights ({len(restart_weights)}) differ in length")
        self.periods, self.weights = list(periods), list(restart_weights)
        self.eta_min, self.eta_min_ratio = eta_min, eta_min_ratio
        self.cumulative = [sum(self.periods[: i + 1]) for i in range(len(self.periods))]

    def value(self, step, current, base, group):
        idx = next((i for i, period in enumerate(self.cumulative) if step < period), None)
        if idx is None:
            return current
        local = step - (self.cumulative[idx - 1] if idx else 0)
        eta_min = self._eta_min(base)
        if local == 0:
            return base * self.weights[idx]
        period = self.periods[idx]
        ratio = (1 + math.cos(math.pi * local / period)) / (1 + math.cos(math.pi * (local - 1) / period))
        return ratio * (current - eta_min) + eta_min


class ReduceOnPlateau(Rule):
    """Not a function of the step: fed the validation metrics (see `funceng.runner.plateau`)."""

    def __init__(
        self,
        monitor: str = "loss",
        rule: str = "less",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_rule: str = "rel",
        cooldown: int = 0,
        min_value: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ):
        if factor >= 1.0:
            raise ConfigError(f"factor must be < 1.0, got {factor}")
        if threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {threshold}")
        if rule not in ("less", "greater"):
            raise ConfigError(f"rule must be 'less' or 'greater', got {rule!r}")
        if threshold_rule not in ("rel", "abs"):
            raise ConfigError(f"threshold_rule must be 'rel' or 'abs', got {threshold_rule!r}")
        self.monitor, self.rule, self.factor, self.patience = monitor, rule, factor, patience
        self.threshold, self.threshold_rule, self.cooldown, self.min_value, self.eps = (
            threshold,
            threshold_rule,
            cooldown,
            min_value,
            eps,
        )


RULES = {
    "Step": Step,
    "MultiStep": MultiStep,
    "Constant": Constant,
    "Exponential": Exponential,
    "CosineAnnealing": CosineAnnealing,
    "Linear": Linear,
    "Poly": Poly,
    "OneCycle": OneCycle,
    "CosineRestart": CosineRestart,
    "ReduceOnPlateau": ReduceOnPlateau,
}
NO_MOMENTUM = {"OneCycle"}  # MMEngine has no OneCycleMomentum


def _register() -> None:
    for kind, rule in RULES.items():
        PARAM_SCHEDULERS.register(_named(rule, kind, "lr"), name=f"{kind}LR")
        if kind not in NO_MOMENTUM:
            PARAM_SCHEDULERS.register(_named(rule, kind, "momentum"), name=f"{kind}Momentum")
        PARAM_SCHEDULERS.register(_named(rule, kind, None), name=f"{kind}ParamScheduler")


def _named(rule: type[Rule], kind: str, param: str | None) -> type[Rule]:
    """``rule`` under one of its registered names, knowing which hyperparameter it drives (``None``: the
    config's ``param_name``)."""
    suffix = {"lr": "LR", "momentum": "Momentum", None: "ParamScheduler"}[param]
    return type(f"{kind}{suffix}", (rule,), {"param": param})


_register()
