"""MMEngine's ``mmengine.hooks``: every hook a config or a script may name, at MMEngine's import path.

funceng's own hooks live in `funceng.runner.hooks`, one per module. MMEngine's default hooks that funceng's
loops do themselves (timing, runtime info, parameter schedules, sampler seeds, visualisation) are accepted as
names and logged as ignored (`funceng.runner.compat`).
"""

from __future__ import annotations

import torch

from funceng.registry import HOOKS
from funceng.runner import compat
from funceng.runner.hooks import (
    CheckpointHook,
    EarlyStoppingHook,
    EMAHook,
    Hook,
    LoggerHook,
    ProfilerHook,
    SyncBuffersHook,
)
from funceng.runner.hooks.hook import BUILT_IN_DEFAULT_HOOKS

__all__ = [
    "CheckpointHook",
    "EMAHook",
    "EarlyStoppingHook",
    "EmptyCacheHook",
    "Hook",
    "LoggerHook",
    "ProfilerHook",
    "SyncBuffersHook",
]


@HOOKS.register
class EmptyCacheHook(Hook):
    """Releases the CUDA caching allocator's unused blocks (``torch.cuda.empty_cache``) before and/or after each
    epoch and after each iteration, as MMEngine's; nothing to do without CUDA."""

    def __init__(self, before_epoch: bool = False, after_epoch: bool = True, after_iter: bool = False):
        self._before_epoch, self._after_epoch, self._after_iter = before_epoch, after_epoch, after_iter

    @staticmethod
    def _empty() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _after_iter_any(self, runner, batch_idx, data_batch=None, outputs=None):
        if self._after_iter:
            self._empty()

    def _before_epoch_any(self, runner):
        if self._before_epoch:
            self._empty()

    def _after_epoch_any(self, runner, metrics=None):
        if self._after_epoch:
            self._empty()

    after_train_iter = after_val_iter = after_test_iter = _after_iter_any
    before_train_epoch = before_val_epoch = before_test_epoch = _before_epoch_any
    after_val_epoch = after_test_epoch = _after_epoch_any

    def after_train_epoch(self, runner):
        self._after_epoch_any(runner)


class _BuiltIntoLoops(Hook):
    """One of MMEngine's default hooks whose work funceng's loops do themselves."""

    key = ""

    def __init__(self, *args, **kwargs):
        compat.ignored(f"default_hooks.{self.key}")


for _key, _name in BUILT_IN_DEFAULT_HOOKS.items():
    globals()[_name] = HOOKS.register(type(_name, (_BuiltIntoLoops,), {"key": _key, "__module__": __name__}))
__all__ += list(BUILT_IN_DEFAULT_HOOKS.values())
