"""MMEngine-compatible front end: the `Runner`, its loops and its hooks."""

from funceng.errors import ConfigError
from funceng.registry import RUNNERS
from funceng.runner.eval_loops import TestLoop, ValLoop
from funceng.runner.flexible import FlexibleRunner
from funceng.runner.hooks import CheckpointHook, EarlyStoppingHook, EMAHook, Hook, LoggerHook, SyncBuffersHook
from funceng.runner.loops import EpochBasedTrainLoop, IterBasedTrainLoop
from funceng.runner.runner import Runner
from funceng.runner.sampler import DefaultSampler

RUNNERS.register(Runner)

__all__ = [
    "CheckpointHook",
    "ConfigError",
    "DefaultSampler",
    "EMAHook",
    "EarlyStoppingHook",
    "EpochBasedTrainLoop",
    "Hook",
    "FlexibleRunner",
    "FlexibleRunner",
    "IterBasedTrainLoop",
    "LoggerHook",
    "Runner",
    "SyncBuffersHook",
    "TestLoop",
    "ValLoop",
]
