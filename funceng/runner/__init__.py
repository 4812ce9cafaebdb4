"""MMEngine-compatible front end: `Runner` and its hooks."""

from funceng.runner.build import ConfigError
from funceng.runner.hooks import CheckpointHook, EarlyStoppingHook, EMAHook, Hook, LoggerHook
from funceng.runner.runner import Runner

__all__ = ["CheckpointHook", "ConfigError", "EMAHook", "EarlyStoppingHook", "Hook", "LoggerHook", "Runner"]
