"""funceng: a functional, JAX-style training engine on PyTorch."""

from funceng import optim, schedules
from funceng.checkpoint import CheckpointError, load_state, save_state
from funceng.state import DonatedStateError, TrainState
from funceng.step import make_eval_step, make_train_step, parse_loss

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DonatedStateError",
    "TrainState",
    "make_eval_step",
    "make_train_step",
    "optim",
    "load_state",
    "parse_loss",
    "save_state",
    "schedules",
]
