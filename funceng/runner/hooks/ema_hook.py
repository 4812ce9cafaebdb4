"""`EMAHook`: an exponential moving average of the parameters, kept in the state and validated with."""

from __future__ import annotations

import torch

from funceng.runner.hooks.hook import HOOKS, Hook


@HOOKS.register
class EMAHook(Hook):
    """An exponential moving average of the parameters, kept in the TrainState under ``"ema"``:
    ``ema <- (1 - momentum) * ema + momentum * params`` after every train iteration from ``begin_iter``.
    Validation and testing use the averaged weights."""

    priority = "NORMAL"

    def __init__(self, momentum: float = 0.0002, begin_iter: int = 0):
        self.momentum, self.begin_iter = momentum, begin_iter

    def extra_state(self, params):
        return {"ema": {name: p.detach().clone() for name, p in params.items()}}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        state = runner.state
        ema, params = list(state["ema"].values()), list(state["params"].values())
        if runner.iter <= self.begin_iter:
            torch._foreach_copy_(ema, params)
        else:
            torch._foreach_lerp_(ema, params, self.momentum)

    def before_val_epoch(self, runner):
        runner.eval_params_key = "ema"

    def after_val_epoch(self, runner, metrics=None):
        runner.eval_params_key = "params"

    before_test_epoch = before_val_epoch
    after_test_epoch = after_val_epoch
