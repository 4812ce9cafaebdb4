"""`EarlyStoppingHook`: stops training when a validation metric stops improving."""

from __future__ import annotations

import math

from funceng.evaluator import improvement, metric_rule
from funceng.runner.hooks.hook import HOOKS, Hook


@HOOKS.register
class EarlyStoppingHook(Hook):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations, or became
    non-finite, or reached ``stopping_threshold``."""

    priority = "LOWEST"

    def __init__(
        self,
        monitor: str,
        rule: str | None = None,
        min_delta: float = 0.1,
        strict: bool = False,
        check_finite: bool = True,
        patience: int = 5,
        stopping_threshold: float | None = None,
    ):
        self.monitor, self.min_delta, self.strict = monitor, min_delta, strict
        self.rule = metric_rule(monitor, rule)
        self.check_finite, self.patience, self.stopping_threshold = check_finite, patience, stopping_threshold
        self.best: float | None = None
        self.wait = 0

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]

    def after_val_epoch(self, runner, metrics=None):
        metrics = metrics or {}
        if self.monitor not in metrics:
            if self.strict:
                raise KeyError(f"EarlyStoppingHook: monitor {self.monitor!r} not in metrics {sorted(metrics)}")
            return
        value = float(metrics[self.monitor])
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} is {value}"
        elif self.stopping_threshold is not None and improvement(value, self.stopping_threshold, self.rule) >= 0:
            reason = f"{self.monitor} reached the threshold {self.stopping_threshold}"
        elif self.best is None or improvement(value, self.best, self.rule) > self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                reason = f"{self.monitor} did not improve by {self.min_delta} for {self.patience} validations"
        if reason:
            runner.stop_training = True
            runner.logger.info(f"Early stopping: {reason} (best {self.best}).")
