"""MMEngine-compatible front end: the `Runner`, its loops and its hooks."""

from funceng.errors import ConfigError
from funceng.runner.eval_loops import TestLoop, ValLoop
from funceng.runner.hooks import CheckpointHook, EarlyStoppingHook, EMAHook, Hook, LoggerHook, SyncBuffersHook
from funceng.runner.loops import EpochBasedTrainLoop, IterBasedTrainLoop
from funceng.runner.runner import Runner
from funceng.runner.sampler import DefaultSampler

__all__ = [
    "CheckpointHook",
    "ConfigError",
    "DefaultSampler",
    "EMAHook",
    "EarlyStoppingHook",
    "EpochBasedTrainLoop",
    "Hook",
    "IterBasedTrainLoop",
    "LoggerHook",
    "Runner",
    "SyncBuffersHook",
    "TestLoop",
    "ValLoop",
]
