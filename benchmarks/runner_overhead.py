"""Runner overhead: one epoch of 128 iterations through `Runner.train()` vs the same epoch in a hand-written loop.

    python benchmarks/runner_overhead.py [--repeats 7]

Both run funceng's eager train step on the same model and data, and both are timed from building the state and
step to the end of the epoch, so the difference is the Runner itself: config building, hooks, logging (every 10
iterations), timing, batch transfer and (third row) one checkpoint per epoch.
Repeats are interleaved and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import funceng
from funceng import optim
from funceng.model import BaseModel
from funceng.runner import Runner

ITERS, BATCH = 128, 32


class Net(BaseModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x, y, mode="tensor"):
        out = self.net(x)
        return {"loss": F.cross_entropy(out, y)} if mode == "loss" else (out, y)


def data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(ITERS * BATCH, 32, generator=gen), torch.randint(0, 10, (ITERS * BATCH,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def hand_loop() -> float:
    model, loader = Net(), data()
    start = time.perf_counter()
    tx = optim.sgd(0.01, momentum=0.9)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx)
    for batch in loader:
        state, metrics = step(state, batch)
    metrics["loss"].item()
    return time.perf_counter() - start


def runner_epoch(checkpoint: bool) -> float:
    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner(
            model=Net(),
            work_dir=work_dir,
            train_dataloader=data(),
            train_cfg=dict(by_epoch=True, max_epochs=1),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
            randomness=dict(seed=0),
            default_hooks=dict(checkpoint={} if checkpoint else None),
            log_level="WARNING",
        )
        start = time.perf_counter()
        runner.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    systems = {
        "hand-written loop": hand_loop,
        "Runner, no checkpoint": lambda: runner_epoch(False),
        "Runner, checkpoint each epoch": lambda: runner_epoch(True),
    }
    for run in systems.values():
        run()
    times = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, run in systems.items():
            times[name].append(run())
    base = statistics.median(times["hand-written loop"])
    print(f"one epoch of {ITERS} iterations, batch {BATCH}, median of {args.repeats}")
    print("| system | epoch time (ms) | overhead vs hand loop (ms/epoch) |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {(median - base) * 1e3:+.1f} |")


if __name__ == "__main__":
    main()
