"""`SyncBuffersHook`: the same BatchNorm statistics on every rank."""

from __future__ import annotations

from funceng import dist
from funceng.runner.hooks.hook import HOOKS, Hook


@HOOKS.register
class SyncBuffersHook(Hook):
    """Averages floating-point buffers (BatchNorm running statistics) over the ranks after each training epoch
    and before validation, so every rank evaluates, and every checkpoint holds, the same statistics.

    Gradients are averaged in every step regardless; without this hook each rank keeps the buffer statistics
    of its own shard of the data and checkpoints hold rank 0's.
    """

    def _sync(self, runner):
        if runner.state is not None:
            dist.all_reduce_mean_([b for b in runner.state["buffers"].values() if b.is_floating_point()])

    def after_train_epoch(self, runner):
        self._sync(runner)

    def before_val_epoch(self, runner):
        self._sync(runner)
