"""Data for the Runner: loaders built from MMEngine's dataloader dicts, batches moved to the device, and the
position in a pass over a loader, restored exactly on resume.

Exact resumption needs a loader to replay an epoch from its start: a shuffling ``DataLoader`` draws its
permutation (and main-process transforms their randomness) from the global generators when an epoch starts. A
checkpoint therefore records the generators twice, at the start of the epoch and when it was saved; resuming
replays the start, skips the batches already trained on at the sampler level (indices only, no data is read),
then continues with the generators as they were saved.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from funceng import dist, rng, tree
from funceng.errors import ConfigError, check_keys
from funceng.registry import DATA_SAMPLERS, DATASETS, FUNCTIONS
from funceng.runner.sampler import DefaultSampler, loading_options, shard_loader


def pseudo_collate(batch: list) -> Any:
    """MMEngine's ``pseudo_collate`` (the default ``collate_fn`` of dataloader configs, as in MMEngine): samples
    transposed field by field, through dicts, tuples, lists and namedtuples, without stacking: a batch of
    ``dict(inputs=image, label=3)`` samples becomes ``dict(inputs=[images], label=[3, ...])``."""
    first = batch[0]
    if isinstance(first, (str, bytes)):
        return list(batch)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(pseudo_collate(list(field)) for field in zip(*batch)))
    if isinstance(first, Mapping):
        return type(first)({key: pseudo_collate([sample[key] for sample in batch]) for key in first})
    if isinstance(first, (list, tuple)):
        if any(len(sample) != len(first) for sample in batch):
            raise RuntimeError("pseudo_collate: every sample of a batch must have the same number of fields")
        return [pseudo_collate(list(field)) for field in zip(*batch)]
    return list(batch)


DATA_SAMPLERS.register(DefaultSampler)
FUNCTIONS.register(default_collate)
FUNCTIONS.register(pseudo_collate)


def build_dataset(cfg: Any, where: str = "dataset") -> Any:
    """A dataset from ``dict(type=DatasetClass or torchvision name, **kwargs)``; a dataset object passes through."""
    return DATASETS.build(cfg, where) if isinstance(cfg, Mapping) else cfg


def build_dataloader(cfg: Any, name: str, seed: int, train: bool) -> Any:
    """The loader for ``cfg``, holding this rank's shard in a distributed run.

    A dict builds a ``DataLoader`` whose sampler is a `DefaultSampler`: reshuffled each epoch from
    ``seed + epoch`` (so the order does not depend on the number of ranks), evaluation loaders unpadded
    (``round_up=False``). A built loader (any iterable with ``len``) is used as it is, re-sharded if needed.
    """
    loader = _from_dict(cfg, name, seed, train) if isinstance(cfg, Mapping) else cfg
    try:
        return shard_loader(loader, name, seed, train=train)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _from_dict(cfg: Mapping, name: str, seed: int, train: bool) -> DataLoader:
    cfg = dict(cfg)
    if "dataset" not in cfg:
        raise ConfigError(f"{name}: missing 'dataset'")
    if cfg.get("batch_sampler") is not None:
        raise ConfigError(
            f"{name}.batch_sampler is not supported: funceng shards, reshuffles and resumes a loader through its "
            "sampler, which a batch sampler hides; use sampler=dict(...) with batch_size"
        )
    dataset = build_dataset(cfg.pop("dataset"), f"{name}.dataset")
    num_batches = cfg.pop("num_batch_per_epoch", None)
    if num_batches is not None:  # MMEngine's debugging option: the first batches of the dataset only
        dataset = FirstSamples(dataset, num_batches * cfg.get("batch_size", 1) * dist.get_world_size())
    sampler = cfg.pop("sampler", None) or {}
    if isinstance(sampler, Mapping):
        kind = sampler.get("type", "DefaultSampler")
        if isinstance(kind, type) and kind.__name__ not in DATA_SAMPLERS:  # your own sampler class
            sampler_class = kind
        else:
            sampler_class = DATA_SAMPLERS.resolve(kind, f"{name}.sampler.type")
        if sampler_class is DefaultSampler:
            check_keys(f"{name}.sampler", sampler, {"type", "shuffle", "seed", "round_up"})
            shuffle = cfg.pop("shuffle", sampler.get("shuffle", True))
            cfg["sampler"] = sampler_class(
                dataset, shuffle=shuffle, seed=sampler.get("seed", seed) or 0, round_up=sampler.get("round_up", train)
            )
        else:  # as MMEngine builds one: with the dataset and the run's seed
            options = {k: v for k, v in sampler.items() if k != "type"}
            options.setdefault("seed", seed)
            try:
                cfg["sampler"] = sampler_class(dataset=dataset, **options)
            except TypeError as exc:
                raise ConfigError(f"{name}.sampler ({sampler_class.__name__}): {exc}") from exc
    else:
        cfg["sampler"] = sampler
    cfg.setdefault("pin_memory", torch.cuda.is_available())  # with non_blocking copies: transfers overlap compute
    collate = cfg.pop("collate_fn", {"type": "pseudo_collate"})  # MMEngine's default
    if isinstance(collate, Mapping):
        check_keys(f"{name}.collate_fn", collate, {"type"})
        collate = FUNCTIONS.resolve(collate.get("type", "pseudo_collate"), f"{name}.collate_fn.type")
    if collate is not None:
        cfg["collate_fn"] = collate
    try:
        return DataLoader(dataset, **cfg)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


class FirstSamples(torch.utils.data.Dataset):
    """The first ``length`` samples of ``dataset``; other attributes (``metainfo``, ...) are the dataset's."""

    def __init__(self, dataset: Any, length: int):
        self.dataset, self.length = dataset, min(length, len(dataset))

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "length"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is past the first {self.length} samples (num_batch_per_epoch)")
        return self.dataset[index]

    def __len__(self) -> int:
        return self.length


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device`` (copied without blocking; pinned loaders overlap)."""
    return tree.map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def is_ragged(loader: Any) -> bool:
    """Whether a loader's last batch is smaller than the others (so a compiled step must allow any size)."""
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    if not batch_size or getattr(loader, "drop_last", False) or not hasattr(dataset, "__len__"):
        return False
    return len(dataset) % batch_size != 0


