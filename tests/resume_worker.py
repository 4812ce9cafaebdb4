"""A small training run that the resume tests kill and resume in subprocesses.

    python tests/resume_worker.py WORK_DIR [--resume] [--kill-at N] [--sigterm-at N] [--sigint-at N]
                                           [--kill-in-save N] [--sigterm-group-at N] [--workers N]
                                           [--sleep S] [--checkpoint iter|epoch]

It has everything that makes exact resumption hard: dropout, a user-built ``DataLoader(shuffle=True)`` with no
generator, a dataset whose transform draws from the global RNG, validation every epoch, mid-epoch checkpoints and
an lr schedule. On completion it writes the final TrainState to WORK_DIR/final.
"""

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from funceng import checkpoint, checkpoint_writer  # noqa: E402
from funceng.runner import Hook, Runner  # noqa: E402
from tests.runner_fixtures import Accuracy, TinyNet, dataset  # noqa: E402


class NoisyDataset(Dataset):
    """Samples with noise drawn from torch's, numpy's and Python's global generators at fetch time, like random
    augmentations (in the loader's worker processes when it has some)."""

    def __init__(self, n: int, seed: int = 0):
        self.base = dataset(n, seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn(8) + 0.01 * float(np.random.randn()) + 0.01 * random.random(), y


class Interrupt(Hook):
    def __init__(self, iteration: int, signum: int, sleep: float, group: bool = False):
        self.iteration, self.signum, self.sleep, self.group = iteration, signum, sleep, group

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.sleep:
            time.sleep(self.sleep)
        if runner.iter + 1 == self.iteration:  # runner.iter: the index of the iteration just run
            if self.group:  # as a batch scheduler stops a job: every process of it, data loader workers too
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


def kill_during_save(after_files: int) -> None:
    """SIGKILL this process right after its ``after_files``-th checkpoint data file is written and fsynced,
    before that checkpoint's manifest is written and its directory renamed into place."""
    real_write, written = checkpoint_writer.write_file, [0]

    def write(path, tensors):
        result = real_write(path, tensors)
        written[0] += 1
        if written[0] == after_files:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    checkpoint_writer.write_file = write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--sigterm-at", type=int, default=0)
    parser.add_argument("--sigint-at", type=int, default=0)
    parser.add_argument("--kill-in-save", type=int, default=0)
    parser.add_argument("--sigterm-group-at", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--checkpoint", choices=["iter", "epoch"], default="iter")
    args = parser.parse_args()

    hooks = []
    if args.kill_at or args.sleep:
        hooks.append(Interrupt(args.kill_at, signal.SIGKILL, args.sleep))
    if args.sigterm_at:
        hooks.append(Interrupt(args.sigterm_at, signal.SIGTERM, 0.0))
    if args.sigterm_group_at:
        hooks.append(Interrupt(args.sigterm_group_at, signal.SIGTERM, 0.0, group=True))
    if args.sigint_at:
        hooks.append(Interrupt(args.sigint_at, signal.SIGINT, 0.0))
    if args.kill_in_save:
        kill_during_save(args.kill_in_save)
    torch.manual_seed(0)  # the model is built before the Runner seeds anything, as in the seed tutorial
    checkpoint_cfg = dict(interval=4, by_epoch=False) if args.checkpoint == "iter" else dict(interval=1)
    runner = Runner(
        model=TinyNet(dropout=0.3),
        work_dir=args.work_dir,
        train_dataloader=DataLoader(NoisyDataset(120), batch_size=16, shuffle=True, num_workers=args.workers),
        val_dataloader=DataLoader(NoisyDataset(32, seed=1), batch_size=16),
        val_evaluator=dict(type=Accuracy),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01), clip_grad=dict(max_norm=1.0)),
        param_scheduler=dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=24),
        train_cfg=dict(by_epoch=True, max_epochs=3),
        default_hooks=dict(checkpoint=checkpoint_cfg),
        custom_hooks=hooks,
        randomness=dict(seed=0),
        resume=args.resume,
    )
    runner.train()
    checkpoint.save_state(runner.state, Path(args.work_dir) / "final")


if __name__ == "__main__":
    main()
