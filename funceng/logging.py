"""MMEngine's ``mmengine.logging``: `MessageHub` (scalars and runtime information shared between hooks),
`HistoryBuffer`, `MMLogger` and `print_log`.

The Runner makes a `MessageHub` per run (the current one, ``runner.message_hub``) and keeps its runtime
information up to date (``epoch``, ``iter``, ``max_epochs``, ``max_iters``, ``experiment_name``, ``seed``).
A scalar a hook or a model adds under ``train/<name>`` (``update_scalar``) is logged by `LoggerHook` on the
training log lines, as MMEngine's LogProcessor does: the mean over ``log_processor.window_size`` for names with
``loss``, ``time`` or ``grad_norm`` in them, else the latest value. The run's own values (the losses a step
returns) enter the hub as ``train/<name>`` when they are logged, every ``interval`` iterations (they stay on the
device in between).
"""

from __future__ import annotations

import logging as _std_logging
from typing import Any, ClassVar

import numpy as np


class HistoryBuffer:
    """The values of one scalar, oldest first, with their counts."""

    def __init__(self):
        self.values: list[float] = []
        self.counts: list[int] = []

    def update(self, value: float, count: int = 1) -> None:
        self.values.append(float(value))
        self.counts.append(count)

    @property
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self.values), np.array(self.counts)

    def current(self) -> float:
        if not self.values:
            raise ValueError("HistoryBuffer.current(): no value yet")
        return self.values[-1]

    def mean(self, window_size: int | None = None) -> float:
        values = self.values[-window_size:] if window_size else self.values
        return float(np.mean(values)) if values else 0.0

    def min(self, window_size: int | None = None) -> float:
        return float(np.min(self.values[-window_size:] if window_size else self.values))

    def max(self, window_size: int | None = None) -> float:
        return float(np.max(self.values[-window_size:] if window_size else self.values))


class MessageHub:
    """Named instances (``get_instance(name)``); the latest one made is the current one."""

    _instances: ClassVar[dict[str, MessageHub]] = {}
    _current: ClassVar[str | None] = None

    def __init__(self, name: str):
        self.instance_name = name
        self.log_scalars: dict[str, HistoryBuffer] = {}
        self.runtime_info: dict[str, Any] = {}

    @classmethod
    def get_instance(cls, name: str = "funceng", **kwargs: Any) -> MessageHub:
        if kwargs:
            raise TypeError(f"MessageHub.get_instance: {sorted(kwargs)} are not supported (only the name)")
        if name not in cls._instances:
            cls._instances[name] = cls(name)
        cls._current = name
        return cls._instances[name]

    @classmethod
    def fresh_instance(cls, name: str) -> MessageHub:
        """A new, empty hub registered as ``name`` and made current: a run starts with none of the scalars of an
        earlier run that had the same name (two runs started in the same second in different work_dirs)."""
        cls._instances[name] = cls(name)
        cls._current = name
        return cls._instances[name]

    @classmethod
    def get_current_instance(cls) -> MessageHub:
        return cls.get_instance(cls._current or "funceng")

    def update_scalar(self, key: str, value: Any, count: int = 1) -> None:
        if hasattr(value, "item"):
            value = value.item()
        self.log_scalars.setdefault(key, HistoryBuffer()).update(value, count)

    def update_scalars(self, log_dict: dict[str, Any]) -> None:
        for key, value in log_dict.items():
            self.update_scalar(key, value)

    def get_scalar(self, key: str) -> HistoryBuffer:
        if key not in self.log_scalars:
            raise KeyError(
                f"MessageHub {self.instance_name!r} has no scalar {key!r}; it has {sorted(self.log_scalars)}"
            )
        return self.log_scalars[key]

    def update_info(self, key: str, value: Any) -> None:
        self.runtime_info[key] = value

    def update_info_dict(self, info: dict[str, Any]) -> None:
        self.runtime_info.update(info)

    def get_info(self, key: str, default: Any = None) -> Any:
        return self.runtime_info.get(key, default)


class MMLogger:
    """``MMLogger.get_current_instance()``: the current run's logger (a ``logging.Logger``), or the ``funceng``
    logger outside a run; ``get_instance(name, log_file=, log_level=, file_mode=)``: a standard logger of that name,
    with those applied (any other option is refused)."""

    _current: ClassVar[_std_logging.Logger | None] = None

    @classmethod
    def get_current_instance(cls) -> _std_logging.Logger:
        return cls._current or _std_logging.getLogger("funceng")

    @classmethod
    def get_instance(
        cls, name: str, log_file: str | None = None, log_level: str | int = "INFO", file_mode: str = "w", **other: Any
    ) -> _std_logging.Logger:
        if other:
            raise TypeError(
                f"MMLogger.get_instance: {sorted(other)} are not supported (log_file, log_level, file_mode)"
            )
        logger = _std_logging.getLogger(name)
        logger.setLevel(log_level)
        if log_file is not None:
            logger.addHandler(_std_logging.FileHandler(log_file, mode=file_mode))
        return logger


def print_log(msg: str, logger: Any = None, level: int = _std_logging.INFO) -> None:
    """MMEngine's: ``logger=None`` prints, ``"current"`` logs to the current run, ``"silent"`` drops, a name or a
    logger logs there."""
    if logger is None:
        print(msg)
    elif logger == "silent":
        return
    elif logger == "current":
        MMLogger.get_current_instance().log(level, msg)
    elif isinstance(logger, str):
        _std_logging.getLogger(logger).log(level, msg)
    else:
        logger.log(level, msg)
