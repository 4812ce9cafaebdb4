"""Memory and compiles of a two-module (GAN-style) training loop over many steps, eager vs compiled.

    python benchmarks/gan_memory.py [--steps 1000] [--width 256]

Two funceng states and two train steps alternate, as in ``examples/gan_two_steps.py``: the generator's loss runs
through the discriminator, whose parameters require grad. A step that let autograd record its optimizer arithmetic
would chain every step's state to the last one, and memory would grow with the step count. Each system runs in a
fresh process and reports:

- memory at step 100 and at the last step: on CUDA the allocator's peak over the steps since the previous mark
  (``max_memory_allocated``); on the CPU, whose allocator keeps no statistics, the process's resident set size,
  the highest of the last 10 steps before each mark;
- the graphs compiled (``unique_graphs``) and recompilations over the whole run (one graph per step object is
  expected: two);
- state leaves that carry autograd history at the end (expected: none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WINDOW = 10


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(compile: bool, steps: int, width: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch._dynamo.utils import counters

    import funceng
    from funceng import optim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
    discriminator = nn.Sequential(nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
    generator, discriminator = generator.to(device), discriminator.to(device)
    tx_g, tx_d = optim.adam(1e-4), optim.adam(1e-4)
    state_g, state_d = funceng.TrainState.create(generator, tx_g), funceng.TrainState.create(discriminator, tx_d)

    def generator_loss(g, noise):
        logits = discriminator(g(noise))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def discriminator_loss(d, batch):
        noise, real = batch
        real_logits, fake_logits = d(real), d(generator(noise).detach())
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    step_g = funceng.make_train_step(generator, tx_g, generator_loss, compile=compile)
    step_d = funceng.make_train_step(discriminator, tx_d, discriminator_loss, compile=compile)
    counters.clear()
    data = torch.Generator(device=device).manual_seed(0)
    marks, recent = {}, []
    for i in range(1, steps + 1):
        noise = torch.randn(64, 16, generator=data, device=device)
        real = torch.randn(64, 2, generator=data, device=device) + 3
        state_d, _ = step_d(state_d, (noise, real))
        state_g, metrics = step_g(state_g, noise)
        if device == "cuda":
            if i in (100, steps):
                torch.cuda.synchronize()
                marks[i] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        else:
            recent = [*recent[-(WINDOW - 1) :], _rss_bytes()]
            if i in (100, steps):
                marks[i] = max(recent)
    with_history = [
        key for s in (state_g, state_d) for key, v in s.items(include_nested=True, leaves_only=True) if v.requires_grad
    ]
    print(
        json.dumps(
            {
                "memory": marks,
                "unique_graphs": counters["stats"]["unique_graphs"],
                "recompiles": sum(counters["recompiles"].values()),
                "leaves_with_history": len(with_history),
                "final_loss": metrics["loss"].item(),
                "device": device,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker == "compiled", args.steps, args.width)
        return
    print(f"GAN-style alternating steps, width {args.width}, {args.steps} steps of each network")
    print(f"{'system':18s} {'memory @100':>12s} {f'@{args.steps}':>12s} {'change':>8s} {'graphs':>7s} "
          f"{'recompiles':>10s} {'history':>8s}")  # fmt: skip
    for system in ("eager", "compiled"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", system, "--steps", str(args.steps), "--width", str(args.width)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        first, last = result["memory"]["100"], result["memory"][str(args.steps)]
        change = 100.0 * (last - first) / first
        print(
            f"funceng {system:10s} {first / 2**20:10.1f}MB {last / 2**20:10.1f}MB {change:+7.2f}% "
            f"{result['unique_graphs']:7d} {result['recompiles']:10d} {result['leaves_with_history']:8d}"
        )
    print("memory: " + ("CUDA allocator peak" if result["device"] == "cuda" else "process RSS (CPU)"))


if __name__ == "__main__":
    main()
