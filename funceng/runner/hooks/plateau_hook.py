"""MMEngine's ``ReduceOnPlateau*`` schedulers: the one kind of scheduler that is not a function of the step.

It stays pure in funceng's sense: its bookkeeping (best metric, bad epochs, cooldown, steps) is tensors of the
TrainState, so it is saved and resumed with it, and the value it lowers is the hyperparameter tensor the train
step reads (`funceng.optim.inject_hyperparams`). Between steps, after each validation, this hook computes the
new state from the old one and the metric, as MMEngine's ``ReduceOnPlateauParamScheduler.step(metrics)`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from funceng.runner.hooks.hook import Hook
from funceng.runner.param_scheduler import INF, ScheduledHyperparams, Scheduler

PLATEAU_KEY = "plateau"


class ReduceOnPlateauHook(Hook):
    """Steps the run's ReduceOnPlateau schedulers: after each train epoch (counting it) and after each validation
    (judging its metric); MMEngine's ParamSchedulerHook priority (``LOW``)."""

    priority = "LOW"

    def __init__(self, schedulers: list[Scheduler], hyperparams: ScheduledHyperparams):
        self.schedulers, self.hyperparams = schedulers, hyperparams

    def extra_state(self, params: dict[str, torch.Tensor], buffers: dict | None = None) -> dict[str, Any]:
        device = next(iter(params.values())).device
        states = {}
        for index, scheduler in enumerate(self.schedulers):
            worse = float(INF) if scheduler.rule.rule == "less" else -float(INF)
            states[str(index)] = {
                "best": torch.tensor(worse, dtype=torch.float64, device=device),
                "bad_epochs": torch.zeros((), dtype=torch.int64, device=device),
                "cooldown": torch.zeros((), dtype=torch.int64, device=device),
                "last_step": torch.tensor(scheduler.last_step, dtype=torch.int64, device=device),
                "epochs": torch.zeros((), dtype=torch.int64, device=device),
            }
        return {PLATEAU_KEY: states}

    def after_train_epoch(self, runner: Any) -> None:
        for index in range(len(self.schedulers)):
            runner.state[PLATEAU_KEY][str(index)]["epochs"].add_(1)

    def after_val_epoch(self, runner: Any, metrics: dict[str, Any] | None = None) -> None:
        if metrics is None or runner.state is None or PLATEAU_KEY not in runner.state.keys():
            return
        for index, scheduler in enumerate(self.schedulers):
            self._step(runner.state, runner.state[PLATEAU_KEY][str(index)], scheduler, metrics)

    def _step(self, state: Any, mine: Any, scheduler: Scheduler, metrics: dict[str, Any]) -> None:
        rule = scheduler.rule
        if not scheduler.begin <= int(mine["epochs"]) < scheduler.end:
            return
        mine["last_step"].add_(1)
        if rule.monitor not in metrics:
            raise KeyError(
                f"ReduceOnPlateau monitors {rule.monitor!r}, but the validation metrics are {sorted(metrics)}"
            )
        metric = float(metrics[rule.monitor])
        if self._is_better(rule, metric, float(mine["best"])):
            mine["best"].fill_(metric)
            mine["bad_epochs"].zero_()
        else:
            mine["bad_epochs"].add_(1)
        if int(mine["cooldown"]) > 0:
            mine["cooldown"].sub_(1)
            mine["bad_epochs"].zero_()
        if int(mine["bad_epochs"]) > rule.patience:
            self._reduce(state, scheduler)
            mine["cooldown"].fill_(rule.cooldown)
            mine["bad_epochs"].zero_()

    def _reduce(self, state: Any, scheduler: Scheduler) -> None:
        rule = scheduler.rule
        name, position = scheduler.key
        groups = self.hyperparams.group_hyperparams(state["opt_state"])
        floors = rule.min_value if isinstance(rule.min_value, (list, tuple)) else [rule.min_value] * len(groups)
        for hyperparams, floor in zip(groups, floors):
            tensor = hyperparams[name] if position is None else hyperparams[name][position]
            current = float(tensor)
            new = max(current * rule.factor, floor)
            if current - new > rule.eps:
                tensor.fill_(new)

    @staticmethod
    def _is_better(rule: Any, metric: float, best: float) -> bool:
        if rule.rule == "less":
            return (
                metric < best * (1.0 - rule.threshold)
                if rule.threshold_rule == "rel"
                else metric < best - rule.threshold
            )
        return (
            metric > best * (rule.threshold + 1.0) if rule.threshold_rule == "rel" else metric > best + rule.threshold
        )
