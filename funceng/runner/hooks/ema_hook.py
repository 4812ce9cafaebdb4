"""`EMAHook`: an average of the weights (exponential, annealed, or stochastic weight averaging), kept in the state
and validated with, as MMEngine's."""

from __future__ import annotations

import torch

from funceng.errors import ConfigError
from funceng.runner.hooks.hook import HOOKS, Hook

EMA_TYPES = ("ExponentialMovingAverage", "MomentumAnnealingEMA", "StochasticWeightAverage")


@HOOKS.register
class EMAHook(Hook):
    """An average of the parameters in the TrainState under ``"ema"`` (and of the floating-point buffers under
    ``"ema_buffers"`` with ``update_buffers=True``; else validation uses the current buffers, as MMEngine's
    copies them), with MMEngine's ``ema_type``:

    - ``"ExponentialMovingAverage"``: ``ema <- ema + momentum (p - ema)``;
    - ``"MomentumAnnealingEMA"``: the same with ``max(momentum, gamma / (gamma + steps))``;
    - ``"StochasticWeightAverage"``: ``ema <- ema + (p - ema) / (steps // interval + 1)``.

    The first update copies the weights; then every ``interval``-th update averages. Before ``begin_iter``
    iterations and ``begin_epoch`` epochs the average is a copy of the weights and the count does not advance.
    Validation and testing use the averaged weights. ``strict_load`` is accepted for MMEngine compatibility.
    """

    priority = "NORMAL"

    def __init__(
        self,
        ema_type: str = "ExponentialMovingAverage",
        strict_load: bool = False,
        begin_iter: int = 0,
        begin_epoch: int = 0,
        momentum: float = 0.0002,
        gamma: float = 100,
        interval: int = 1,
        update_buffers: bool = False,
    ):
        if ema_type not in EMA_TYPES:
            raise ConfigError(f"EMAHook.ema_type: expected one of {list(EMA_TYPES)}, got {ema_type!r}")
        if not 0 < momentum < 1:
            raise ConfigError(f"EMAHook.momentum must be in (0, 1), got {momentum}")
        if interval < 1:
            raise ConfigError(f"EMAHook.interval must be >= 1, got {interval}")
        self.ema_type, self.begin_iter, self.begin_epoch = ema_type, begin_iter, begin_epoch
        self.momentum, self.gamma, self.interval, self.update_buffers = momentum, gamma, interval, update_buffers
        self._steps: int | None = None

    def extra_state(self, params, buffers=None):
        extra = {"ema": _clone(params), "ema_steps": torch.zeros((), dtype=torch.int64)}
        if self.update_buffers:
            extra["ema_buffers"] = _clone(buffers or {})
        return extra

    def _pairs(self, runner, floating_only: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        state = runner.state
        averaged, source = list(state["ema"].values()), list(state["params"].values())
        if self.update_buffers:
            names = [k for k, b in state["buffers"].items() if b.is_floating_point() or not floating_only]
            averaged += [state["ema_buffers"][k] for k in names]
            source += [state["buffers"][k] for k in names]
        return averaged, source

    def before_train(self, runner):
        self._steps = None  # read from the state (restored by a resume) once, then counted here: no host sync

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        steps_tensor = runner.state["ema_steps"]
        started = runner.epoch + 1 >= self.begin_epoch and runner.iter + 1 >= self.begin_iter
        if self._steps is None:
            self._steps = int(steps_tensor)
        steps = self._steps
        if not started or steps == 0:
            torch._foreach_copy_(*self._pairs(runner, floating_only=False))
        elif steps % self.interval == 0:
            averaged, source = self._pairs(runner, floating_only=True)
            if self.ema_type == "StochasticWeightAverage":
                torch._foreach_add_(
                    averaged, torch._foreach_sub(source, averaged), alpha=1 / float(steps // self.interval + 1)
                )
            else:
                momentum = self.momentum
                if self.ema_type == "MomentumAnnealingEMA":
                    momentum = max(self.momentum, self.gamma / (self.gamma + steps))
                torch._foreach_lerp_(averaged, source, momentum)
        if started:
            steps_tensor.add_(1)
            self._steps += 1

    def before_val_epoch(self, runner):
        runner.eval_params_key = "ema"
        if self.update_buffers:
            runner.eval_buffers_key = "ema_buffers"

    def after_val_epoch(self, runner, metrics=None):
        runner.eval_params_key, runner.eval_buffers_key = "params", "buffers"

    before_test_epoch = before_val_epoch
    after_test_epoch = after_val_epoch


def _clone(tensors) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}
