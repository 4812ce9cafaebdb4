"""Checkpoint save and load time: funceng vs ``torch.save`` vs a bare safetensors file, side by side in one run;
and the step time while a background save is in flight.

    python benchmarks/checkpoint_io.py [--model resnet50] [--repeats 5] [--steps 12]

The state is a model's parameters and buffers plus AdamW's two moments (ResNet-50: 25.6 M parameters, about
307 MB). Every system writes durably, as a checkpoint must: ``torch.save`` and ``safetensors.torch.save_file``
write a temporary file, fsync it and rename it into place (what funceng does, which also hashes every byte with
sha256 and writes the manifest). Loads read the file just written (so from the page cache, as a resume right
after a save does); funceng's load verifies every sha256. Systems alternate within each repeat; the median is
reported.

The step-time part times funceng train steps of the same model with no save in flight, then with
``save_state(..., blocking=False)`` started before the first step, and reports the median and the worst step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def build(model_name: str):
    import funceng
    from funceng import optim

    torch.manual_seed(0)
    if model_name == "tiny":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        model(torch.zeros(1, 3, 32, 32))
    else:
        import torchvision

        model = getattr(torchvision.models, model_name)(weights=None)
    state = funceng.TrainState.create(model, optim.adamw(1e-3))
    for leaf in state.values(True, True):  # moments as after training: not zeros
        if leaf.is_floating_point():
            leaf.copy_(torch.randn(leaf.shape))
    return model, state


def durable(write, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def flat(state) -> dict[str, torch.Tensor]:
    return {"/".join(k) if isinstance(k, tuple) else k: v.contiguous() for k, v in state.items(True, True)}


def time_io(state, root: Path, repeats: int) -> dict[str, dict[str, float]]:
    import safetensors.torch

    from funceng import checkpoint

    tensors = flat(state)
    systems = {
        "funceng save_state / load_state": (
            lambda p: checkpoint.save_state(state, p),
            lambda p: checkpoint.load_state(p),
        ),
        "torch.save / torch.load": (
            lambda p: durable(lambda t: torch.save(tensors, t), p),
            lambda p: torch.load(p, weights_only=True),
        ),
        "safetensors save_file / load_file": (
            lambda p: durable(lambda t: safetensors.torch.save_file(tensors, str(t)), p),
            lambda p: safetensors.torch.load_file(str(p)),
        ),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"save": [], "load": []} for name in systems}
    for r in range(repeats):
        for name, (save, load) in systems.items():
            path = root / f"{name.split()[0]}-{r}"
            start = time.perf_counter()
            save(path)
            times[name]["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = load(path)
            times[name]["load"].append(time.perf_counter() - start)
            del loaded
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def time_steps(model, state, root: Path, steps: int, batch: int, image: int) -> dict[str, dict[str, float]]:
    import funceng
    from funceng import checkpoint, optim

    step = funceng.make_train_step(model, optim.adamw(1e-3), compile=False)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, 10, (batch,))
    for _ in range(2):
        state, _ = step(state, (x, y))
    results = {}
    for mode in ("no save in flight", "background save in flight"):
        pending = checkpoint.save_state(state, root / "async", blocking=False) if "background" in mode else None
        durations = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, (x, y))
            float(metrics["loss"])
            durations.append(time.perf_counter() - start)
        save_done = pending.done() if pending is not None else None
        if pending is not None:
            pending.wait()
            shutil.rmtree(root / "async")
        results[mode] = {
            "median_s": statistics.median(durations),
            "max_s": max(durations),
            "save_still_running_after": save_done is False,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, state = build(args.model)
    nbytes = sum(t.numel() * t.element_size() for t in state.values(True, True))
    with tempfile.TemporaryDirectory(dir=os.environ.get("CHECKPOINT_BENCH_DIR")) as tmp:
        io = time_io(state, Path(tmp), args.repeats)
        steps = time_steps(model, state, Path(tmp), args.steps, args.batch, args.image)
    bare = io["safetensors save_file / load_file"]
    print(f"{args.model} + AdamW state: {nbytes / 1e6:.0f} MB, median of {args.repeats}, durable writes")
    print(f"| {'system':<36} | save (s) | load (s) | save / bare | load / bare |")
    print(f"|{'-' * 38}|---------:|---------:|------------:|------------:|")
    for name, t in io.items():
        print(
            f"| {name:<36} | {t['save']:8.3f} | {t['load']:8.3f} | "
            f"{t['save'] / bare['save']:10.2f}x | {t['load'] / bare['load']:10.2f}x |"
        )
    print(f"\ntrain step of {args.model} (batch {args.batch}, {args.image}x{args.image}), {args.steps} steps each:")
    for mode, t in steps.items():
        running = " (the save was still running after the last step)" if t["save_still_running_after"] else ""
        print(f"  {mode:<28} median {t['median_s'] * 1000:8.1f} ms   worst {t['max_s'] * 1000:8.1f} ms{running}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": nbytes, "io": io, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
