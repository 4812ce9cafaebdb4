"""Exact resume under interruption, counted: kill -9 or SIGTERM to the whole process group at a random
iteration, with two DataLoader workers doing random augmentation, then resume until done; a trial passes when
the final state is bitwise equal to an uninterrupted run's.

    python benchmarks/resume_reliability.py [--trials 20] [--workers 2] [--seed 0]

The run is `tests/resume_worker.py`: dropout, a shuffling user-built DataLoader, a dataset that draws from
torch's, numpy's and Python's generators in ``__getitem__``, validation every epoch, checkpoints every 4
iterations and mid-epoch, an lr schedule. Trials alternate between SIGKILL of the main process and SIGTERM sent
to the process group (what a batch scheduler sends), each at a random iteration.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "resume_worker.py"
ITERS = 24
sys.path.insert(0, str(ROOT))


def run(work_dir: Path, *args: str) -> int:
    done = subprocess.run(
        [sys.executable, str(WORKER), str(work_dir), *args],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    return done.returncode


def final_state(work_dir: Path):
    from funceng.checkpoint import load_state

    return load_state(work_dir / "final")[0]


def equal(a, b) -> bool:
    keys = list(a.keys(True, True))
    return keys == list(b.keys(True, True)) and all(torch.equal(a.get(k), b.get(k)) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    loader = ["--workers", str(args.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert run(root / "reference", *loader) == 0, "the uninterrupted run failed"
        reference = final_state(root / "reference")
        results = []
        for trial in range(args.trials):
            work = root / f"trial{trial}"
            at = rng.randint(1, ITERS - 1)
            how = "SIGKILL" if trial % 2 == 0 else "SIGTERM to the group"
            flag = "--kill-at" if trial % 2 == 0 else "--sigterm-group-at"
            start = time.perf_counter()
            first = run(work, flag, str(at), *loader)
            expected = -signal.SIGKILL if trial % 2 == 0 else 128 + signal.SIGTERM
            codes = [first]
            while not (work / "final").exists() and len(codes) < 5:
                codes.append(run(work, "--resume", *loader))
            exact = (work / "final").exists() and equal(reference, final_state(work))
            ok = exact and first == expected
            results.append(ok)
            print(
                f"trial {trial + 1:2d}: {how:<20} at iteration {at:2d}: exit codes {codes}, "
                f"{'bit-exact' if exact else 'DIFFERENT'} ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )
    print(f"\nbit-exact resume with {args.workers} loader workers: {sum(results)}/{len(results)} trials")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