def resume_position(loader: Any, skip: int, epoch_start: dict, saved: dict) -> tuple[Any, str]:
    """An iterable over ``loader``'s current epoch from batch ``skip`` on, with the generators as they were saved
    (``epoch_start`` and ``saved``: `funceng.rng.capture_global` states).

    Returns the iterable and how the batches were skipped. A map-style `DataLoader` skips at the sampler
    level; any other iterable is read and its first ``skip`` batches discarded.
    """
    rng.restore_global(epoch_start, loader)
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None and skip > 0:
        return train_pass_loader(loader, skip, lambda: rng.restore_global(saved, loader)), "sampler"

    def reread():
        batches = iter(loader)
        for _ in range(skip):
            next(batches, None)
        rng.restore_global(saved, loader)
        yield from batches

    return reread(), "re-reading"


def train_pass_loader(loader: Any, skip: int = 0, on_skipped: Callable[[], None] | None = None) -> Any:
    """The loader one training pass reads: ``loader`` itself, or for a map-style `DataLoader` that has worker
    processes or must skip batches, a copy of it whose batches are seeded and numbered.

    In a worker process, each batch is loaded with torch's, numpy's and Python's generators seeded from the
    pass's seed (drawn from the loader's generator when the pass starts) and the batch's index, so its random
    augmentations depend on neither the worker that loads it nor the batches before it: skipping the first
    ``skip`` batches on resume gives the same data as the uninterrupted pass. Workers ignore SIGTERM and SIGINT:
    the main process handles them (saving a checkpoint) and stops the workers itself.
    """
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None or (loader.num_workers == 0 and not skip):
        return loader
    options = loading_options(loader)
    if loader.num_workers > 0:
        options["worker_init_fn"] = _WorkerInit(loader.worker_init_fn)
    seeded = loader.num_workers > 0
    batches = _SeededBatches(loader.batch_sampler, loader.generator, skip, on_skipped or (lambda: None), seeded)
    return DataLoader(_SeededDataset(loader.dataset), batch_sampler=batches, **options)


class _SeededBatch(list):
    """A batch of indices that carries the seed its samples are loaded with."""

    seed: int


class _SeededBatches(Sampler):
    """``batch_sampler``'s batches from ``skip`` on, each a `_SeededBatch` (with a seed if ``seeded``);
    ``on_skipped`` runs once they are skipped."""

    def __init__(self, batch_sampler: Any, generator: Any, skip: int, on_skipped: Callable[[], None], seeded: bool):
        self.batch_sampler, self.generator, self.skip, self.on_skipped = batch_sampler, generator, skip, on_skipped
        self.seeded = seeded

    def __iter__(self):
        # drawn only for worker processes: a single-process pass must draw exactly what the plain loader draws
        pass_seed = int(torch.randint(2**62, (), generator=self.generator)) if self.seeded else 0
        batches = iter(self.batch_sampler)
        for _ in range(self.skip):
            next(batches, None)
        self.on_skipped()
        for index, indices in enumerate(batches, self.skip):
            batch = _SeededBatch(indices)
            batch.seed = (pass_seed + index * 0x9E3779B97F4A7C15) % 2**63
            yield batch

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


class _SeededDataset(torch.utils.data.Dataset):
    """``dataset``, fetched a batch at a time; in a worker process the generators are first seeded from the
    batch's seed."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getitems__(self, batch: list) -> list:
        if isinstance(batch, _SeededBatch) and torch.utils.data.get_worker_info() is not None:
            rng.seed_everything(batch.seed)
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(list(batch)) if fetch else [self.dataset[i] for i in batch]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


class _WorkerInit:
    """A worker's start: SIGTERM and SIGINT ignored (the main process handles them), then ``user_fn``."""

    def __init__(self, user_fn: Callable[[int], None] | None):
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.user_fn is not None:
            self.user_fn(worker_id)


def runner_build_dataloader(dataloader: Any, seed: int | None = None, diff_rank_seed: bool = False) -> Any:
    """MMEngine's ``Runner.build_dataloader``: a loader from a dataloader dict (a built one passes through)."""
    if diff_rank_seed:
        raise ConfigError("Runner.build_dataloader(diff_rank_seed=True) is not supported: the data order is shared")
    return build_dataloader(dataloader, "dataloader", seed or 0, train=True)
