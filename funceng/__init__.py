"""funceng: a functional, JAX-style training engine on PyTorch."""

from funceng import optim, schedules
from funceng.checkpoint import load_state, save_state
from funceng.errors import CheckpointError, ConfigError, DistributedError, DonatedStateError
from funceng.loss import parse_loss
from funceng.state import TrainState
from funceng.step import make_eval_step, make_train_step
from funceng.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DistributedError",
    "DonatedStateError",
    "TrainState",
    "__version__",
    "make_eval_step",
    "make_train_step",
    "optim",
    "load_state",
    "parse_loss",
    "save_state",
    "schedules",
]
