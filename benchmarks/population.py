"""Population training throughput, side by side: N members trained by one vmapped funceng step (eager and
compiled) vs N sequential funceng steps vs N sequential plain ``torch.optim`` loops; and DP-SGD's cost.

    python benchmarks/population.py [--members 1 4 16 64] [--windows 5] [--steps 10] [--quick]

Models: ``mlp`` (64-128-128-10, batch 64: the digits as flat vectors) and ``cnn`` (the digits CNN of
``examples/digits_cnn.py``: three conv-BN-ReLU layers on 8x8 images, batch 64). Every system trains N members
with Adam on the same batch. Systems are interleaved window by window (drift hits all alike); the median window
is reported as member-steps per second (N x steps per second) and as the speed-up over the plain loops. A window
is ``max(2, steps * 4 / N)`` calls, so every N takes about as long to measure.

DP-SGD: one funceng step with per-example gradients, clipping and noise (`funceng.privacy.DPSGD`) vs the plain
funceng step, eager and compiled, and Opacus's ``GradSampleModule`` + ``DPOptimizer`` on the same model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import funceng
from funceng import optim, population
from funceng.population_step import make_population_step
from funceng.privacy import DPSGD

from workloads import time_interleaved

BATCH = 64


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), nn.Flatten(), nn.Linear(64 * 4 * 4, 10)
    )


MODELS = {"mlp": (mlp, (BATCH, 64)), "cnn": (cnn, (BATCH, 1, 8, 8))}


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def make_batch(shape: tuple[int, ...]):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)


def plain_loops(build: Callable, n: int, batch) -> Callable[[], None]:
    models = [build() for _ in range(n)]
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

    def run() -> None:
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()

    return run


def funceng_sequential(build: Callable, n: int, batch, compile: bool) -> Callable[[], None]:
    tx = optim.adam(1e-3)
    if compile:  # one compiled step, N states: a new model per member would recompile N times
        model = build()
        states = [funceng.TrainState.create(build(), tx, seed=i) for i in range(n)]
        steps = [funceng.make_train_step(model, tx, loss_fn, compile=True)] * n
    else:
        models = [build() for _ in range(n)]
        states = [funceng.TrainState.create(m, tx, seed=i) for i, m in enumerate(models)]
        steps = [funceng.make_train_step(m, tx, loss_fn, compile=False) for m in models]

    def run() -> None:
        for i, step in enumerate(steps):
            states[i], _ = step(states[i], batch)

    return run


def funceng_population(build: Callable, n: int, batch, compile: bool) -> Callable[[], None]:
    tx = optim.adam(1e-3)
    holder = {"state": population.create(build, tx, seeds=range(n))}
    step = make_population_step(build(), tx, loss_fn, members=n, compile=compile)

    def run() -> None:
        holder["state"], _ = step(holder["state"], batch)

    return run


def time_systems(systems: dict[str, Callable[[], None]], windows: int, calls: int) -> dict[str, float]:
    return time_interleaved(systems, windows, calls, warmup=3)  # 3 untimed calls: compilation excluded


def population_table(members: list[int], windows: int, steps: int, models: list[str]) -> list[str]:
    rows = ["| model | N | system | member-steps/s | vs N plain loops |", "|---|---:|---|---:|---:|"]
    for model_name in models:
        build, shape = MODELS[model_name]
        batch = make_batch(shape)
        for n in members:
            torch._dynamo.reset()  # torch.compile caches 8 compilations of one function: each N starts afresh
            torch.manual_seed(0)
            systems = {
                "N plain torch.optim loops": plain_loops(build, n, batch),
                "N funceng steps, eager": funceng_sequential(build, n, batch, compile=False),
                "N funceng steps, compiled": funceng_sequential(build, n, batch, compile=True),
                "population step, eager": funceng_population(build, n, batch, compile=False),
                "population step, compiled": funceng_population(build, n, batch, compile=True),
            }
            calls = max(2, round(steps * 4 / n))  # fewer calls per window for larger N: each call trains N members
            result = time_systems(systems, windows, calls)
            plain = result["N plain torch.optim loops"]
            for name, seconds in result.items():
                rows.append(f"| {model_name} | {n} | {name} | {n / seconds:,.0f} | {plain / seconds:.2f}x |")
                print(rows[-1], flush=True)
    return rows


def dp_table(windows: int, steps: int) -> list[str]:
    import opacus
    import opacus.optimizers

    torch._dynamo.reset()
    build, shape = MODELS["mlp"]
    batch = make_batch(shape)
    tx = optim.adam(1e-3)
    privacy = DPSGD(max_norm=1.0, noise_multiplier=1.0)
    systems: dict[str, Callable[[], None]] = {}
    for label, compile in (("eager", False), ("compiled", True)):
        for dp in (False, True):
            model = build()
            holder = {"state": funceng.TrainState.create(model, tx)}
            step = funceng.make_train_step(model, tx, loss_fn, compile=compile, privacy=privacy if dp else None)

            def run(step=step, holder=holder) -> None:
                holder["state"], _ = step(holder["state"], batch)

            systems[f"funceng {'DP-SGD' if dp else 'plain'} step, {label}"] = run
    model = opacus.GradSampleModule(build())
    dp_optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=BATCH,
    )

    def opacus_step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        dp_optimizer.step()

    systems["Opacus GradSampleModule + DPOptimizer"] = opacus_step
    plain_torch = plain_loops(build, 1, batch)
    systems["plain torch.optim loop"] = plain_torch
    result = time_systems(systems, windows, steps)
    rows = ["| system (mlp, batch 64) | step time (ms) | vs funceng plain eager |", "|---|---:|---:|"]
    base = result["funceng plain step, eager"]
    for name, seconds in result.items():
        rows.append(f"| {name} | {seconds * 1e3:.3f} | {seconds / base:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--windows", type=int, default=5, help="timed windows per system (median reported)")
    parser.add_argument("--steps", type=int, default=10, help="calls per window at N = 4 (scaled by 4 / N)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="N = 1 and 4, 2 windows of 2 calls (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.members, args.windows, args.steps = [1, 4], 2, 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, funceng {funceng.__version__}")
    population_table(args.members, args.windows, args.steps, args.models)
    print()
    dp_table(args.windows, args.steps)


if __name__ == "__main__":
    main()
