"""Distributed runs for tests/test_distributed.py, started with ``torchrun --nproc_per_node=N``.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py runner OUT --batch-size 8 [--resume-from CKPT]
                                                                         [--fsdp]
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py die OUT
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py step OUT
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py buffers OUT
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py seed OUT

``runner`` trains `build_runner`'s run (the same one the tests run in a single process), then tests it; every
rank writes ``OUT/rank<r>.json`` (a digest of its final state, its metrics) and rank 0 the checkpoints.
``die``: rank 1 exits abruptly at iteration 4; the others must fail with a clear error, not hang.
``step``: the bare functional API (compiled step with the gradient all-reduce inside), checked in the worker.
``buffers``: BatchNorm statistics per rank without and with `SyncBuffersHook`.
``seed``: MMEngine's tutorial script (examples/cifar10_resnet50.py) as it is, under torchrun.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STACK = dict(type="default_collate")  # samples stacked into tensors (MMEngine's default keeps them as lists)

from funceng import dist, optim  # noqa: E402
from funceng.evaluator import BaseMetric  # noqa: E402
from funceng.model import BaseModel  # noqa: E402
from funceng.runner import ConfigError, Hook, Runner, SyncBuffersHook  # noqa: E402
from funceng.tree import find_leaf, flatten  # noqa: E402
from tests.runner_fixtures import Accuracy, TinyNet, dataset  # noqa: E402

GLOBAL_BATCH = 16
TIMEOUT_S = 20


class Mlp(BaseModel):
    """No BatchNorm or dropout: 2 ranks with batch B/2 then compute exactly the gradient of 1 rank with batch B."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x, y, mode="tensor"):
        out = self.net(x)
        if mode == "loss":
            return {"loss": F.cross_entropy(out, y)}
        return (out, y) if mode == "predict" else out


class LabelOrder(BaseMetric):
    """Per-sample results: how many samples were evaluated, and an order-sensitive checksum of their labels."""

    def process(self, data_batch, data_samples):
        self.results.extend(data_samples[1].tolist())

    def compute_metrics(self, results):
        return {"count": len(results), "order": sum((i + 1) * label for i, label in enumerate(results))}


def build_runner(work_dir: Path, batch_size: int, resume_from: str | None = None, **overrides) -> Runner:
    """96 training samples (6 global batches of 16 per epoch), 2 epochs, checkpoints at iterations 9 and 12;
    45 test samples in batches of 4, so neither ranks nor batches divide the test set evenly."""
    torch.manual_seed(int(os.environ.get("RANK", 0)))  # ranks build different weights; the Runner must use rank 0's
    kwargs = dict(
        model=Mlp(),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=dataset(96), batch_size=batch_size, sampler=dict(type="DefaultSampler"), collate_fn=STACK
        ),
        test_dataloader=dict(
            dataset=dataset(45, seed=1),
            batch_size=4,
            sampler=dict(type="DefaultSampler", shuffle=False),
            collate_fn=STACK,
        ),
        test_evaluator=[dict(type=Accuracy), dict(type=LabelOrder, prefix="samples")],
        optim_wrapper=dict(
            optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=1e-4), clip_grad=dict(max_norm=1.0)
        ),
        param_scheduler=dict(type="MultiStepLR", milestones=[1], gamma=0.5, by_epoch=True),
        auto_scale_lr=dict(base_batch_size=8),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        randomness=dict(seed=3),
        default_hooks=dict(logger=dict(interval=3), checkpoint=dict(interval=9, by_epoch=False)),
        env_cfg=dict(dist_cfg=dict(backend="gloo", timeout=TIMEOUT_S)),
        resume=True if resume_from == "auto" else resume_from or False,
    )
    kwargs.update(overrides)
    return Runner(**kwargs)


def digest(state) -> str:
    return hashlib.sha256(b"".join(leaf.numpy().tobytes() for leaf in flatten(state.exclude("rng"))[1])).hexdigest()


def last_lr(state) -> float:
    template, leaves = flatten(state["opt_state"])
    return leaves[find_leaf(template, "lr")].item()


class SleepEachIteration(Hook):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        time.sleep(self.seconds)


def run_runner(out: Path, args) -> None:
    options = {}
    if args.fsdp:
        options["model_wrapper_cfg"] = dict(type="MMFullyShardedDataParallel", shard_modules=[nn.Linear])
    if args.user_loaders:  # plain DataLoaders, which the Runner must shard the way config-built ones are
        options["train_dataloader"] = DataLoader(dataset(96), batch_size=args.batch_size, shuffle=True)
        options["test_dataloader"] = DataLoader(dataset(45, seed=1), batch_size=4)
    if args.sleep:
        options["custom_hooks"] = [SleepEachIteration(args.sleep)]
    runner = build_runner(out / "work", args.batch_size, args.resume_from, **options)
    runner.train()
    metrics = runner.test()
    refusals = {}
    if args.fsdp:  # what a sharded model cannot do: compile the whole step, or train a copy of its state
        from funceng import make_train_step

        for name, attempt in (
            ("compile", lambda: make_train_step(runner.model, runner.train_step.tx, compile=True)),
            ("copy", lambda: runner.train_step(runner.state.clone(), next(iter(runner.train_dataloader)))),
        ):
            try:
                attempt()
            except ValueError as exc:
                refusals[name] = str(exc)
    record = {
        "rank": runner.rank,
        "world_size": runner.world_size,
        "digest": digest(runner.state),
        "metrics": metrics,
        "lr": last_lr(runner.state),
        "iter": runner.iter,
        "param_elements": sum(p.numel() for p in runner.state["params"].values()),
        "refusals": refusals,
    }
    (out / f"rank{runner.rank}.json").write_text(json.dumps(record))


