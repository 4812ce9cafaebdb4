"""Every random-number generator funceng touches, in one place.

- The state's own generators (``state["rng"]``): a train step draws its dropout masks from them, so the same
  ``(state, batch)`` gives the same result (`generator_states`, `StateGenerators`).
- The process's global generators (torch, CUDA, numpy, Python) and a data loader's own: seeded once per run
  (`seed_everything`), and captured into checkpoints so a resumed run draws the same shuffles and augmentations
  (`capture_global`, `restore_global`, `forked_global`). Captured states are JSON-serialisable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

# -- the state's generators ------------------------------------------------------------------------------------


def generator_states(seed: int, device: torch.device) -> dict[str, Tensor]:
    """Generator states seeded with ``seed``: CPU always, CUDA too when ``device`` is CUDA."""
    states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return states


class StateGenerators:
    """Makes a step draw from the state's generators, then stores their new states back into the state.

    ``leaf_of``: the flat-leaf index of each generator in a state's leaves (``{"cpu": i, "cuda": j}``).
    """

    def __init__(self, leaf_of: dict[str, int]):
        self.cpu, self.cuda = leaf_of.get("cpu"), leaf_of.get("cuda")

    @contextlib.contextmanager
    def __call__(self, leaves: list[Tensor]) -> Iterator[None]:
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(leaves[self.cpu])
        if self.cuda is not None:
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(leaves[self.cuda])
        try:
            yield
        finally:
            leaves[self.cpu].copy_(torch.get_rng_state())
            torch.set_rng_state(saved_cpu)
            if self.cuda is not None:
                leaves[self.cuda].copy_(torch.cuda.get_rng_state())
                torch.cuda.set_rng_state(saved_cuda)


# -- the process's global generators ------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seeds Python, numpy and torch (every device); ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _encode(t: Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators a data loader and its sampler own (each once), which shuffle it instead of the global one."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    unique: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not u for u in unique):
            unique.append(g)
    return unique


def capture_global(loader: Any = None) -> dict[str, Any]:
    """The global generators (torch, CUDA, numpy, Python) and ``loader``'s own, JSON-serialisable."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": _encode(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
        "loader": [_encode(g.get_state()) for g in loader_generators(loader)],
    }
    if torch.cuda.is_available():
        states["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return states


def restore_global(states: dict[str, Any], loader: Any = None) -> None:
    """Puts back what `capture_global` captured."""
    torch.set_rng_state(_decode(states["torch"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for generator, state in zip(loader_generators(loader), states.get("loader", [])):
        generator.set_state(_decode(state))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in states["cuda"]])


def check_states(states: Any) -> str | None:
    """What is wrong with generator states read from a checkpoint (``None`` if `restore_global` can use them),
    found without changing any generator."""
    try:
        if len(_decode(states["torch"])) != len(torch.get_rng_state()):
            return "rng.torch has the wrong length"
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = states["python"]
        random.Random().setstate((version, tuple(internal), gauss_next))
        for state in list(states.get("loader", [])) + list(states.get("cuda", [])):
            _decode(state)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        return f"rng is not a set of generator states ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def forked_global(loader: Any = None) -> Iterator[None]:
    """Runs the body without moving any global generator (validation must not shift the next epoch's data)."""
    saved = capture_global(loader)
    try:
        yield
    finally:
        restore_global(saved, loader)
