"""Checkpoint save and load time: funceng vs ``torch.save`` vs a bare safetensors file, side by side in one run;
and the step time while a background save is in flight.

    python benchmarks/checkpoint_io.py [--model resnet50] [--repeats 5] [--steps 12]

The state is a model's parameters and buffers plus AdamW's two moments (ResNet-50: 25.6 M parameters, about
307 MB). Every system writes durably, as a checkpoint must: ``torch.save`` and ``safetensors.torch.save_file``
write a temporary file, fsync it and rename it into place (what funceng does, which also hashes every byte with
sha256 and writes the manifest). Loads read the file just written (so from the page cache, as a resume right
after a save does) and are copied into the run's state, as a resume does (``safetensors.torch.load_file`` maps
the file lazily: without the copy it would read nothing); funceng reads straight into the state
(``load_state(into=...)``, as its resume does) and verifies every sha256 unless ``verify=False``; a load into
new tensors is shown too. Systems
alternate within each repeat; the median is reported.

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
    for key, leaf in state.items(True, True):  # moments as after training: not zeros (second moments >= 0)
        if leaf.is_floating_point() and key[0] == "opt_state":
            noise = torch.randn(leaf.shape) * 1e-3
            leaf.copy_(noise.abs() if "exp_avg_sq" in key else noise)
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
    target = state.clone()  # the run's state, which a resume fills
    names, leaves = list(tensors), [target.get(k) for k in state.keys(True, True)]

    def into_state(loaded: dict[str, torch.Tensor]) -> None:  # as a resume does: every byte read and copied
        torch._foreach_copy_(leaves, [loaded[name] for name in names])

    systems = {
        "funceng save_state / load_state(into=)": (  # what resume does: read into the run's state
            lambda p: checkpoint.save_state(state, p),
            lambda p: checkpoint.load_state(p, into=target),
        ),
        "funceng, load_state(into=, verify=False)": (
            lambda p: checkpoint.save_state(state, p),
            lambda p: checkpoint.load_state(p, into=target, verify=False),
        ),
        "funceng, load_state() to new tensors": (
            lambda p: checkpoint.save_state(state, p),
            lambda p: target.update_(checkpoint.load_state(p)[0]),
        ),
        "torch.save / torch.load": (
            lambda p: durable(lambda t: torch.save(tensors, t), p),
            lambda p: into_state(torch.load(p, weights_only=True)),
        ),
        "safetensors save_file / load_file": (
            lambda p: durable(lambda t: safetensors.torch.save_file(tensors, str(t)), p),
            lambda p: into_state(safetensors.torch.load_file(str(p))),
        ),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"save": [], "load": []} for name in systems}
    order = list(systems)
    for r in range(repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:  # each system first in turn
            save, load = systems[name]
            path = root / f"{name.split()[0]}-{r}"
            start = time.perf_counter()
            save(path)
            times[name]["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load(path)
            times[name]["load"].append(time.perf_counter() - start)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def time_steps(model, state, root: Path, steps: int, batch: int, image: int) -> dict[str, dict[str, float]]:
    import funceng
    from funceng import checkpoint, optim

    def loss(module, batch):
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1])

    step = funceng.make_train_step(model, optim.adamw(1e-3), loss, compile=False)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, 10, (batch,))
    for _ in range(2):
        state, _ = step(state, (x, y))
    results = {}
    for mode in ("no save in flight", "background save in flight", "blocking save before the steps"):
        pending = None
        start = time.perf_counter()
        if mode.startswith("background"):
            pending = checkpoint.save_state(state, root / "async", blocking=False)
        elif mode.startswith("blocking"):
            checkpoint.save_state(state, root / "async")
        pause = time.perf_counter() - start  # what the caller waited for before its next step
        durations, overlapped = [], 0
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, (x, y))
            float(metrics["loss"])
            durations.append(time.perf_counter() - start)
            overlapped += pending is not None and not pending.done()
        if pending is not None:
            pending.wait()
        if (root / "async").exists():
            shutil.rmtree(root / "async")
        results[mode] = {
            "pause_s": pause,
            "median_s": statistics.median(durations),
            "max_s": max(durations),
            "steps_overlapping_the_save": overlapped,
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
    print(f"| {'system':<42} | save (s) | load (s) | save / bare | load / bare |")
    print(f"|{'-' * 44}|---------:|---------:|------------:|------------:|")
    for name, t in io.items():
        print(
            f"| {name:<42} | {t['save']:8.3f} | {t['load']:8.3f} | "
            f"{t['save'] / bare['save']:10.2f}x | {t['load'] / bare['load']:10.2f}x |"
        )
    print(f"\ntrain step of {args.model} (batch {args.batch}, {args.image}x{args.image}), {args.steps} steps each:")
    for mode, t in steps.items():
        print(
            f"  {mode:<32} pause {t['pause_s'] * 1000:7.1f} ms, then steps: median {t['median_s'] * 1000:7.1f} ms,"
            f" worst {t['max_s'] * 1000:7.1f} ms ({t['steps_overlapping_the_save']} ran while the save was writing)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": nbytes, "io": io, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
