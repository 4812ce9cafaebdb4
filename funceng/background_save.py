"""Saving on a background thread: the state is copied to host memory, then written while training goes on.

One save is in flight at a time: the next one (and the interpreter's exit) first waits for it, and raises the
error it ended with, so a failed background save is never silent.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from pathlib import Path

import torch


class PendingSave:
    """A checkpoint being written on a background thread (`save_state` with ``blocking=False``)."""

    def __init__(self, path: Path, work: Callable[[], Path]):
        self.path, self._error, self._result = path, None, None

        def run() -> None:
            try:
                self._result = work()
            except BaseException as exc:  # kept for wait(), which raises it in the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"funceng-save-{path.name}", daemon=False)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> Path:
        """Blocks until the checkpoint is in place; raises what the write raised."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.path


_pending: PendingSave | None = None
_pending_lock = threading.Lock()


def wait_for_saves() -> None:
    """Waits for the background save in flight, if any (raising its error). Every save and the exit wait."""
    global _pending
    with _pending_lock:
        pending, _pending = _pending, None
    if pending is not None:
        pending.wait()


atexit.register(wait_for_saves)


def start(path: Path, work: Callable[[], Path]) -> PendingSave:
    """Runs ``work`` (which writes ``path``) on a background thread, as the save in flight."""
    global _pending
    pending = PendingSave(path, work)
    with _pending_lock:
        _pending = pending
    return pending


def snapshot(leaves: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Host copies of ``leaves`` (pinned and copied without blocking from a GPU), and the event that marks them
    complete."""
    copies = []
    for leaf in leaves:
        leaf = leaf.detach()
        pin = leaf.is_cuda
        copy = torch.empty(leaf.shape, dtype=leaf.dtype, pin_memory=pin)
        copies.append(copy.copy_(leaf, non_blocking=pin))
    event = None
    if any(leaf.is_cuda for leaf in leaves):
        event = torch.cuda.Event()
        event.record()
    return copies, event
