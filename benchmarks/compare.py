"""The comparison suite: one training job through several systems, measured side by side.

    python benchmarks/compare.py [--quick] [--workloads mlp cnn resnet18 gpt] [--results benchmarks/RESULTS.md]
    funceng bench ...                                    (the same, from a source checkout)

Systems: (a) a hand-written eager PyTorch loop, (b) the same loop on ``torch.compile(model)``, (c) MMEngine's
Runner and (d) Lightning's Trainer when installed (``pip install funceng[bench]``), (e) funceng's Runner eager,
(f) compiled and (g) compiled with CUDA graphs (CUDA only). Workloads: an MLP, a small CNN, ResNet-18 on
CIFAR-shaped data and a small GPT-style decoder; all train with SGD (momentum 0.9), bf16 autocast on CUDA.

Each (system, workload) pair runs in its own process. A controller called after every train step (a hook, a
callback or a line of the loop) reports to this process and waits, so timed windows are interleaved across
systems and machine drift affects them alike. Reported: steps/s (median window after a warm-up window), the
ratio to (a), time to first step (set-up and compilation; for compiled systems also from a second launch that
finds the compile cache warm), and peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS above the
process's RSS before the model was built).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from workloads import WORKLOADS, make_batches, workload_loss  # benchmarks/ is the script's folder, hence on sys.path

SYSTEMS = {
    "a": "torch eager loop",
    "b": "torch loop, torch.compile(model)",
    "c": "MMEngine Runner",
    "d": "Lightning Trainer",
    "e": "funceng eager",
    "f": "funceng compiled",
    "g": "funceng compiled + CUDA graphs",
}
COMPILED = {"b", "f", "g"}
LR, MOMENTUM = 0.01, 0.9


# -- the worker side ------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from inside a trainer's loop to end the run."""


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Controller:
    """Called after every train step: reports the first step and each timed window, then waits for a command."""

    def __init__(self, conn, steps: int, device):
        self.conn, self.steps, self.device = conn, steps, device
        self.count, self.first = 0, True
        self.start = time.perf_counter()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def after_step(self) -> None:
        self.count += 1
        if self.first:
            self._sync()
            self.first = False
            self.conn.send(("ready", time.perf_counter() - self.start))
            self._wait()
        elif self.count == self.steps:
            self._sync()
            self.conn.send(("window", time.perf_counter() - self.start))
            self._wait()

    def _wait(self) -> None:
        if self.conn.recv() != "window":
            raise _Stop
        self.count, self.start = 0, time.perf_counter()


def _device_batches(batches, device):
    return [(x.to(device), y.to(device)) for x, y in batches] if device.type == "cuda" else batches


def _torch_loop(model, batches, ctl, device, amp, compiled):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    forward = torch.compile(model) if compiled else model
    batches = _device_batches(batches, device)
    while True:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = workload_loss(forward(x), y)
            loss.backward()
            opt.step()
            ctl.after_step()


def _dataloader(batches):
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False)


