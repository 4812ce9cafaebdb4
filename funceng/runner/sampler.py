"""`DefaultSampler` (MMEngine's sampler: epoch-seeded shuffling, one shard per rank) and re-wrapping of user-built
data loaders for distributed runs.

The order of a pass depends only on ``(seed, epoch)``, and rank r takes every W-th index of it, so the samples
of global batch k are the same for any number of ranks whose per-rank batch sizes add up to the same global
batch: training on 1 rank with batch B or on 2 ranks with B/2 sees the same data in the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from funceng.dist import get_rank, get_world_size


class DefaultSampler(Sampler[int]):
    """Indices of this rank's shard of ``dataset``, reshuffled every epoch from ``seed + epoch``.

    ``round_up=True`` (training) pads the pass by repeating its first indices so every rank has the same number
    of samples, hence of steps (their collectives must pair up). ``round_up=False`` (evaluation) does not pad:
    ranks hold ``ceil`` or ``floor`` of ``n / W`` samples and no sample is evaluated twice. ``rank`` and
    ``world_size`` default to the process group's.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int = 0,
        round_up: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.dataset, self.shuffle, self.seed, self.round_up = dataset, shuffle, seed, round_up
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.epoch = 0
        n = len(dataset)
        self.total_size = math.ceil(n / self.world_size) * self.world_size if round_up else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        if self.round_up and n:
            indices = (indices * math.ceil(self.total_size / n))[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.total_size, self.world_size))


def shard_loader(loader: object, name: str, seed: int, train: bool) -> object:
    """``loader`` with a `DefaultSampler` for this rank (in a distributed run), everything else unchanged.

    A loader that already has a `DefaultSampler` or `DistributedSampler` is kept. A `DataLoader` with the
    default random or sequential sampler is rebuilt around the same dataset; anything else (a custom sampler or
    batch sampler, an iterable dataset, a non-`DataLoader` iterable) cannot be sharded safely and is refused.
    """
    if get_world_size() == 1 or loader is None:
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{name}: a {type(loader).__name__} cannot be sharded across ranks; pass a torch DataLoader or a "
            f"config dict (dict(dataset=..., batch_size=..., sampler=dict(type='DefaultSampler')))"
        )
    if isinstance(loader.sampler, (DefaultSampler, DistributedSampler)):
        return loader
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or loader.batch_size is None:
        raise TypeError(
            f"{name}: its {type(loader.sampler).__name__} / {type(loader.batch_sampler).__name__} cannot be "
            "sharded across ranks automatically; build it with sampler=funceng.runner.DefaultSampler(dataset, "
            "...) or torch's DistributedSampler"
        )
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DefaultSampler(loader.dataset, shuffle=shuffle and train, seed=seed, round_up=train)
    return DataLoader(
        loader.dataset,
        sampler=sampler,
        batch_size=loader.batch_size,
        drop_last=loader.drop_last,
        **loading_options(loader),
    )


def loading_options(loader: DataLoader) -> dict:
    """How ``loader`` loads (workers, collation, pinning, ...), to rebuild it around another sampler."""
    options = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return options
