"""MMEngine-format logging: the logger, the environment banner, log lines and the scalars file."""

from __future__ import annotations

import datetime
import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

import funceng

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
DATE_FORMAT = "%Y/%m/%d %H:%M:%S"


class IterationLineFilter(logging.Filter):
    """Keeps per-iteration lines off the terminal while a progress bar shows them (the log file keeps them)."""

    def __init__(self):
        super().__init__()
        self.quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.quiet and getattr(record, "iteration_line", False))


def make_logger(log_file: Path | None, level: str = "INFO") -> logging.Logger:
    """A private logger named ``funceng`` writing to stdout and, on the main process, to ``log_file``.

    ``logger.terminal_filter`` (an `IterationLineFilter`) can hide per-iteration lines from the terminal.
    """
    logger = logging.Logger("funceng", level=level)
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(formatter)
    logger.terminal_filter = IterationLineFilter()
    stream.addFilter(logger.terminal_filter)
    logger.addHandler(stream)
    if log_file is not None:
        file = logging.FileHandler(log_file, mode="w")
        file.setFormatter(formatter)
        logger.addHandler(file)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def environment_banner(seed: int, deterministic: bool, launcher: str = "none", world_size: int = 1) -> str:
    lines = [
        "",
        "-" * 60,
        "System environment:",
        f"    sys.platform: {sys.platform}",
        f"    Python: {sys.version.replace(chr(10), ' ')}",
        f"    CUDA available: {torch.cuda.is_available()}",
        f"    numpy_random_seed: {seed}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"    GPU {i}: {torch.cuda.get_device_name(i)}")
        lines.append(f"    CUDA: {torch.version.cuda}")
    lines += [f"    PyTorch: {torch.__version__}", f"    NumPy: {np.__version__}"]
    try:
        import torchvision

        lines.append(f"    TorchVision: {torchvision.__version__}")
    except ImportError:
        pass
    lines += [
        f"    funceng: {funceng.__version__}",
        "",
        "Runtime environment:",
        f"    seed: {seed}",
        f"    deterministic: {deterministic}",
        f"    Distributed launcher: {launcher}",
        f"    Distributed training: {world_size > 1}",
        f"    World size: {world_size}",
        "-" * 60,
    ]
    return "\n".join(lines)


class ProgressBar:
    """A live bar on stderr with eta, it/s and the latest logged loss and lr."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, **postfix: float) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4f}" if k != "lr" else f"{v:.2e}" for k, v in postfix.items()})

    def close(self) -> None:
        self.bar.close()


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


def header(mode: str, *, epoch: int | None, max_epochs: int | None, index: int, total: int) -> str:
    """``Epoch(train)  [1][  10/1563]`` or ``Iter(train) [  10/1000]``, aligned as MMEngine aligns them."""
    position = f"[{str(index).rjust(len(str(total)))}/{total}]"
    if epoch is None:
        return f"Iter({mode}) {position}"
    epoch_str = f"[{epoch}]".rjust(len(str(max_epochs)) + 3) if max_epochs else f" [{epoch}]"
    return f"Epoch({mode}){epoch_str}{position}"


def iteration_line(head: str, lr: float | None, eta_seconds: float, time: float, data_time: float,
                   memory: int | None, scalars: dict[str, float]) -> str:
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
