"""The loops a Runner runs, as objects: epoch- and iteration-based training, validation and testing.

`run` decides when to validate, a pass over the train loader wraps a plain ``for`` in hook calls, and
`TrainLoop.run_iter` is a hook call, ``state, metrics = step(state, batch)``, a hook call. A train loop owns the
position in the run (epoch, iteration, batches of the current pass, the generators at the start of the pass),
which checkpoints record and resuming restores exactly, and the stop on a non-finite loss, which no hook can
switch off.
"""

from __future__ import annotations

import bisect
import signal
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from funceng import dist, rng
from funceng.errors import ConfigError, check_keys
from funceng.registry import LOOPS
from funceng.runner.data import resume_position, to_device, train_pass_loader
from funceng.runner.env import StopSignals
from funceng.runner.finite_check import NonFiniteCheck
from funceng.runner.population_run import parse_plan
from funceng.step import TrainStep

if TYPE_CHECKING:
    from funceng.runner.runner import Runner


class IterTimer:
    """``timing["time"]`` (a whole iteration, loading included) and ``timing["data_time"]`` (the wait for its
    batch), as MMEngine's IterTimerHook measures them. One per Runner, shared by its loops: the first training
    iteration after a validation does not count the validation."""

    def __init__(self):
        self.timing = {"time": 0.0, "data_time": 0.0}
        self._tick = time.perf_counter()

    def batches(self, loader: Iterable, start: int = 0) -> Iterable[tuple[int, Any]]:
        """``(index, batch)`` pairs of ``loader``, numbered from ``start``, timing the wait for each."""
        self._tick = time.perf_counter()
        for index, batch in enumerate(loader, start):
            self.timing["data_time"] = time.perf_counter() - self._tick
            yield index, batch

    def end_iter(self) -> None:
        now = time.perf_counter()
        self.timing["time"] = now - self._tick
        self._tick = now


