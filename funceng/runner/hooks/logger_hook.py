"""`LoggerHook`: MMEngine's training and validation log lines, and the scalars sent to the visualizer."""

from __future__ import annotations

import datetime
import re
import sys

import torch

from funceng.runner import compat
from funceng.runner.hooks.hook import HOOKS, Hook
from funceng.runner.log import (
    MEMBER_PREFIX,
    Window,
    cuda_memory_mb,
    epoch_end_line,
    header,
    iteration_line,
    position,
)
from funceng.runner.terminal import ProgressBar
from funceng.runner.trackers import flatten_config, run_artifacts


@HOOKS.register
class LoggerHook(Hook):
    """Logs time, data_time and losses every ``interval`` iterations in MMEngine's format, each the mean over the
    last ``log_processor.window_size`` iterations (10 by default, as MMEngine's), and writes them to
    ``vis_data/scalars.json`` (and any other visualizer backend).

    Losses stay on the device between log lines, so a compiled step is never synced more than once per line.
    ``progress``: ``True`` shows live bars instead of printing iteration lines to the terminal (the log file
    still gets every line): training's (the epoch's eta, it/s, loss, lr and the whole run's eta) and, while they
    run, validation's and testing's; ``"auto"`` does so when stdout is a terminal. Other log lines (validation
    metrics, checkpoints) print above the bars, never through them (`funceng.runner.terminal`).
    ``log_metric_by_epoch`` is accepted for MMEngine compatibility (`funceng.runner.compat`). A non-finite loss
    stops the run in the train loop, logger or not.
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
        self._eval_bar: ProgressBar | None = None
        self._show_bar = False
        self._config_sent = False
        self._bar_postfix: dict[str, float] = {}
        self._windows: dict[str, Window] = {}
        self._window_size = 10
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _window(self, key: str) -> Window:
        return self._windows.setdefault(key, Window(self._window_size))

    def before_run(self, runner):
        stream = getattr(runner.logger, "terminal_stream", sys.stdout)
        wanted = self.progress is True or (self.progress == "auto" and stream.isatty())
        self._show_bar = wanted and runner.rank == 0
        if runner.scalars.wants("add_config") and not self._config_sent:  # the trackers' params, once a run
            self._config_sent = True
            runner.scalars.add_config(flatten_config({**runner.config_summary(), **runner.cfg.to_dict()}))

    def before_train(self, runner):
        self._windows.clear()
        self._window_size = runner.log_processor["window_size"]  # MMEngine's LogProcessor: 10 by default
        runner.logger.terminal_filter.quiet = self._show_bar

    def before_train_epoch(self, runner):
        stream = runner.logger.terminal_stream
        if self._show_bar and runner.by_epoch:
            self._bar = ProgressBar(
                len(runner.train_dataloader),
                f"Epoch {runner.epoch + 1}/{runner.max_epochs}",
                stream,
                initial=runner.train_loop.batches_done,
            )
        elif self._show_bar:
            self._bar = ProgressBar(runner.max_iters, "Iter", stream, initial=runner.iter)

    def after_train_epoch(self, runner):
        if self._bar is not None and runner.by_epoch:
            self._bar.close()
            self._bar = None

    def after_train(self, runner):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        runner.logger.terminal_filter.quiet = False
        if runner.rank == 0 and runner.scalars.wants("add_artifacts"):
            runner.scalars.add_artifacts(run_artifacts(runner))

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
            if runner.by_epoch:  # the bar's own eta is the epoch's; the run's goes beside it
                run_eta = self._window("time").global_mean() * (runner.max_iters - done)
                self._bar_postfix["run eta"] = str(datetime.timedelta(seconds=int(run_eta)))
            self._bar.update(**self._bar_postfix)

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
        self._bar_postfix.update(loss=scalars["loss"], **({"lr": lr} if lr is not None else {}))
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
        self._before_eval_epoch(runner, "val")

    def before_test_epoch(self, runner):
        self._before_eval_epoch(runner, "test")

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._after_eval_iter(runner, batch_idx, "val")

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._after_eval_iter(runner, batch_idx, "test")

    def after_val_epoch(self, runner, metrics=None):
        self._after_eval_epoch(runner, metrics, "val")
        step = runner.epoch if runner.by_epoch else runner.iter
        runner.scalars.write(
            {
                **(metrics or {}),
                "data_time": self._val_all_data.global_mean(),
                "time": self._val_all_time.global_mean(),
            },
            step,
        )

    def after_test_epoch(self, runner, metrics=None):
        self._after_eval_epoch(runner, metrics, "test")

    def _before_eval_epoch(self, runner, mode):
        self._val_time, self._val_data_time = Window(self.interval), Window(self.interval)
        self._val_all_time, self._val_all_data = Window(10**9), Window(10**9)
        self._eval_total = len(runner.val_dataloader if mode == "val" else runner.test_dataloader)
        if self._show_bar:
            stream = runner.logger.terminal_stream
            self._eval_bar = ProgressBar(self._eval_total, mode.capitalize(), stream, leave=False)
            self._quiet_before_eval = runner.logger.terminal_filter.quiet
            runner.logger.terminal_filter.quiet = True

    def _after_eval_iter(self, runner, batch_idx, mode):
        for windows, key in ((self._val_time, "time"), (self._val_data_time, "data_time")):
            windows.update(runner.timing[key])
        self._val_all_time.update(runner.timing["time"])
        self._val_all_data.update(runner.timing["data_time"])
        if self._eval_bar is not None:
            self._eval_bar.update()
        total = self._eval_total
        if (batch_idx + 1) % self.interval == 0:
            head = self._eval_header(runner, batch_idx + 1, total, mode)
            eta = self._val_time.global_mean() * (total - batch_idx - 1)
            line = iteration_line(
                head, None, eta, self._val_time.mean(), self._val_data_time.mean(), cuda_memory_mb(runner.device), {}
            )
            runner.logger.info(line, extra={"iteration_line": True})

    def _eval_header(self, runner, index, total, mode):
        if mode == "test":  # MMEngine's: "Epoch(test) [10/10]", without an epoch
            return f"Epoch(test) {position(index, total)}"
        if runner.by_epoch:
            return header("val", epoch=runner.epoch, max_epochs=runner.max_epochs, index=index, total=total)
        return header("val", epoch=None, max_epochs=None, index=index, total=total)

    def _after_eval_epoch(self, runner, metrics, mode):
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None
            runner.logger.terminal_filter.quiet = self._quiet_before_eval
        total = self._eval_total
        runner.logger.info(
            epoch_end_line(
                self._eval_header(runner, total, total, mode),
                {k: v for k, v in (metrics or {}).items() if not k.startswith(MEMBER_PREFIX)},
                self._val_all_time.global_mean(),
                self._val_all_data.global_mean(),
            )
        )
