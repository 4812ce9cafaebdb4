"""The distributed seam: rank queries and result gathering (single process until `torch.distributed` is up)."""

from __future__ import annotations

from typing import Any

import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def collect_results(results: list[Any], size: int) -> list[Any]:
    """Every rank's ``results`` in dataset order, truncated to ``size`` (a sampler's padding removed).

    Ranks hold interleaved samples (rank r has items r, r + world, ...), as `DistributedSampler` deals them.
    """
    if not is_distributed():
        return results[:size]
    gathered: list[list[Any]] = [None] * get_world_size()  # type: ignore[list-item]
    torch_dist.all_gather_object(gathered, results)
    ordered = [item for group in zip(*gathered) for item in group]
    return ordered[:size]