class DieAt(Hook):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.rank == 1 and runner.iter + 1 == self.iteration:
            os._exit(3)


def run_die(out: Path, args) -> None:
    runner = build_runner(out / "work", GLOBAL_BATCH // 2, custom_hooks=[DieAt(4)])
    runner.train()


class StopAt(Hook):
    """Rank 1 stops (SIGSTOP: alive, holding its sockets open, answering nothing) before iteration N."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.rank == 1 and runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGSTOP)


def run_hang(out: Path, args) -> None:
    runner = build_runner(out / "work", GLOBAL_BATCH // 2, custom_hooks=[StopAt(4)])
    runner.train()


def run_buffers(out: Path, args) -> None:
    """BatchNorm statistics after an epoch on each rank's own shard, without and with SyncBuffersHook; and a
    user-built loader with a sampler that cannot be sharded."""
    record = {}
    for name, hooks in (("unsynced", []), ("synced", [SyncBuffersHook()])):
        runner = Runner(
            model=TinyNet(),
            work_dir=out / name,
            train_dataloader=DataLoader(dataset(64), batch_size=8),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
            train_cfg=dict(max_epochs=1),
            custom_hooks=hooks,
            default_hooks=dict(checkpoint=None),
            launcher="pytorch",
        )
        runner.train()
        record[name] = digest(runner.state["buffers"])
    weighted = DataLoader(dataset(64), batch_size=8, sampler=WeightedRandomSampler([1.0] * 64, 64))
    try:
        Runner(
            model=TinyNet(),
            work_dir=out / "weighted",
            train_dataloader=weighted,
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
            train_cfg=dict(max_epochs=1),
        )
    except ConfigError as exc:
        record["refused"] = str(exc)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


def run_seed(out: Path, args) -> None:
    """MMEngine's tutorial script, unchanged but for its imports, on tiny CIFAR-10 files in ``out/data``."""
    import runpy

    import torchvision.datasets.cifar

    # Real torchvision files whose md5s differ from the published ones, which download=True would fetch again.
    torchvision.datasets.cifar.check_integrity = lambda path, md5=None: Path(path).is_file()
    os.chdir(out)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "cifar10_resnet50.py"), run_name="__main__")


def run_step(out: Path, args) -> None:
    """Each rank takes its half of every global batch; the compiled data-parallel step must match one process
    stepping on the whole batch (computed here on every rank, without collectives), in one graph."""
    dist.init_distributed("gloo", TIMEOUT_S)
    rank, world = dist.get_rank(), dist.get_world_size()
    from funceng import TrainState, loss_scale, make_train_step

    torch.manual_seed(0)
    model, reference_model = Mlp(), Mlp()
    reference_model.load_state_dict(model.state_dict())
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state, reference = TrainState.create(model, tx), TrainState.create(reference_model, tx)
    step = make_train_step(model, tx, compile=True)
    reference_step = make_train_step(reference_model, tx, compile=False, data_parallel=False)
    torch._dynamo.utils.counters.clear()
    data = dataset(GLOBAL_BATCH * 5)
    for i in range(5):
        x, y = data[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]
        state, metrics = step(state, (x[rank::world], y[rank::world]))
        reference, reference_metrics = reference_step(reference, (x, y))
    diffs = [(a - b).abs().max().item() for a, b in zip(flatten(state["params"])[1], flatten(reference["params"])[1])]
    loss_diff = abs(metrics["loss"] - reference_metrics["loss"]).item()
    # fp16 with sharded gradients: an overflow in rank 1's shard alone must make every rank skip the step
    shard = {"w": torch.full((3,), float("inf") if rank == 1 else 1.0)}
    scale = {"scale": torch.tensor(1024.0), "growth_tracker": torch.tensor(0, dtype=torch.int32)}
    _, finite = loss_scale.unscale_and_update(shard, scale, across_ranks=True)
    record = {
        "rank": rank,
        "max_param_diff": max(diffs),
        "loss_diff": loss_diff,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "digest": digest(state),
        "fp16_shard_finite": finite.item(),
        "fp16_scale_after_overflow": scale["scale"].item(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["runner", "die", "hang", "step", "buffers", "seed"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--resume-from", help="a checkpoint, or 'auto' for the work_dir's newest")
    parser.add_argument("--fsdp", action="store_true", help="shard the state with FSDP2")
    parser.add_argument("--user-loaders", action="store_true", help="pass DataLoaders instead of config dicts")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each iteration")
    args = parser.parse_args()
    scenarios = {
        "runner": run_runner,
        "die": run_die,
        "hang": run_hang,
        "step": run_step,
        "buffers": run_buffers,
        "seed": run_seed,
    }
    scenarios[args.scenario](args.out, args)
