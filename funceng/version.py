"""funceng's version, read from the installed package's metadata."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("funceng")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
