"""Data-parallel and sharded steps on N ranks: torch's DDP / FSDP2 with torch.optim vs funceng, side by side.

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed.py [--windows 11] [--steps 30] [--workloads mlp]

Every system trains its own copy of the same model on the same per-rank batches (SGD with momentum); systems are
interleaved window by window, each window starts and ends with a barrier, and the median window is reported by
rank 0. "State per rank" counts the parameters and optimizer state each rank holds between steps (what sharding
divides; gradients and communication buffers are not counted).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as torch_dist
from torch import nn

import funceng
from funceng import dist
from funceng.sharding import fully_shard_model
from funceng.tree import flatten

from step_overhead import FuncengLoop, PlainLoop  # benchmarks/ is the script's folder, hence on sys.path
from workloads import WORKLOADS, make_batches

LABELS = {"mlp": "mlp 64-256-256-10", "gpt": "gpt 2 layers, dim 128, context 64"}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def torch_system(model: nn.Module, batch, sharded: bool):
    if sharded:
        fully_shard_model(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    loop = PlainLoop(model, batch)

    def state_bytes():
        buffers = [v for s in loop.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return _local_bytes(list(model.parameters()) + buffers)

    return loop, state_bytes


def funceng_system(model: nn.Module, batch, sharded: bool, compile: bool):
    if sharded:
        fully_shard_model(model)
    loop = FuncengLoop(model, batch, compile)

    def state_bytes():
        return _local_bytes(flatten(loop.state["params"])[1] + flatten(loop.state["opt_state"])[1])

    return loop, state_bytes


def measure(workload: str, windows: int, steps: int, batch_size: int) -> dict[str, tuple[float, int]]:
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    base = spec.build()
    batch = make_batches(spec, batch_size)[dist.get_rank() % 4]
    systems = {
        "DDP + torch.optim": torch_system(copy.deepcopy(base), batch, sharded=False),
        "funceng data-parallel, eager": funceng_system(copy.deepcopy(base), batch, sharded=False, compile=False),
        "funceng data-parallel, compiled": funceng_system(copy.deepcopy(base), batch, sharded=False, compile=True),
        "FSDP2 + torch.optim": torch_system(copy.deepcopy(base), batch, sharded=True),
        "funceng FSDP2, eager": funceng_system(copy.deepcopy(base), batch, sharded=True, compile=False),
    }
    for run, _ in systems.values():  # warm-up, compilation included
        for _ in range(steps):
            run()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(windows):
        for name, (run, _) in systems.items():
            torch_dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                loss = run()
            loss.item()
            torch_dist.barrier()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(times[name]), state_bytes()) for name, (_, state_bytes) in systems.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=11, help="timed windows per system (median reported)")
    parser.add_argument("--steps", type=int, default=30, help="steps per window")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--workloads", nargs="+", default=list(LABELS), choices=list(LABELS))
    args = parser.parse_args()
    dist.init_distributed()
    rank0 = dist.get_rank() == 0
    if rank0:
        print(
            f"torch {torch.__version__}, {dist.get_world_size()} ranks ({torch_dist.get_backend()}), "
            f"{torch.get_num_threads()} threads per rank, batch {args.batch_size} per rank, funceng "
            f"{funceng.__version__}"
        )
        print("| workload | system | step time (ms) | vs DDP | state per rank (KiB) |")
        print("|---|---|---:|---:|---:|")
    for workload in args.workloads:
        label = LABELS[workload]
        result = measure(workload, args.windows, args.steps, args.batch_size)
        ddp = result["DDP + torch.optim"][0]
        if rank0:
            for name, (t, state_bytes) in result.items():
                print(f"| {label} | {name} | {t * 1e3:.3f} | {t / ddp:.2f}x | {state_bytes / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
