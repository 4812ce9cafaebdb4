"""funceng: a functional, JAX-style training engine on PyTorch.

The names below are imported on first use (PEP 562), so ``import funceng`` and ``funceng --help`` /
``funceng --version`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from funceng.version import __version__ as __version__

_WHERE = {  # name -> the module that defines it
    "CheckpointError": "funceng.errors",
    "ConfigError": "funceng.errors",
    "DistributedError": "funceng.errors",
    "DonatedStateError": "funceng.errors",
    "Config": "funceng.config",
    "Registry": "funceng.registry",
    "TrainState": "funceng.state",
    "export_state_dict": "funceng.weights",
    "save_weights": "funceng.weights",
    "load_state": "funceng.checkpoint",
    "save_state": "funceng.checkpoint",
    "make_eval_step": "funceng.step",
    "make_train_step": "funceng.step",
    "parse_loss": "funceng.loss",
}
_SUBMODULES = ("optim", "schedules", "metrics", "population", "privacy")

__all__ = sorted([*_WHERE, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"funceng.{name}")
    else:
        raise AttributeError(f"module 'funceng' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
