"""``model_wrapper_cfg``: how a model is spread over the ranks of a distributed run.

- ``MMDistributedDataParallel`` (the default): every rank holds the whole state; the train step averages the
  gradients across ranks inside itself, so no wrapper module is needed. ``find_unused_parameters`` always holds
  (unused parameters get zero gradients).
- ``MMFullyShardedDataParallel``: FSDP2 shards the parameters and optimizer state over the ranks
  (`funceng.sharding`); ``shard_modules`` are the module classes that form FSDP units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from funceng.errors import ConfigError
from funceng.registry import MODEL_WRAPPERS
from funceng.runner import compat
from funceng.sharding import fully_shard_model


@MODEL_WRAPPERS.register(name="MMDistributedDataParallel")
def data_parallel(
    model: nn.Module, device: torch.device, world_size: int, find_unused_parameters: bool | None = None
) -> nn.Module:
    if find_unused_parameters is not None:
        compat.ignored("model_wrapper_cfg.find_unused_parameters")
    return model.to(device)


@MODEL_WRAPPERS.register(name="MMFullyShardedDataParallel")
def fully_sharded(
    model: nn.Module, device: torch.device, world_size: int, shard_modules: Sequence[type] | type = ()
) -> nn.Module:
    if world_size == 1:
        raise ConfigError(
            "model_wrapper_cfg: MMFullyShardedDataParallel shards over several ranks; start "
            "with torchrun --nproc_per_node=N and launcher='pytorch'"
        )
    classes = (shard_modules,) if isinstance(shard_modules, type) else tuple(shard_modules)
    # sharded where it is built (the CPU, say); FSDP2 moves each unit's shard to the device
    fully_shard_model(model, classes or None, device=device)
    return model.to(device)


def wrap_model(model: nn.Module, cfg: Mapping[str, Any] | None, device: torch.device, world_size: int) -> nn.Module:
    """``model`` on ``device``, sharded if ``cfg`` asks for it."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module (a BaseModel), got {type(model).__name__}")
    return MODEL_WRAPPERS.build(
        dict(cfg or {}),
        "model_wrapper_cfg",
        default_type="MMDistributedDataParallel",
        model=model,
        device=device,
        world_size=world_size,
    )
