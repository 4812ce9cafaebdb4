"""The run's terminal: one output path for log lines and progress bars, and coloured level names on a TTY.

Log lines and bars share one stream (stdout) and one writer: each line is written with ``tqdm.write``, which
clears the live bars, prints the line and redraws them, so a line never lands in the middle of a bar. (tqdm
rather than rich: tqdm is already a dependency and its ``write`` is exactly this one job; rich would add a
dependency and a second rendering model for the same result.)

Colours follow the terminal, not the run: level names are coloured only when the stream is a TTY, ``NO_COLOR``
is unset or empty (https://no-color.org) and ``TERM`` is not ``dumb``; ``FORCE_COLOR`` (non-empty) forces them.
The log file is always plain text.
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any

LEVEL_COLOURS = {"DEBUG": "36", "INFO": "32", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}  # ANSI SGR


def colours_wanted(stream: IO[str]) -> bool:
    """Whether text written to ``stream`` may carry ANSI colours (see the module's docstring)."""
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ColourFormatter(logging.Formatter):
    """A formatter that colours the level name (``INFO`` green, ``WARNING`` yellow, ``ERROR`` red)."""

    def format(self, record: logging.LogRecord) -> str:
        plain = record.levelname
        colour = LEVEL_COLOURS.get(plain)
        if colour is None:
            return super().format(record)
        record.levelname = f"\x1b[{colour}m{plain}\x1b[0m"
        try:
            return super().format(record)
        finally:
            record.levelname = plain


class IterationLineFilter(logging.Filter):
    """Keeps per-iteration lines off the terminal while a progress bar shows them (the log file keeps them)."""

    def __init__(self):
        super().__init__()
        self.quiet = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.quiet and getattr(record, "iteration_line", False))


class TerminalHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write`` on the stream the bars use, so lines and bars never interleave."""

    def __init__(self, stream: IO[str], fmt: str, datefmt: str):
        super().__init__(stream)
        formatter = ColourFormatter if colours_wanted(stream) else logging.Formatter
        self.setFormatter(formatter(fmt, datefmt))
        self.lines = IterationLineFilter()
        self.addFilter(self.lines)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging.StreamHandler: a failing terminal must not stop the run
            self.handleError(record)


class ProgressBar:
    """A live bar on the terminal's stream with eta, it/s and the given postfix (the latest loss and lr, the
    whole run's eta). ``leave=False`` clears it when closed (validation and test bars)."""

    def __init__(self, total: int, desc: str, stream: IO[str], initial: int = 0, leave: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=leave, file=stream)

    def update(self, **postfix: Any) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: _short(k, v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _short(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.2e}" if key == "lr" else f"{value:.4f}"
