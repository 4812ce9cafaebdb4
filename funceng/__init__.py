"""funceng: a functional, JAX-style training engine on PyTorch."""

from funceng import optim, schedules
from funceng.checkpoint import load_state, save_state
from funceng.config import Config
from funceng.errors import CheckpointError, ConfigError, DistributedError, DonatedStateError
from funceng.loss import parse_loss
from funceng.registry import Registry
from funceng.state import TrainState
from funceng.step import make_eval_step, make_train_step
from funceng.version import __version__
from funceng.weights import export_state_dict, save_weights

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DistributedError",
    "DonatedStateError",
    "Registry",
    "TrainState",
    "__version__",
    "export_state_dict",
    "make_eval_step",
    "make_train_step",
    "optim",
    "load_state",
    "parse_loss",
    "save_state",
    "save_weights",
    "schedules",
]
