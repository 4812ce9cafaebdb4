"""Hooks: MMEngine's extension points, called by the Runner's loops at each stage of a run; one hook a module."""

from funceng.runner.hooks.checkpoint_hook import CheckpointHook
from funceng.runner.hooks.early_stopping_hook import EarlyStoppingHook
from funceng.runner.hooks.ema_hook import EMAHook
from funceng.runner.hooks.hook import HOOKS, PRIORITIES, Hook, build_hooks
from funceng.runner.hooks.logger_hook import LoggerHook
from funceng.runner.hooks.profiler_hook import ProfilerHook
from funceng.runner.hooks.sync_buffers_hook import SyncBuffersHook

__all__ = [
    "HOOKS",
    "PRIORITIES",
    "CheckpointHook",
    "EMAHook",
    "EarlyStoppingHook",
    "Hook",
    "LoggerHook",
    "ProfilerHook",
    "SyncBuffersHook",
    "build_hooks",
]
