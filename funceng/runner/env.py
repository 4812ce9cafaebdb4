"""The run's environment, set up once per Runner before any model or data: the process group, seeds, the log
directory and logger, the environment banner, and the vote on stop signals that keeps ranks in step."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funceng import dist, rng
from funceng.errors import ConfigError, check_keys
from funceng.runner.log import RunLogger
from funceng.version import __version__


@dataclass(frozen=True)
class RunEnvironment:
    """Where a run stands in the world: its rank among ``world_size`` processes, and its seeds."""

    launcher: str
    rank: int
    world_size: int
    seed: int
    rank_seed: int  # what this rank's generators are seeded with (differs per rank with diff_rank_seed)
    deterministic: bool

    @classmethod
    def start(cls, launcher: str, env_cfg: Mapping | None, randomness: Mapping | None) -> RunEnvironment:
        """Joins the process group (if launched so) and seeds every generator."""
        launcher = start_distributed(launcher, env_cfg)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        randomness = dict(randomness or {})
        check_keys("randomness", randomness, {"seed", "deterministic", "diff_rank_seed"})
        seed = randomness.get("seed")
        if seed is None:
            seed = dist.broadcast_object(random.SystemRandom().randrange(2**31))
        deterministic = bool(randomness.get("deterministic", False))
        # diff_rank_seed: each rank draws different random numbers (dropout, augmentation); data order stays shared
        rank_seed = seed + rank if randomness.get("diff_rank_seed", False) else seed
        rng.seed_everything(rank_seed, deterministic)
        return cls(launcher, rank, world_size, seed, rank_seed, deterministic)

    def banner(self) -> str:
        """MMEngine's environment banner: the system, then the run's settings."""
        lines = [
            "",
            "-" * 60,
            "System environment:",
            f"    sys.platform: {sys.platform}",
            f"    Python: {sys.version.replace(chr(10), ' ')}",
            f"    CUDA available: {torch.cuda.is_available()}",
            f"    numpy_random_seed: {self.seed}",
        ]
        if torch.cuda.is_available():
            lines += [f"    GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
            lines.append(f"    CUDA: {torch.version.cuda}")
        lines += [f"    PyTorch: {torch.__version__}", f"    NumPy: {np.__version__}"]
        try:
            import torchvision

            lines.append(f"    TorchVision: {torchvision.__version__}")
        except ImportError:
            pass
        lines += [
            f"    funceng: {__version__}",
            "",
            "Runtime environment:",
            f"    seed: {self.seed}",
            f"    deterministic: {self.deterministic}",
            f"    Distributed launcher: {self.launcher}",
            f"    Distributed training: {self.world_size > 1}",
            f"    World size: {self.world_size}",
            "-" * 60,
        ]
        return "\n".join(lines)


def default_device() -> torch.device:
    """The device this process trains on: its GPU (``LOCAL_RANK``'s under torchrun), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def start_distributed(launcher: str, env_cfg: Mapping | None) -> str:
    """Applies ``env_cfg`` and joins the process group for ``launcher="pytorch"`` (or under torchrun); returns
    the launcher in effect."""
    env_cfg = dict(env_cfg or {})
    check_keys("env_cfg", env_cfg, {"cudnn_benchmark", "mp_cfg", "dist_cfg", "resource_limit"})
    if "resource_limit" in env_cfg:  # MMEngine's: raise the open-files soft limit (many loader workers)
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(max(soft, int(env_cfg["resource_limit"])), hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    dist_cfg = dict(env_cfg.get("dist_cfg") or {})
    check_keys("env_cfg.dist_cfg", dist_cfg, {"backend", "timeout"})
    if env_cfg.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    mp_cfg = dict(env_cfg.get("mp_cfg") or {})
    check_keys("env_cfg.mp_cfg", mp_cfg, {"mp_start_method", "opencv_num_threads"})
    if "mp_start_method" in mp_cfg:
        torch.multiprocessing.set_start_method(mp_cfg["mp_start_method"], force=True)
    if "opencv_num_threads" in mp_cfg:
        try:
            import cv2

            cv2.setNumThreads(mp_cfg["opencv_num_threads"])
        except ImportError:  # no OpenCV: no OpenCV threads to limit
            pass
    if launcher not in ("none", "pytorch"):
        raise ConfigError(
            f"launcher={launcher!r} is not supported: start the script with torchrun (on SLURM: srun torchrun "
            "...) and pass launcher='pytorch'"
        )
    if launcher == "none" and dist.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        launcher = "pytorch"  # under torchrun, N unrelated copies of one run are never what was meant
    if launcher == "pytorch" or dist.is_distributed():
        dist.init_distributed(dist_cfg.get("backend"), dist_cfg.get("timeout"))
    return launcher


def open_run_log(env: RunEnvironment, work_dir: Path, log_level: str) -> tuple[str, Path, RunLogger]:
    """``(timestamp, log_dir, logger)`` of a new run in ``work_dir``; the logger starts with the banner. Ranks
    other than 0 write no file and log warnings and errors only."""
    timestamp, log_dir = make_log_dir(work_dir, env.rank)
    main = env.rank == 0
    logger = RunLogger(log_dir / f"{timestamp}.log" if main else None, log_level if main else "WARNING")
    logger.info(env.banner())
    return timestamp, log_dir, logger


def dump_config(cfg: Any, work_dir: Path, log_dir: Path, timestamp: str, write: bool) -> str:
    """Writes the resolved config (empty for a Runner built in a script) where MMEngine does, beside the runs
    (``work_dir/<config name or timestamp>.py``), and into this run's folder (``work_dir/<timestamp>/<timestamp>.py``);
    returns the sha256 of its text, which checkpoints record."""
    name = Path(cfg.filename).name if cfg.filename else f"{timestamp}.py"
    if write:
        cfg.dump(work_dir / name)
        cfg.dump(log_dir / f"{timestamp}{Path(name).suffix}")
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()


def make_log_dir(work_dir: Path, rank: int) -> tuple[str, Path]:
    """``(timestamp, work_dir/timestamp)``, created by rank 0 and the same on every rank. Two runs started within
    the same second get ``<timestamp>-1``, ``-2``, ...: they never share a log."""
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    if rank == 0:
        base = timestamp
        for n in range(1, 1000):
            try:
                (work_dir / timestamp).mkdir(parents=True)
                break
            except FileExistsError:
                timestamp = f"{base}-{n}"
    timestamp = dist.broadcast_object(timestamp)
    return timestamp, work_dir / timestamp


class StopSignals:
    """SIGTERM and SIGINT during training ask for a clean stop: the loop finishes the iteration, saves a
    checkpoint and exits. Used as a context manager around training (it restores the previous handlers).

    `received` is asked once per iteration. With several ranks they vote with a non-blocking all-reduce
    started one iteration earlier, so all stop after the same iteration (their collectives must pair up) and
    none waits for the vote.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._vote: tuple[Any, torch.Tensor] | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        vote, self._vote = self._vote, None
        if vote is not None and exc[0] is None:  # a collective still in flight when the process exits aborts it
            with dist.naming_collective_failures("the stop-signal vote at the end of training"):
                vote[0].wait()

    def received(self) -> int | None:
        """The signal to stop for, once every rank knows of it; ``None`` to go on."""
        if self.world_size == 1:
            return self.signum
        received = None
        if self._vote is not None:
            work, vote = self._vote
            with dist.naming_collective_failures("the stop-signal vote of the last iteration"):
                work.wait()
            received = int(vote.item()) or None
            self.signum = self.signum or received
            received = received and self.signum  # named by this rank's own signal if it got one
        vote = torch.tensor([self.signum or 0])
        work = torch.distributed.all_reduce(vote, torch.distributed.ReduceOp.MAX, group=dist.cpu_group(), async_op=True)
        self._vote = (work, vote)
        return received
