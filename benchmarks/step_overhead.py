"""Per-step time: plain eager torch.optim loop vs funceng eager vs funceng compiled, side by side; and funceng
with MMEngine-style schedules (warm-up + cosine lr, cosine momentum) read from the state, eager and compiled.

    python benchmarks/step_overhead.py [--windows 15] [--steps 50]

Systems are interleaved window by window (so machine drift hits all alike) and the median window is reported.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import funceng
from funceng import optim

from workloads import WORKLOADS, make_batches, time_interleaved, workload_loss

# The comparison suite's models, as labelled in the table.
LABELS = {"mlp": "mlp 64-256-256-10, batch 128", "cnn": "small cnn 32x32, batch 32"}


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return workload_loss(model(batch[0]), batch[1])


class PlainLoop:
    """One eager ``torch.optim`` step (SGD with momentum) per call; returns the loss."""

    def __init__(self, model: nn.Module, batch):
        self.model, self.batch = model, batch
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model, self.batch)
        loss.backward()
        self.optimizer.step()
        return loss


class FuncengLoop:
    """One funceng train step (SGD with momentum) per call, threading ``self.state``; returns the loss."""

    def __init__(self, model: nn.Module, batch, compile: bool):
        tx = optim.sgd(0.01, momentum=0.9)
        self.batch = batch
        self.state = funceng.TrainState.create(model, tx)
        self.step = funceng.make_train_step(model, tx, loss_fn, compile=compile)

    def __call__(self) -> torch.Tensor:
        self.state, metrics = self.step(self.state, self.batch)
        return metrics["loss"]


class ScheduledLoop(FuncengLoop):
    """As `FuncengLoop`, with the lr and momentum in the state, set at every step from MMEngine-style schedules
    (the Runner's path: `funceng.optim.inject_hyperparams` and a table-reading ``schedule``)."""

    def __init__(self, model: nn.Module, batch, compile: bool, iterations: int = 10_000):
        from funceng.runner.param_scheduler import ScheduledHyperparams, TrainLength, schedule_tables

        schedulers = [
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, end=500),
            dict(type="CosineAnnealingLR", eta_min=1e-4, by_epoch=False, begin=500),
            dict(type="CosineAnnealingMomentum", eta_min=0.8, by_epoch=False),
        ]
        length = TrainLength(iterations, iterations, 1, by_epoch=False)
        tables = schedule_tables(schedulers, [dict(lr=0.01, momentum=0.9, dampening=0.0)], length)
        device = next(model.parameters()).device
        hyperparams = ScheduledHyperparams(tables, [None], device)
        tx = optim.inject_hyperparams(optim.sgd, ["lr", "momentum"])(lr=0.01, momentum=0.9)
        self.batch = batch
        self.state = funceng.TrainState.create(model, tx)
        hyperparams.locate(self.state["opt_state"])
        self.step = funceng.make_train_step(model, tx, loss_fn, compile=compile, schedule=hyperparams.write)


def measure(workload: str, windows: int, steps: int) -> dict[str, float]:
    spec = WORKLOADS[workload]
    torch.manual_seed(0)
    base = spec.build()
    batch = make_batches(spec, spec.batch_size)[0]
    systems = {
        "plain eager torch.optim": PlainLoop(copy.deepcopy(base), batch),
        "funceng eager": FuncengLoop(copy.deepcopy(base), batch, compile=False),
        "funceng compiled": FuncengLoop(copy.deepcopy(base), batch, compile=True),
        "funceng eager, scheduled lr + momentum": ScheduledLoop(copy.deepcopy(base), batch, compile=False),
        "funceng compiled, scheduled lr + momentum": ScheduledLoop(copy.deepcopy(base), batch, compile=True),
    }
    return time_interleaved(systems, windows, steps, warmup=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=15, help="timed windows per system (median reported)")
    parser.add_argument("--steps", type=int, default=50, help="steps per window")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, funceng {funceng.__version__}")
    print("| workload | system | step time (ms) | vs plain |")
    print("|---|---|---:|---:|")
    for workload, label in LABELS.items():
        result = measure(workload, args.windows, args.steps)
        plain = result["plain eager torch.optim"]
        for name, t in result.items():
            print(f"| {label} | {name} | {t * 1e3:.3f} | {t / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
