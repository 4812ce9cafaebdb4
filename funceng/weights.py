"""A state's weights as a plain ``model.state_dict()``: what inference code and model hubs take.

`export_state_dict` gives the params and buffers under the module's own names; `save_weights` writes them as
one safetensors file (atomically), which ``safetensors.torch.load_file`` + ``model.load_state_dict`` read back,
and which ``Runner(load_from=...)`` accepts as initial weights.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from funceng import fileio
from funceng.errors import CheckpointError
from funceng.safetensors_io import write_file


def export_state_dict(state: Any) -> OrderedDict[str, torch.Tensor]:
    """The state's params then buffers, by the names ``model.state_dict()`` uses, as CPU tensors that share no
    memory with the state."""
    if "params" not in state.keys() or "buffers" not in state.keys():
        raise CheckpointError("export_state_dict: expected a TrainState (with 'params' and 'buffers')")
    items = [*state["params"].items(), *state["buffers"].items()]
    return OrderedDict((name, tensor.detach().to("cpu", copy=True).contiguous()) for name, tensor in items)


def save_weights(state: Any, path: str | os.PathLike) -> Path:
    """Writes `export_state_dict(state)` to the safetensors file ``path``, replacing it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_file(tmp, export_state_dict(state))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot save weights {path}: {exc.strerror or exc}") from exc
    fileio.fsync_dir(path.parent)
    return path
