"""MMEngine-compatible front end: `Runner` and its hooks."""

from funceng.runner.build import ConfigError
from funceng.runner.hooks import CheckpointHook, EarlyStoppingHook, EMAHook, Hook, LoggerHook, SyncBuffersHook
from funceng.runner.runner import Runner
from funceng.runner.sampler import DefaultSampler

__all__ = ["CheckpointHook", "ConfigError", "DefaultSampler", "EMAHook", "EarlyStoppingHook", "Hook", "LoggerHook",
           "Runner", "SyncBuffersHook"]
