"""MMEngine-compatible front end: the `Runner`, its loops and its hooks."""

from funceng.errors import ConfigError
from funceng.registry import RUNNERS
from funceng.runner.eval_loops import TestLoop, ValLoop
from funceng.runner.flexible import FlexibleRunner
from funceng.runner.hooks import (
    CheckpointHook,
    EarlyStoppingHook,
    EMAHook,
    Hook,
    LoggerHook,
    ProfilerHook,
    SyncBuffersHook,
)
from funceng.runner.loops import EpochBasedTrainLoop, IterBasedTrainLoop
from funceng.runner.runner import Runner
from funceng.runner.sampler import DefaultSampler
from funceng.runner.trackers import MLflowVisBackend, WandbVisBackend

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
    "IterBasedTrainLoop",
    "LoggerHook",
    "MLflowVisBackend",
    "ProfilerHook",
    "Runner",
    "SyncBuffersHook",
    "TestLoop",
    "ValLoop",
    "WandbVisBackend",
]
