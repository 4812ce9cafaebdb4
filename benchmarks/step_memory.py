"""Peak tensor memory of one train step: a plain eager torch.optim loop vs funceng's eager step.

    python benchmarks/step_memory.py [--workloads mlp cnn resnet18 gpt] [--optimizers sgd adamw]

CPU has no allocator statistics, so memory is counted exactly instead of read from RSS (which mostly measures
imports and the compiler): peak = the bytes of every live CPU tensor storage before a step (found through the
garbage collector, so a hidden second copy of the weights anywhere in the process counts) + the highest running
sum of allocations minus frees during the step (``torch.profiler`` with ``profile_memory``). Each system runs in a
fresh process after two warm-up steps.

Compiled steps are left out: the code inductor generates for the CPU allocates its buffers without going through
the dispatcher, so the profiler cannot see them. On CUDA, ``funceng bench`` reports ``max_memory_allocated`` for
every system, compiled ones included.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

from workloads import WORKLOADS, make_batches, workload_loss


def _live_tensor_bytes() -> int:
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # fake tensors the compiler keeps have no data
                continue
    return sum(seen.values())


def _step_peak(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _worker(workload: str, optimizer: str, system: str) -> None:
    import torch

    import funceng
    from funceng import optim

    torch.manual_seed(0)
    spec = WORKLOADS[workload]
    batch = make_batches(spec, spec.batch_size)[0]
    model = spec.build()
    loss_fn = lambda m, b: workload_loss(m(b[0]), b[1])  # noqa: E731
    if system == "torch.optim eager":
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            if optimizer == "sgd"
            else torch.optim.AdamW(model.parameters(), lr=1e-3)
        )

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()
    else:
        tx = optim.sgd(0.01, momentum=0.9) if optimizer == "sgd" else optim.adamw(1e-3)
        holder = [funceng.TrainState.create(model, tx)]
        train_step = funceng.make_train_step(model, tx, loss_fn, compile=False)

        def step():
            holder[0], _ = train_step(holder[0], batch)

    for _ in range(2):
        step()
    gc.collect()
    persistent = _live_tensor_bytes()
    transient = _step_peak(step)
    print(json.dumps([persistent, transient]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=["mlp", "cnn", "resnet18", "gpt"])
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "adamw"], default=["sgd", "adamw"])
    parser.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "OPTIMIZER", "SYSTEM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(*args.worker)
    print("| workload | optimizer | system | live before step (MB) | in-step peak (MB) | peak (MB) | vs torch.optim |")
    print("|---|---|---|---:|---:|---:|---:|")
    for workload in args.workloads:
        for optimizer in args.optimizers:
            base = None
            for system in ("torch.optim eager", "funceng eager"):
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", workload, optimizer, system], capture_output=True, text=True
                )
                if done.returncode:
                    raise RuntimeError(f"{workload}/{optimizer}/{system} failed ({done.returncode}):\n{done.stderr}")
                persistent, transient = json.loads(done.stdout.strip().splitlines()[-1])
                peak = persistent + transient
                base = base or peak
                print(
                    f"| {workload} (batch {WORKLOADS[workload].batch_size}) | {optimizer} | {system} | "
                    f"{persistent / 2**20:.1f} | {transient / 2**20:.1f} | {peak / 2**20:.1f} | "
                    f"{peak / base:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