def _mmengine_style(base_model: type, hook: type, model, ctl) -> tuple[Any, Any]:
    """The workload as a BaseModel and the controller as a hook, for MMEngine's Runner and funceng's alike."""

    class Wrapped(base_model):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y, mode="loss"):
            return {"loss": workload_loss(self.net(x), y)}

    class ControllerHook(hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            ctl.after_step()

    return Wrapped(), ControllerHook()


def _mmengine(model, batches, ctl, device, amp, work_dir):
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    wrapped, controller = _mmengine_style(BaseModel, Hook, model, ctl)
    wrapper = dict(type="AmpOptimWrapper", dtype="bfloat16") if amp else dict(type="OptimWrapper")
    runner = Runner(
        model=wrapped,
        work_dir=work_dir,
        train_dataloader=_dataloader(batches),
        optim_wrapper=dict(**wrapper, optimizer=dict(type="SGD", lr=LR, momentum=MOMENTUM)),
        train_cfg=dict(by_epoch=True, max_epochs=10**6),
        default_hooks=dict(checkpoint=None, sampler_seed=None, logger=dict(type="LoggerHook", interval=10**9)),
        custom_hooks=[controller],
        log_level="WARNING",
    )
    runner.train()


def lightning_package() -> str | None:
    """``lightning`` (the unified package) or, failing that, the standalone ``pytorch_lightning``."""
    import importlib.util

    return next((name for name in ("lightning", "pytorch_lightning") if importlib.util.find_spec(name)), None)


def _lightning(model, batches, ctl, device, amp, work_dir):
    import importlib

    import torch

    lightning = importlib.import_module(lightning_package())  # both name LightningModule, Callback and Trainer

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return workload_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    class ControllerCallback(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ctl.after_step()

    trainer = lightning.Trainer(
        accelerator=device.type if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=-1,
        precision="bf16-mixed" if amp else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ControllerCallback()],
        default_root_dir=work_dir,
        num_sanity_val_steps=0,
    )
    trainer.fit(Module(), _dataloader(batches))


def _funceng(model, batches, ctl, device, amp, work_dir, compile):
    import logging

    from funceng.model import BaseModel
    from funceng.runner import Hook, Runner

    wrapped, controller = _mmengine_style(BaseModel, Hook, model, ctl)
    wrapper = dict(type="AmpOptimWrapper", dtype="bfloat16") if amp else {}
    runner = Runner(
        model=wrapped,
        work_dir=work_dir,
        train_dataloader=_dataloader(batches),
        optim_wrapper=dict(**wrapper, optimizer=dict(type="SGD", lr=LR, momentum=MOMENTUM)),
        train_cfg=dict(by_epoch=True, max_epochs=10**6),
        compile=compile,
        log_level="WARNING",
        default_hooks=dict(checkpoint=None, logger=dict(interval=10**9, progress=False)),
        custom_hooks=[controller],
        randomness=dict(seed=0),
    )
    runner.logger.setLevel(logging.WARNING)
    runner.train()


def _worker(system: str, workload_name: str, batch_size: int, steps: int, cache_dir: str, conn) -> None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # shared by a system's cold and warm launches
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    workload = WORKLOADS[workload_name]
    torch.manual_seed(0)
    batches = make_batches(workload, batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    ctl = Controller(conn, steps, device)
    model = workload.build().to(device)
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            if system in ("a", "b"):
                _torch_loop(model, batches, ctl, device, amp, compiled=system == "b")
            elif system == "c":
                _mmengine(model, batches, ctl, device, amp, work_dir)
            elif system == "d":
                _lightning(model, batches, ctl, device, amp, work_dir)
            else:
                compile = {"e": False, "f": True, "g": {"mode": "reduce-overhead"}}[system]
                _funceng(model, batches, ctl, device, amp, work_dir, compile)
    except _Stop:
        pass
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    conn.send(("memory", peak))


# -- the parent side ------------------------------------------------------------------------------------------------


def unavailable(system: str, workload: str, cuda: bool) -> str | None:
    import importlib.util

    if system == "g" and not cuda:
        return "CUDA only"
    if system == "c" and importlib.util.find_spec("mmengine") is None:
        return "MMEngine not installed (pip install 'funceng[bench]')"
    if system == "d" and lightning_package() is None:
        return "Lightning not installed: neither lightning nor pytorch_lightning (pip install 'funceng[bench]')"
    if workload == "resnet18" and importlib.util.find_spec("torchvision") is None:
        return "torchvision not installed"
    return None


class _Worker:
    def __init__(self, ctx, system, workload, batch_size, steps, cache_dir: str):
        self.conn, child = ctx.Pipe()
        args = (system, workload, batch_size, steps, cache_dir, child)
        self.proc = ctx.Process(target=_worker, args=args, daemon=True)
        self.proc.start()

    def ask(self, command: str | None = None, timeout: float = 1800) -> tuple[str, float]:
        if command is not None:
            self.conn.send(command)
        if not self.conn.poll(timeout):
            raise TimeoutError("benchmark worker did not answer")
        return self.conn.recv()

    def finish(self) -> float:
        kind, peak = self.ask("stop")
        self.proc.join(60)
        return peak


def run_suite(workloads: list[str], systems: list[str], windows: int, steps: int, quick: bool) -> dict[str, Any]:
    import torch

    ctx = mp.get_context("spawn")
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "windows": windows,
        "steps": steps,
        "quick": quick,
        "workloads": {},
    }
    for name in workloads:
        workload = WORKLOADS[name]
        batch_size = workload.quick_batch_size if quick else workload.batch_size
        rows: dict[str, dict[str, Any]] = {}
        live: dict[str, _Worker] = {}
        cache_dir = tempfile.mkdtemp(prefix="funceng-bench-cache-")
        for system in systems:
            reason = unavailable(system, name, cuda)
            if reason:
                rows[system] = {"system": SYSTEMS[system], "skipped": reason}
                continue
            worker = _Worker(ctx, system, name, batch_size, steps, cache_dir)  # one at a time: no contention
            try:
                kind, first = worker.ask()
            except EOFError:
                rows[system] = {"system": SYSTEMS[system], "skipped": "failed: its traceback is on stderr"}
                continue
            live[system] = worker
            rows[system] = {"system": SYSTEMS[system], "first_step_s": first, "windows_s": []}
            print(f"  {name}: {SYSTEMS[system]} ready after {first:.1f} s", file=sys.stderr, flush=True)
        order = list(live)
        for window in range(windows + 1):  # the first window is a warm-up
            for system in order[window % len(order) :] + order[: window % len(order)]:
                kind, seconds = live[system].ask("window")
                if window:
                    rows[system]["windows_s"].append(seconds)
        for system, worker in live.items():
            rows[system]["peak_memory_mb"] = worker.finish()
            rows[system]["steps_per_s"] = steps / statistics.median(rows[system]["windows_s"])
        for system in [s for s in live if s in COMPILED]:  # a second launch with the cache now warm
            worker = _Worker(ctx, system, name, batch_size, steps, cache_dir)
            rows[system]["first_step_warm_s"] = worker.ask()[1]
            worker.finish()
        base = rows.get("a", {}).get("steps_per_s")
        for row in rows.values():
            if base and "steps_per_s" in row:
                row["vs_a"] = row["steps_per_s"] / base
        results["workloads"][name] = {"batch_size": batch_size, "rows": rows}
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Device: {results['device']}, torch {results['torch']}, {results['date']}; median of "
        f"{results['windows']} windows of {results['steps']} steps" + (" (--quick)" if results["quick"] else "")
    ]
    memory = "peak CUDA memory (MB)" if "CPU" not in results["device"] else "peak RSS above baseline (MB)"
    for name, workload in results["workloads"].items():
        lines += [
            "",
            f"**{name}** (batch {workload['batch_size']})",
            "",
            f"| system | steps/s | vs (a) | first step: cold / warm cache (s) | {memory} |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, row in workload["rows"].items():
            label = f"({key}) {row['system']}"
            if "skipped" in row:
                lines.append(f"| {label} | — | — | — | skipped: {row['skipped']} |")
                continue
            first = f"{row['first_step_s']:.1f}"
            if "first_step_warm_s" in row:
                first += f" / {row['first_step_warm_s']:.1f}"
            lines.append(
                f"| {label} | {row['steps_per_s']:.1f} | {row.get('vs_a', float('nan')):.2f}x | {first} | "
                f"{row['peak_memory_mb']:.0f} |"
            )
    return "\n".join(lines)


RESULTS_HEADER = """# Benchmark results

Produced by `funceng bench` (`benchmarks/compare.py`); regenerate the section of the machine you are on with
`make bench`. Each section is replaced only by a run on the same kind of device.
"""


def write_results(path: Path, results: dict[str, Any], command: str) -> None:
    """Replaces this device kind's section (CPU or CUDA) of the results file, keeping the other one."""
    kind = "cpu" if results["device"].startswith("CPU") else "cuda"
    text = path.read_text() if path.exists() else RESULTS_HEADER
    section = (
        f"<!-- {kind} -->\n## {'CPU' if kind == 'cpu' else 'CUDA'}\n\nCommand: `{command}`\n\n"
        f"{markdown(results)}\n<!-- /{kind} -->"
    )
    start, end = text.find(f"<!-- {kind} -->"), text.find(f"<!-- /{kind} -->")
    if start >= 0 and end > start:
        text = text[:start] + section + text[end + len(f"<!-- /{kind} -->") :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


QUICK_WORKLOADS = ["mlp"]  # compiles in seconds on a CPU (the CNN takes 30 s a system, ResNet-18 minutes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), help=f"default: all, or {QUICK_WORKLOADS} with --quick"
    )
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--windows", type=int, default=None, help="timed windows per system (default 7, quick 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 20, quick 10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the {', '.join(QUICK_WORKLOADS)} workload only, a small batch, 5 windows of 10 steps: every "
        "system's steps/s, first-step time (cold and warm compile cache) and peak memory in under 3 minutes on "
        "2 CPU cores",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--results", type=Path, help="update this device's section of a results file (benchmarks/RESULTS.md)"
    )


def run(args: argparse.Namespace, command_line: str) -> None:
    windows = args.windows or (5 if args.quick else 7)
    steps = args.steps or (10 if args.quick else 20)
    workloads = args.workloads or (QUICK_WORKLOADS if args.quick else list(WORKLOADS))
    results = run_suite(workloads, args.systems, windows, steps, args.quick)
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.results:
        write_results(args.results, results, command_line)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Runs the suite with command-line arguments ``argv`` (default: this process's)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    run(parser.parse_args(argv), " ".join([prog or "python benchmarks/compare.py", *argv]))


if __name__ == "__main__":
    main()
