"""`LoggerHook`: MMEngine's training and validation log lines, and the scalars sent to the visualizer."""

from __future__ import annotations

import re
import sys

import torch

from funceng.runner import compat
from funceng.runner.hooks.hook import HOOKS, Hook
from funceng.runner.log import (
    MEMBER_PREFIX,
    ProgressBar,
    Window,
    cuda_memory_mb,
    epoch_end_line,
    header,
    iteration_line,
)


@HOOKS.register
class LoggerHook(Hook):
    """Logs time, data_time and losses every ``interval`` iterations in MMEngine's format, each the mean over the
    last ``log_processor.window_size`` iterations (10 by default, as MMEngine's), and writes them to
    ``vis_data/scalars.json`` (and any other visualizer backend).

    Losses stay on the device between log lines, so a compiled step is never synced more than once per line.
    ``progress``: ``True`` shows a live bar (eta, it/s, loss) instead of printing iteration lines to the terminal
    (the log file still gets every line); ``"auto"`` does so when stdout is a terminal. ``log_metric_by_epoch`` is
    accepted for MMEngine compatibility (`funceng.runner.compat`). A non-finite loss stops the run in the train
    loop, logger or not.
    """

    priority = "BELOW_NORMAL"

    def __init__(
        self,
        interval: int = 10,
        ignore_last: bool = True,
        log_metric_by_epoch: bool = True,
        progress: bool | str = "auto",
    ):
        if progress not in (True, False, "auto"):
            raise ValueError(f"LoggerHook.progress must be True, False or 'auto', got {progress!r}")
        if not log_metric_by_epoch:
            compat.ignored("LoggerHook(log_metric_by_epoch)")
        self.interval = interval
        self.ignore_last = ignore_last
        self.progress = progress
        self._bar: ProgressBar | None = None
        self._bar_postfix: dict[str, float] = {}
        self._windows: dict[str, Window] = {}
        self._window_size = 10
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _window(self, key: str) -> Window:
        return self._windows.setdefault(key, Window(self._window_size))

    def before_train(self, runner):
        self._windows.clear()
        self._window_size = runner.log_processor["window_size"]  # MMEngine's LogProcessor: 10 by default
        wanted = self.progress is True or (self.progress == "auto" and sys.stdout.isatty())
        self._show_bar = wanted and runner.rank == 0
        runner.logger.terminal_filter.quiet = self._show_bar

    def before_train_epoch(self, runner):
        if self._show_bar and runner.by_epoch:
            self._bar = ProgressBar(
                len(runner.train_dataloader),
                f"Epoch {runner.epoch + 1}/{runner.max_epochs}",
                initial=runner.train_loop.batches_done,
            )
        elif self._show_bar:
            self._bar = ProgressBar(runner.max_iters, "Iter", initial=runner.iter)

    def after_train_epoch(self, runner):
        if self._bar is not None and runner.by_epoch:
            self._bar.close()
            self._bar = None

    def after_train(self, runner):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        runner.logger.terminal_filter.quiet = False

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._window("time").update(runner.timing["time"])
        self._window("data_time").update(runner.timing["data_time"])
        done = runner.iter + 1  # iterations done (runner.iter is the index of the one just run)
        self._pending.append((done, {k: v for k, v in outputs.items() if k not in ("lr", "grad_norm")}))
        loader_len = len(runner.train_dataloader)
        end_of_epoch = runner.by_epoch and batch_idx + 1 == loader_len
        position = batch_idx + 1 if runner.by_epoch else done
        if position % self.interval == 0 or (not runner.by_epoch and done == runner.max_iters):
            self._log_train(runner, batch_idx, outputs)
        elif end_of_epoch and (not self.ignore_last or loader_len <= self.interval):
            self._log_train(runner, batch_idx, outputs)
        elif end_of_epoch:
            self._drain(runner)
        if self._bar is not None:
            self._bar.update(**self._bar_postfix)
            self._bar_postfix = {}

    def _drain(self, runner) -> dict[str, float]:
        """Moves pending device scalars into the windows (one sync); returns their smoothed values."""
        if not self._pending:
            return {}
        keys = list(self._pending[-1][1])
        values = torch.stack([torch.stack([m[k].float() for k in keys]) for _, m in self._pending]).tolist()
        self._pending.clear()
        for row in values:
            for key, value in zip(keys, row):
                self._window(key).update(value)
                runner.message_hub.update_scalar(f"train/{key}", value)
        return {k: self._window(k).mean() for k in keys}

    def _log_train(self, runner, batch_idx, outputs):
        scalars = self._drain(runner)
        done = runner.iter + 1
        lr = outputs["lr"].item() if "lr" in outputs else None
        if runner.by_epoch:
            head = header(
                "train",
                epoch=runner.epoch + 1,
                max_epochs=runner.max_epochs,
                index=batch_idx + 1,
                total=len(runner.train_dataloader),
            )
        else:
            head = header("train", epoch=None, max_epochs=None, index=done, total=runner.max_iters)
        time_mean = self._window("time").mean()
        eta = self._window("time").global_mean() * (runner.max_iters - done)
        memory = cuda_memory_mb(runner.device)
        members = {k: v for k, v in scalars.items() if k.startswith(MEMBER_PREFIX)}  # a population's: scalars only
        ordered = {k: v for k, v in scalars.items() if k != "loss" and k not in members}
        ordered["loss"] = scalars["loss"]
        for key, history in runner.message_hub.log_scalars.items():  # what hooks and models added, as MMEngine's
            name = key.removeprefix("train/")
            if key.startswith("train/") and name not in ordered and name not in ("lr", "time", "data_time", *members):
                smoothed = re.search("loss|time|grad_norm", name)
                ordered[name] = history.mean(self._window_size) if smoothed else history.current()
        if "grad_norm" in outputs:
            ordered["grad_norm"] = outputs["grad_norm"].item()
        line = iteration_line(head, lr, eta, time_mean, self._window("data_time").mean(), memory, ordered)
        runner.logger.info(line, extra={"iteration_line": True})
        self._bar_postfix = {"loss": scalars["loss"], **({"lr": lr} if lr is not None else {})}
        record = {
            "lr": lr,
            "data_time": self._window("data_time").mean(),
            "time": time_mean,
            **ordered,
            **members,
            "epoch": runner.epoch + 1 if runner.by_epoch else None,
            "iter": done,
        }
        if memory is not None:
            record["memory"] = memory
        runner.scalars.write(record, done)

    def before_val_epoch(self, runner):
        self._val_time, self._val_data_time = Window(self.interval), Window(self.interval)
        self._val_all_time, self._val_all_data = Window(10**9), Window(10**9)

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for windows, key in ((self._val_time, "time"), (self._val_data_time, "data_time")):
            windows.update(runner.timing[key])
        self._val_all_time.update(runner.timing["time"])
        self._val_all_data.update(runner.timing["data_time"])
        total = len(runner.val_dataloader)
        if (batch_idx + 1) % self.interval == 0:
            head = self._val_header(runner, batch_idx + 1, total)
            eta = self._val_time.global_mean() * (total - batch_idx - 1)
            line = iteration_line(
                head, None, eta, self._val_time.mean(), self._val_data_time.mean(), cuda_memory_mb(runner.device), {}
            )
            runner.logger.info(line, extra={"iteration_line": True})

    def _val_header(self, runner, index, total):
        if runner.by_epoch:
            return header("val", epoch=runner.epoch, max_epochs=runner.max_epochs, index=index, total=total)
        return header("val", epoch=None, max_epochs=None, index=index, total=total)

    def after_val_epoch(self, runner, metrics=None):
        total = len(runner.val_dataloader)
        runner.logger.info(
            epoch_end_line(
                self._val_header(runner, total, total),
                {k: v for k, v in (metrics or {}).items() if not k.startswith(MEMBER_PREFIX)},
                self._val_all_time.global_mean(),
                self._val_all_data.global_mean(),
            )
        )
        step = runner.epoch if runner.by_epoch else runner.iter
        runner.scalars.write(
            {
                **(metrics or {}),
                "data_time": self._val_all_data.global_mean(),
                "time": self._val_all_time.global_mean(),
            },
            step,
        )
