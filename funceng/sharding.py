"""Sharded training state for models that do not fit one device: FSDP2 (``torch.distributed.fsdp.fully_shard``).

`fully_shard_model` shards every parameter by rows (dim 0) over the ranks. A `TrainState` created for such a
model holds each rank's *local* rows: its params are the very storage of the model's sharded parameters, and
the optimizer's per-parameter state (momentum, Adam moments) has the same local shapes, so the whole state is
split W ways. In a step FSDP2 gathers full parameters for the forward and backward of each module and
reduce-scatters (averages) the gradients; the optimizer then updates the local rows in place.

A `ShardLayout` says which leaves of a state are row shards of which full tensor, for sharded checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funceng import dist, tree

ModuleChoice = Callable[[nn.Module], bool] | type | tuple[type, ...]


def fully_shard_model(
    model: nn.Module, shard_modules: ModuleChoice | None = None, device: torch.device | None = None
) -> nn.Module:
    """Applies FSDP2's ``fully_shard`` to the chosen submodules, then to ``model``, over all ranks (in place).

    Each chosen submodule is one unit whose full parameters exist only during its own forward and backward.
    ``shard_modules``: a module class, several, or a predicate; default: the model's direct children that have
    parameters.
    The model is first made identical on all ranks (rank 0's weights), as data-parallel training requires.
    ``device`` (default: where the parameters are): build the model on the CPU and pass the GPU here, and FSDP2
    moves each unit there as it shards it, so the whole model never sits on one GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_distributed():
        raise dist.DistributedError("fully_shard_model needs torch.distributed to be running (start with torchrun)")
    dist.broadcast_([p.detach() for p in model.parameters()] + list(model.buffers()))
    mesh = init_device_mesh((device or next(model.parameters()).device).type, (dist.get_world_size(),))
    if shard_modules is None:
        units = [m for m in model.children() if any(True for _ in m.parameters())]
    else:
        if isinstance(shard_modules, (type, tuple, list)):
            classes = (shard_modules,) if isinstance(shard_modules, type) else tuple(shard_modules)
            shard_modules = lambda m: isinstance(m, classes)  # noqa: E731
        units = [m for m in model.modules() if m is not model and shard_modules(m)]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local_params(model: nn.Module) -> dict[str, Tensor]:
    """``{name: this rank's rows}``, sharing storage with the model's sharded parameters."""
    return {name: p.detach().to_local() for name, p in model.named_parameters()}


def check_shares_storage(model: nn.Module, params: list[Tensor]) -> None:
    """Raises unless ``params`` are the storage of the sharded ``model``'s parameters, in order: a sharded
    model computes with its own parameters, so a copy of its state would silently not be trained."""
    for (name, param), leaf in zip(model.named_parameters(), params, strict=True):
        if leaf.untyped_storage().data_ptr() != param.to_local().untyped_storage().data_ptr():
            raise ValueError(
                f"state params[{name!r}] is not the storage of the sharded model's parameter: use the state that "
                "TrainState.create(model, tx) returned (steps update it in place; load a checkpoint into it with "
                "state.update_(loaded)), not a copy"
            )


@dataclass(frozen=True)
class RowShard:
    """Rows ``[start, start + rows)`` of a full tensor of shape ``shape``."""

    shape: tuple[int, ...]
    start: int
    rows: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.rows, *self.shape[1:])


def row_shard(full_shape: tuple[int, ...], rank: int, world: int) -> RowShard:
    """FSDP2's split of dim 0: ``ceil(n / W)`` rows per rank, the last ranks possibly fewer or none."""
    n = full_shape[0]
    per_rank = math.ceil(n / world)
    start = min(rank * per_rank, n)
    return RowShard(tuple(full_shape), start, min(per_rank, n - start))


ShardLayout = dict[int, RowShard]


def _layout(model: nn.Module, template: dict, shapes: list[tuple[int, ...]], full: bool) -> ShardLayout:
    shards = {
        name: row_shard(tuple(p.shape), dist.get_rank(), dist.get_world_size()) for name, p in model.named_parameters()
    }
    layout: ShardLayout = {}
    for part in ("params", "opt_state"):
        for path, index in tree.walk(template.get(part, {})):
            shard = shards.get(path[-1]) if path else None
            if shard is not None and tuple(shapes[index]) == (shard.shape if full else shard.local_shape):
                layout[index] = shard
    return layout


def shard_layout(model: nn.Module, state) -> ShardLayout:
    """The row shards among the leaves of a sharded ``state`` (by flat leaf index): every parameter, and every
    optimizer leaf keyed by a parameter's name with that parameter's local shape (momentum, moments, ...)."""
    template, leaves = tree.flatten(state)
    return _layout(model, template, [tuple(leaf.shape) for leaf in leaves], full=False)


def checkpoint_shard_layout(model: nn.Module) -> Callable[[dict, list], ShardLayout]:
    """For `funceng.checkpoint.load_state`: given a checkpoint's structure and full leaf shapes, the leaves
    this rank loads only its rows of (the same rule as `shard_layout`, on full shapes)."""
    return lambda template, shapes: _layout(model, template, shapes, full=True)