class TrainLoop:
    """What epoch- and iteration-based training share: the position in the run and the iteration itself."""

    by_epoch: bool

    def __init__(
        self, runner: Runner, dataloader: Any, val_begin: int, val_interval: int, dynamic_intervals: Any = None
    ):
        self.runner, self.dataloader = runner, dataloader
        self.val_begin, self.val_interval = val_begin, val_interval
        # MMEngine's (milestone, interval) pairs: from count + 1 >= milestone on, validate every interval
        pairs = [tuple(p) for p in dynamic_intervals or []]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"train_cfg.dynamic_intervals: expected (milestone, interval) pairs, got {pairs}")
        self.milestones, self.intervals = [0, *(m for m, _ in pairs)], [val_interval, *(i for _, i in pairs)]
        self.epoch = self.iter = 0
        # while after_train_iter / after_train_epoch hooks run, the runner shows MMEngine's counters: the index of
        # the iteration / epoch just finished (these loops count them as done already)
        self.hook_lag = {"iter": 0, "epoch": 0}
        self.batches_done = 0  # batches of the current pass over the loader already trained on
        self.stop_training = False
        self.timer = runner.timer
        self.train_step: TrainStep | None = None  # built by the Runner with the optimizer
        self.nonfinite: NonFiniteCheck | None = None
        # iterations the loss check may trail the step by: 0 on the CPU (nothing runs ahead), 2 on CUDA
        self.nonfinite_lag = 2 if runner.device.type == "cuda" else 0
        self.signals: StopSignals | None = None
        self._epoch_start_rng: dict[str, Any] = {}
        self._resume_point: dict[str, Any] | None = None
        self.validated = -1  # the epoch (or iteration) count whose validation ran last
        self.population = None  # train_cfg.population's plan

    @property
    def max_iters(self) -> int:
        raise NotImplementedError

    def describe(self, iteration: int) -> str:
        return f"iteration {iteration} of {self.max_iters}"

    def run(self) -> torch.nn.Module:
        """Trains to the end (or a stop), validating on schedule; returns the trained model."""
        runner = self.runner
        if self.dataloader is None:
            raise ConfigError("train() needs a train_dataloader")
        self.nonfinite = NonFiniteCheck(self.describe, self.nonfinite_lag, runner.logger)
        runner.call_hook("before_run")
        runner.call_hook("before_train")
        with StopSignals(runner.world_size) as self.signals:
            try:
                self.run_loop()
                self.check_finite()
            finally:
                runner.sync_model()
                runner.checkpointer.wait()  # a checkpoint still being written in the background
        runner.call_hook("after_train")
        runner.call_hook("after_run")
        return runner.model

    def run_loop(self) -> None:
        raise NotImplementedError

    def run_iter(self, batch_idx: int, batch: Any) -> None:
        """One iteration: hooks, the pure step, hooks; then a stop signal is honoured."""
        runner = self.runner
        runner.update_runtime_info()
        runner.call_hook("before_train_iter", batch_idx=batch_idx, data_batch=batch)
        with dist.naming_collective_failures(
            f"the train step at iteration {self.iter + 1} ({self.describe(self.iter + 1)})"
        ):
            runner.state, metrics = self.train_step(runner.state, to_device(batch, runner.device))
            params = runner.state["params"] if runner.checkpointer.check_finite_params else None
            self.nonfinite.record(self.iter + 1, metrics["loss"], metrics.get("loss_scale"), params)  # waits
        self.iter += 1
        self.batches_done = batch_idx + 1
        self.timer.end_iter()
        self.call_lagging_hook("iter", "after_train_iter", batch_idx=batch_idx, data_batch=batch, outputs=metrics)
        signum = self.signals.received()
        if signum is not None:
            self._checkpoint_and_exit(signum)

    def call_lagging_hook(self, counter: str, stage: str, **kwargs: Any) -> None:
        """Calls ``stage`` with the runner's ``counter`` showing the index just finished, as MMEngine does."""
        self.hook_lag[counter] = 1
        try:
            self.runner.call_hook(stage, **kwargs)
        finally:
            self.hook_lag[counter] = 0

    def _checkpoint_and_exit(self, signum: int) -> None:
        """After SIGTERM / SIGINT: saves ``iter_N``, waits for every rank to have done so, and exits."""
        runner = self.runner
        runner.checkpointer.blocking = True  # in place before exiting
        path = runner.save_checkpoint(f"iter_{self.iter}")
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
        config = getattr(runner.cfg, "filename", None) or "CONFIG"
        runner.logger.info(
            f"Received {signal.Signals(signum).name}: saved checkpoint {path} at iteration {self.iter}. "
            f"Resume with: funceng train {config} --work-dir {runner.work_dir} --resume "
            "(in Python: Runner(..., resume=True)). Exiting."
        )
        runner.sync_model()
        raise SystemExit(128 + signum)

    def check_finite(self) -> None:
        """Raises if a loss recorded so far is non-finite (reads every pending one)."""
        if self.nonfinite is not None:
            self.nonfinite.check()

    def validate_if_due(self, count: int, last: int) -> None:
        """Validates after ``count`` epochs or iterations (of ``last``) when ``val_interval`` says so."""
        interval = self.intervals[bisect.bisect(self.milestones, count + 1) - 1]
        if self.runner.val_loop is not None and count >= self.val_begin and (count % interval == 0 or count == last):
            self.check_finite()
            self.validated = count
            self.runner.val_loop.run()

    def validate_if_skipped(self, count: int, last: int) -> None:
        """After a resume from a checkpoint written before its validation ran (an epoch's checkpoint is written
        before that epoch's validation): runs that validation now, so that what it feeds (ReduceOnPlateau,
        early stopping, the best checkpoint) continues as in the uninterrupted run."""
        point = self._resume_point
        if point is None or count == 0 or self.validated == count or (self.by_epoch and point["batch"]):
            return
        unit = "epoch" if self.by_epoch else "iteration"
        before = self.validated
        self.validate_if_due(count, last)
        if self.validated != before:
            self.runner.logger.info(f"Resumed at {unit} {count}: ran its validation, which the checkpoint preceded")

    def train_pass(self) -> Iterable[tuple[int, Any]]:
        """``(batch_idx, batch)`` over one pass of the loader; after a resume, from the saved position."""
        loader, point = self.dataloader, self._resume_point
        self._resume_point = None
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # DefaultSampler, DistributedSampler
            loader.sampler.set_epoch(self.epoch if self.by_epoch else self.iter // len(loader))
        if point is None:
            self._epoch_start_rng = rng.capture_global(loader)
            return self.timer.batches(train_pass_loader(loader))
        if point["batch"] == 0:
            rng.restore_global(point["rng"], loader)
            self._epoch_start_rng = point["rng"]
            return self.timer.batches(train_pass_loader(loader))
        self._epoch_start_rng = point["rng_epoch_start"]
        source, how = resume_position(loader, point["batch"], point["rng_epoch_start"], point["rng"])
        self.runner.logger.info(
            f"Resuming the data loader at batch {point['batch']} of {len(loader)} (skipped by {how})"
        )
        return self.timer.batches(source, start=point["batch"])

    # -- the position, for checkpoints ----------------------------------------------------------------------------

    def global_batch_size(self) -> int:
        return (getattr(self.dataloader, "batch_size", None) or 0) * self.runner.world_size

    def position(self) -> dict[str, Any]:
        """Where the run stands, JSON-serialisable: what a checkpoint needs to resume it exactly."""
        return {
            "epoch": self.epoch,
            "iter": self.iter,
            "batch": self.batches_done,
            "by_epoch": self.by_epoch,
            "world_size": self.runner.world_size,
            "samples": self.batches_done * self.global_batch_size(),
            "batches_per_epoch": len(self.dataloader),
            "rng": rng.capture_global(self.dataloader),
            "rng_epoch_start": self._epoch_start_rng,
            "validated": self.validated,
        }

    def restore(self, position: Mapping[str, Any]) -> None:
        """Continues from a `position` of this run, possibly written by a different number of ranks."""
        self.epoch, self.iter = int(position["epoch"]), int(position["iter"])
        self.validated = int(position.get("validated", -1))
        self.batches_done = self._resumed_batches(position)
        self._resume_point = {
            "batch": self.batches_done,
            "rng": position["rng"],
            "rng_epoch_start": position.get("rng_epoch_start") or position["rng"],
        }

    def _resumed_batches(self, position: Mapping[str, Any]) -> int:
        """Batches of the current pass already trained on, for this run's ranks: a checkpoint records how many
        samples of the pass were consumed, so a run may resume on a different number of ranks."""
        batches = int(position.get("batch", 0))
        saved_world, samples = position.get("world_size", 1), position.get("samples")
        per_step = self.global_batch_size()
        if saved_world == self.runner.world_size or not samples or not per_step:
            return batches
        if samples % per_step:
            self.runner.logger.warning(
                f"The checkpoint was written by {saved_world} ranks after {samples} samples of the epoch, which is "
                f"not a whole number of this run's global batches ({per_step}); resuming at batch "
                f"{samples // per_step}, so the rest of this epoch's data differs from the original run."
            )
        else:
            self.runner.logger.info(
                f"Resuming a {saved_world}-rank run on {self.runner.world_size} rank(s) at "
                f"sample {samples} of the epoch."
            )
        return samples // per_step


@LOOPS.register
class EpochBasedTrainLoop(TrainLoop):
    """Trains for ``max_epochs`` passes over the loader, validating every ``val_interval`` epochs."""

    by_epoch = True

    def __init__(
        self, runner: Runner, dataloader: Any, max_epochs: int, val_begin: int = 1, val_interval: int = 1, **dynamic
    ):
        super().__init__(runner, dataloader, val_begin, val_interval, **dynamic)
        self.max_epochs = max_epochs

    @property
    def max_iters(self) -> int:
        return self.max_epochs * len(self.dataloader)

    def describe(self, iteration: int) -> str:
        per_epoch = len(self.dataloader)
        return f"epoch {(iteration - 1) // per_epoch + 1}, batch {(iteration - 1) % per_epoch + 1}"

    def run_loop(self) -> None:
        self.validate_if_skipped(self.epoch, self.max_epochs)
        while self.epoch < self.max_epochs and not self.stop_training:
            self.runner.call_hook("before_train_epoch")
            for batch_idx, batch in self.train_pass():
                self.run_iter(batch_idx, batch)
                if self.stop_training:
                    break
            else:
                self.check_finite()
                self.batches_done = 0
                self.epoch += 1
                self.call_lagging_hook("epoch", "after_train_epoch")
            if self.stop_training:
                break
            self.validate_if_due(self.epoch, self.max_epochs)


@LOOPS.register
class IterBasedTrainLoop(TrainLoop):
    """Trains for ``max_iters`` iterations, passing over the loader as often as needed, validating every
    ``val_interval`` iterations."""

    by_epoch = False
    max_epochs = 1  # as MMEngine's: the whole run is one "epoch" for epoch-based hooks

    def __init__(
        self, runner: Runner, dataloader: Any, max_iters: int, val_begin: int = 1, val_interval: int = 1000, **dynamic
    ):
        super().__init__(runner, dataloader, val_begin, val_interval, **dynamic)
        self._max_iters = max_iters

    @property
    def max_iters(self) -> int:
        return self._max_iters

    def run_loop(self) -> None:
        self.validate_if_skipped(self.iter, self.max_iters)
        self.runner.call_hook("before_train_epoch")
        while self.iter < self.max_iters and not self.stop_training:
            for batch_idx, batch in self.train_pass():
                self.run_iter(batch_idx, batch)
                self.validate_if_due(self.iter, self.max_iters)
                if self.iter >= self.max_iters or self.stop_training:
                    break
            else:
                self.batches_done = 0
        self.runner.call_hook("after_train_epoch")


def build_train_loop(
    runner: Runner, train_cfg: Mapping[str, Any] | None, dataloader: Any, optim_wrapper: Any
) -> TrainLoop | None:
    """The train loop ``train_cfg`` describes (``None`` without one): ``by_epoch=True`` (or
    ``type="EpochBasedTrainLoop"``) with ``max_epochs``, or ``by_epoch=False`` (or ``type="IterBasedTrainLoop"``)
    with ``max_iters``. Typos, a missing length and a loader without ``train_cfg`` or ``optim_wrapper`` are
    errors."""
    if dataloader is not None and (train_cfg is None or optim_wrapper is None):
        missing = [n for n, v in (("train_cfg", train_cfg), ("optim_wrapper", optim_wrapper)) if v is None]
        raise ConfigError(f"train_dataloader is set but {' and '.join(missing)} is missing")
    if train_cfg is None:
        return None
    cfg = dict(train_cfg)
    allowed = {"type", "by_epoch", "max_epochs", "max_iters", "val_interval", "val_begin", "dynamic_intervals"}
    check_keys("train_cfg", cfg, allowed | {"population"})
    plan = cfg.pop("population", None)
    loop = LOOPS.resolve(cfg.pop("type"), "train_cfg.type") if "type" in cfg else None
    if loop is not None and not issubclass(loop, TrainLoop):
        raise ConfigError(f"train_cfg.type: {loop.__name__} is not a train loop")
    by_epoch = cfg.pop("by_epoch", loop.by_epoch if loop is not None else True)
    if loop is not None and loop.by_epoch != by_epoch:
        raise ConfigError(f"train_cfg: type={loop.__name__} contradicts by_epoch={by_epoch}")
    if loop is None:
        loop = EpochBasedTrainLoop if by_epoch else IterBasedTrainLoop
    needed, other = ("max_epochs", "max_iters") if by_epoch else ("max_iters", "max_epochs")
    if needed not in cfg:
        raise ConfigError(f"train_cfg: by_epoch={by_epoch} needs {needed!r} (got keys {sorted(train_cfg)})")
    if other in cfg:
        raise ConfigError(f"train_cfg: by_epoch={by_epoch} counts {needed!r}; remove {other!r}")
    if not isinstance(cfg[needed], int) or cfg[needed] < 1:
        raise ConfigError(f"train_cfg.{needed} must be a positive int, got {cfg[needed]!r}")
    built = loop(runner, dataloader, **cfg)
    if plan is not None:  # N members trained together (`funceng.runner.population_run`)
        built.population = parse_plan(plan, runner.seed)
    return built
