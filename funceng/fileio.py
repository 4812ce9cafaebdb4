"""Durable and atomic file writes: what a crash or ``kill -9`` at any moment cannot leave half-written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Makes the entries of directory ``path`` (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> str:
    """Writes ``data`` to ``path`` and fsyncs it; returns its sha256 (hex). Not atomic by itself: write into a
    directory that is renamed into place afterwards, or use `replace_atomically`."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def replace_atomically(path: Path, data: bytes) -> None:
    """Replaces the file ``path`` with ``data``: readers see the old content or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_durably(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
