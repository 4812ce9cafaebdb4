"""torch.distributed for funceng: start-up from torchrun's environment, rank queries, the collectives a pure
step uses (functional, so they trace into a compiled graph), and gathering metric results across ranks.

Everything here is a no-op in a single process, so code written for one device runs unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from funceng.errors import DistributedError

EXIT_BARRIER_S = 10  # how long a rank that exits waits for the others to exit too


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


_cpu_group: Any = None


def cpu_group() -> Any:
    """A process group for small CPU tensors (control messages): the default group with gloo, a gloo subgroup
    with NCCL. `init_distributed` creates it on every rank."""
    return _cpu_group


def init_distributed(backend: str | None = None, timeout: float | None = None) -> None:
    """Joins the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_*``).

    ``backend`` defaults to NCCL with CUDA and gloo otherwise; ``timeout`` (seconds) bounds every collective,
    so a rank that hangs makes the others fail instead of waiting forever. On CUDA each process uses the
    device ``LOCAL_RANK``. A group that is already up is kept.
    """
    global _cpu_group
    if is_distributed():
        if _cpu_group is None:
            gloo = torch_dist.get_backend() == "gloo"
            _cpu_group = torch_dist.group.WORLD if gloo else torch_dist.new_group(backend="gloo")
        return
    if not launched_by_torchrun():
        raise DistributedError(
            "launcher='pytorch' needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start "
            "the script with `torchrun --nproc_per_node=N script.py ...`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout))
    if torch.cuda.is_available():  # one GPU per process, whatever the backend
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", local_rank)
    torch_dist.init_process_group(**kwargs)
    atexit.register(_shutdown)
    init_distributed()


def _shutdown() -> None:
    """Leaves the process group this module joined, so the backend's threads stop before the interpreter."""
    if not is_distributed():
        return
    try:  # a rank that leaves while another still talks to it can abort the other's gloo threads: leave together
        torch_dist.monitored_barrier(_cpu_group, timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
    except RuntimeError:
        pass  # a rank failed or is gone: leave now
    torch_dist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from a failed collective (a peer that died, a timeout) rather than from user code."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc).lower()
    markers = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "pair closure")
    return isinstance(exc, RuntimeError) and any(marker in text for marker in markers)


def unresponsive_ranks(grace_s: float = 3.0) -> list[int] | None:
    """After a collective failed: the ranks that did not report the failure too within ``grace_s`` seconds
    (a rank blocked in the same collective times out and reports; a stopped, hung or dead one does not), through
    the process group's store. ``None`` if the store cannot tell (the rank that hosts it is the stopped one)."""
    me, world = get_rank(), get_world_size()
    try:
        store = torch_dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=grace_s))
        store.set(f"funceng/collective_failed/{me}", "1")
        missing = [r for r in range(world) if r != me]
        deadline = time.monotonic() + grace_s
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"funceng/collective_failed/{r}"])]
            time.sleep(0.05)
        return missing
    except Exception:  # the store itself is unreachable: say nothing rather than guess
        return None


@contextlib.contextmanager
def naming_collective_failures(during: str) -> Iterator[None]:
    """Turns a failed collective (a rank died or hung) into a `DistributedError` naming this rank, the
    collective and the ranks that stopped responding."""
    try:
        yield
    except RuntimeError as exc:
        if get_world_size() > 1 and is_collective_failure(exc):
            missing = unresponsive_ranks()
            if missing:
                who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not reach it "
                who += "(stopped, hung or dead)"
            else:
                who = "another rank died or stopped responding"
            raise DistributedError(
                f"rank {get_rank()}: a collective failed during {during}: {who}; see its log (collectives time "
                f"out after env_cfg.dist_cfg.timeout). {type(exc).__name__}: {exc}"
            ) from exc
        raise


def _buckets(tensors: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device): one flat buffer, hence one collective, per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


def _group_for(device: torch.device) -> Any:
    """The process group that can carry tensors on ``device``: gloo for CPU tensors, the default group else."""
    return _cpu_group if device.type == "cpu" and _cpu_group is not None else torch_dist.group.WORLD


def mean_across_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """Every tensor averaged over the ranks, as new tensors: ``x <- (1/W) sum_r x_r``.

    Tensors of one dtype travel in one flat buffer through one ``all_reduce`` from
    `torch.distributed._functional_collectives`, which traces into a ``torch.compile`` graph.
    """
    if not is_distributed() or get_world_size() == 1 or not tensors:
        return list(tensors)
    import torch.distributed._functional_collectives as funcol

    world = get_world_size()
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for (_, device), indices in _buckets(tensors).items():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        flat = funcol.all_reduce(flat, "sum", _group_for(device)) / world
        pieces = torch.split(flat, [tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces):
            out[i] = piece.view(tensors[i].shape)
    return out


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Averages ``tensors`` over the ranks in place (eager; used between steps, e.g. for BatchNorm statistics)."""
    if not is_distributed() or get_world_size() == 1 or not tensors:
        return
    for t, mean in zip(tensors, mean_across_ranks(tensors)):
        t.copy_(mean)


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrites ``tensors`` on every rank with rank ``src``'s values (one collective per dtype)."""
    if not is_distributed() or get_world_size() == 1 or not tensors:
        return
    for (_, device), indices in _buckets(tensors).items():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        torch_dist.broadcast(flat, src, group=_group_for(device))
        for i, piece in zip(indices, torch.split(flat, [tensors[i].numel() for i in indices])):
            tensors[i].copy_(piece.view(tensors[i].shape))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (a small picklable value produced by this program, never read from disk)."""
    if not is_distributed():
        return obj
    box = [obj]
    with naming_collective_failures(f"a broadcast from rank {src}"):
        torch_dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small picklable values produced by this program), in rank order."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    with naming_collective_failures("an all-gather of values from every rank"):
        torch_dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        with naming_collective_failures("a barrier"):
            torch_dist.barrier()


def collect_results(results: list[Any], size: int) -> list[Any]:
    """Every rank's ``results``, in dataset order for per-sample results, truncated to ``size``.

    Evaluation data is dealt round-robin without padding (rank r holds items r, r + W, ...; see
    `funceng.runner.sampler.DefaultSampler`), so ranks may hold one item fewer than rank 0 and nothing is
    counted twice; the lists are interleaved back in the same round-robin order.
    """
    if not is_distributed():
        return results[:size]
    gathered = gather_objects(results)
    longest = max(len(part) for part in gathered)
    ordered = [part[i] for i in range(longest) for part in gathered if i < len(part)]
    return ordered[:size]
