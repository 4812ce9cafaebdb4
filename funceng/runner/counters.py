"""What hooks and MMEngine users read from a Runner: where the run stands (``epoch``, ``iter``, ``max_iters``, ...),
with MMEngine's values at each mount point (see `funceng.runner.loops.TrainLoop.call_lagging_hook`)."""

from __future__ import annotations

from typing import Any

from funceng.logging import MessageHub, MMLogger


def open_message_hub(runner: Any) -> MessageHub:
    """The run's own `funceng.logging.MessageHub` (made current, with the run's logger as ``MMLogger``'s)."""
    hub = MessageHub.fresh_instance(runner.experiment_name)
    hub.update_info_dict({"experiment_name": runner.experiment_name, "seed": runner.seed})
    MMLogger._current = runner.logger
    return hub


class RunnerCounters:
    """Read-only views of the train loop's position, for a class with a ``train_loop`` attribute."""

    train_loop: Any
    message_hub: MessageHub

    def update_runtime_info(self) -> None:
        """Where the run stands, in the message hub's runtime information (MMEngine's RuntimeInfoHook)."""
        self.message_hub.update_info_dict(
            {"epoch": self.epoch, "iter": self.iter, "max_epochs": self.max_epochs, "max_iters": self.max_iters}
        )

    def lr_step(self) -> int:
        """The state step whose learning rate is the current one: the next step's, or while ``after_*`` train hooks
        run, the one just trained with (as MMEngine's ``get_lr()`` reads before its scheduler hook steps)."""
        lag = self.train_loop.hook_lag
        return max(int(self.state["step"].reshape(-1)[0]) - (1 if lag["iter"] or lag["epoch"] else 0), 0)

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
