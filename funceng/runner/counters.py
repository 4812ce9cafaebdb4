"""What hooks and MMEngine users read from a Runner: where the run stands (``epoch``, ``iter``, ``max_iters``, ...),
with MMEngine's values at each mount point (see `funceng.runner.loops.TrainLoop.call_lagging_hook`)."""

from __future__ import annotations

from typing import Any


class RunnerCounters:
    """Read-only views of the train loop's position, for a class with a ``train_loop`` attribute."""

    train_loop: Any

    @property
    def by_epoch(self) -> bool:
        return self.train_loop.by_epoch if self.train_loop is not None else True

    @property
    def epoch(self) -> int:
        return self.train_loop.epoch - self.train_loop.hook_lag["epoch"] if self.train_loop is not None else 0

    @property
    def iter(self) -> int:
        return self.train_loop.iter - self.train_loop.hook_lag["iter"] if self.train_loop is not None else 0

    @property
    def max_epochs(self) -> int | None:
        return getattr(self.train_loop, "max_epochs", None)

    @property
    def max_iters(self) -> int:
        return self.train_loop.max_iters if self.train_loop is not None else 0

    @property
    def stop_training(self) -> bool:
        return self.train_loop is not None and self.train_loop.stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.train_loop.stop_training = value

    @property
    def train_step(self):
        """The pure train step (built by `train` or `load_or_resume`)."""
        return self.train_loop.train_step if self.train_loop is not None else None
