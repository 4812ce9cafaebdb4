"""MMEngine-format logging: the run's logger, its line formats and smoothing windows."""

from __future__ import annotations

import datetime
import logging
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funceng.errors import ConfigError, check_keys
from funceng.runner.terminal import TerminalHandler

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y/%m/%d %H:%M:%S"

MEMBER_PREFIX = "member_"  # a population member's scalars ("member_3/loss"): in the scalars file, not the log line


class RunLogger(logging.Logger):
    """A run's private logger named ``funceng``: to the terminal (stdout, through `TerminalHandler`: coloured
    level names on a TTY, never interleaved with a progress bar) and, on the main process, to the run's log file
    (plain text).

    ``terminal_filter`` (an `IterationLineFilter`) can hide per-iteration lines from the terminal;
    ``terminal_stream`` is the stream bars must use.
    """

    def __init__(self, log_file: Path | None, level: str = "INFO"):
        super().__init__("funceng", level=level)
        terminal = TerminalHandler(sys.stdout, LOG_FORMAT, DATE_FORMAT)
        self.terminal_filter, self.terminal_stream = terminal.lines, terminal.stream
        self.addHandler(terminal)
        if log_file is not None:
            file = logging.FileHandler(log_file, mode="w")
            file.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
            self.addHandler(file)

    def close(self) -> None:
        """Closes the log file; the logger writes nothing more."""
        for handler in list(self.handlers):
            handler.close()
            self.removeHandler(handler)


class Window:
    """Recent values of one scalar (time, data_time, losses) for smoothing over the logging interval."""

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self.total, self.count = 0.0, 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else 0.0

    def global_mean(self) -> float:
        return self.total / max(self.count, 1)


def format_value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def position(index: int, total: int) -> str:
    """``[  10/1563]``: the index right-aligned to the total's width, as MMEngine aligns it."""
    return f"[{str(index).rjust(len(str(total)))}/{total}]"


def header(mode: str, *, epoch: int | None, max_epochs: int | None, index: int, total: int) -> str:
    """``Epoch(train)  [1][  10/1563]`` or ``Iter(train) [  10/1000]``, aligned as MMEngine aligns them."""
    if epoch is None:
        return f"Iter({mode}) {position(index, total)}"
    epoch_str = f"[{epoch}]".rjust(len(str(max_epochs)) + 3) if max_epochs else f" [{epoch}]"
    return f"Epoch({mode}){epoch_str}{position(index, total)}"


def iteration_line(
    head: str,
    lr: float | None,
    eta_seconds: float,
    time: float,
    data_time: float,
    memory: int | None,
    scalars: dict[str, float],
) -> str:
    lr_str = f"lr: {lr:.4e}" if lr is not None else ""
    line = f"{head}  {lr_str}  eta: {datetime.timedelta(seconds=int(eta_seconds))}  "
    line += f"time: {time:.4f}  data_time: {data_time:.4f}  "
    if memory is not None:
        line += f"memory: {memory}  "
    return line + "  ".join(f"{k}: {format_value(v)}" for k, v in scalars.items())


def epoch_end_line(head: str, metrics: dict[str, Any], time: float, data_time: float) -> str:
    items = [f"{k}: {format_value(v)}" for k, v in metrics.items()]
    items += [f"data_time: {data_time:.4f}", f"time: {time:.4f}"]
    return f"{head}    " + "  ".join(items)


def cuda_memory_mb(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    memory = torch.cuda.max_memory_allocated(device) // (1024 * 1024)
    torch.cuda.reset_peak_memory_stats(device)
    return int(memory)


LOG_PROCESSOR_KEYS = {
    "type",
    "window_size",
    "by_epoch",
    "custom_cfg",
    "num_digits",
    "log_with_hierarchy",
    "mean_pattern",
}


def build_log_processor(cfg: Mapping[str, Any] | None, loop_by_epoch: bool) -> dict[str, Any]:
    """MMEngine's ``log_processor`` dict, checked: ``window_size`` (iterations the logged values are averaged
    over, or ``"global"``; default 10) and ``by_epoch`` (must agree with ``train_cfg``). Options that would
    change what is logged and are not implemented are refused, naming them."""
    cfg = dict(cfg or {})
    check_keys("log_processor", cfg, LOG_PROCESSOR_KEYS)
    if cfg.pop("type", "LogProcessor") != "LogProcessor":
        raise ConfigError("log_processor.type: only 'LogProcessor' is available")
    window = cfg.get("window_size", 10)
    if window != "global" and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"log_processor.window_size: expected a positive int or 'global', got {window!r}")
    if cfg.get("by_epoch", loop_by_epoch) != loop_by_epoch:
        raise ConfigError(
            f"log_processor.by_epoch={cfg['by_epoch']} disagrees with train_cfg (by_epoch={loop_by_epoch}); "
            "funceng logs in the train loop's unit"
        )
    for key, default in (("custom_cfg", None), ("num_digits", 4), ("log_with_hierarchy", False)):
        if cfg.get(key, default) not in (default, [], ()):
            raise ConfigError(f"log_processor.{key}={cfg[key]!r} is not supported; funceng logs with {key}={default}")
    if cfg.get("mean_pattern", r".*(loss|time|data_time|grad_norm).*") != r".*(loss|time|data_time|grad_norm).*":
        raise ConfigError("log_processor.mean_pattern is not supported: funceng averages every logged loss and time")
    return {"window_size": 10**9 if window == "global" else window, "by_epoch": loop_by_epoch}


def log_frozen(runner: Any, by_lr_mult: tuple[str, ...], why: str = "paramwise_cfg lr_mult=0") -> None:
    """Says once which parameters the run leaves unchanged, and why."""
    no_grad = [name for name, p in runner.model.named_parameters() if not p.requires_grad]
    by_lr_mult = tuple(name for name in by_lr_mult if name not in no_grad)
    for names, reason in ((no_grad, "requires_grad=False"), (by_lr_mult, why)):
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
            runner.logger.info(f"Frozen by {reason}: {len(names)} parameters stay unchanged ({shown})")
