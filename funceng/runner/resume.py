"""What exact resumption needs beyond the TrainState: global RNG states and the data loader's position.

A shuffling ``DataLoader`` draws its permutation (and main-process transforms draw their randomness) from the
global generators when an epoch starts. A checkpoint therefore records those generators twice: as they were at
the start of the current epoch, and as they are at the moment of saving. Resuming in the middle of an epoch
replays the epoch start, skips the batches already trained on at the sampler level (indices only, no data is
read), and then continues with the generators as they were when the checkpoint was written.
"""

from __future__ import annotations

import base64
import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from funceng.runner.sampler import loading_options


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    gens = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    unique: list[torch.Generator] = []
    for g in gens:
        if isinstance(g, torch.Generator) and all(g is not u for u in unique):
            unique.append(g)
    return unique


def capture_rng(loader: Any = None) -> dict[str, Any]:
    """The global generators (torch, CUDA, numpy, python) and the loader's own, JSON-serialisable."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": _encode(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "loader": [_encode(g.get_state()) for g in _loader_generators(loader)],
    }
    if torch.cuda.is_available():
        states["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng(states: dict[str, Any], loader: Any = None) -> None:
    torch.set_rng_state(_decode(states["torch"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for gen, state in zip(_loader_generators(loader), states.get("loader", [])):
        gen.set_state(_decode(state))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in states["cuda"]])


@contextlib.contextmanager
def forked_rng(loader: Any = None) -> Iterator[None]:
    """Runs the body without moving any global generator (validation must not shift the next epoch's data)."""
    saved = capture_rng(loader)
    try:
        yield
    finally:
        restore_rng(saved, loader)


class _SkipBatches(Sampler):
    """A batch sampler that drops its first ``skip`` batches of indices, then calls ``on_skipped``."""

    def __init__(self, batch_sampler: Any, skip: int, on_skipped: Callable[[], None]):
        self.batch_sampler, self.skip, self.on_skipped = batch_sampler, skip, on_skipped

    def __iter__(self):
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(batches, None)
        self.on_skipped()
        yield from batches

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def resume_position(loader: Any, skip: int, epoch_start: dict, saved: dict) -> tuple[Any, str]:
    """An iterable over ``loader``'s current epoch from batch ``skip`` on, with the generators as they were saved.

    Returns the iterable and how the batches were skipped. A map-style `DataLoader` skips at the sampler
    level; any other iterable is read and its first ``skip`` batches discarded.
    """
    restore_rng(epoch_start, loader)
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None and skip > 0:
        sampler = _SkipBatches(loader.batch_sampler, skip, lambda: restore_rng(saved, loader))
        return DataLoader(loader.dataset, batch_sampler=sampler, **loading_options(loader)), "sampler"

    def reread():
        batches = iter(loader)
        for _ in range(skip):
            next(batches, None)
        restore_rng(saved, loader)
        yield from batches

    return reread(), "re-reading"
