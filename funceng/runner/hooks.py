"""Hooks: MMEngine's extension points, called by the Runner's loops at each stage of a run."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from funceng import dist
from funceng.errors import ConfigError, check_keys
from funceng.evaluator import improvement, metric_rule
from funceng.registry import Registry
from funceng.runner import compat
from funceng.runner.log import ProgressBar, Window, cuda_memory_mb, epoch_end_line, header, iteration_line

if TYPE_CHECKING:
    from funceng.runner.runner import Runner

HOOKS = Registry("hook")
PRIORITIES = {"HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50, "BELOW_NORMAL": 60,
              "LOW": 70, "VERY_LOW": 90, "LOWEST": 100}


class Hook:
    """Base class: override the stages you need. ``priority`` (a name or an int, lower runs first) orders hooks."""

    priority: str | int = "NORMAL"

    def before_run(self, runner: Runner) -> None: ...
    def after_run(self, runner: Runner) -> None: ...
    def before_train(self, runner: Runner) -> None: ...
    def after_train(self, runner: Runner) -> None: ...
    def before_train_epoch(self, runner: Runner) -> None: ...
    def after_train_epoch(self, runner: Runner) -> None: ...
    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None: ...
    def before_val(self, runner: Runner) -> None: ...
    def after_val(self, runner: Runner) -> None: ...
    def before_val_epoch(self, runner: Runner) -> None: ...
    def after_val_epoch(self, runner: Runner, metrics: dict[str, Any] | None = None) -> None: ...
    def before_val_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_val_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None: ...
    def before_test(self, runner: Runner) -> None: ...
    def after_test(self, runner: Runner) -> None: ...
    def before_test_epoch(self, runner: Runner) -> None: ...
    def after_test_epoch(self, runner: Runner, metrics: dict[str, Any] | None = None) -> None: ...
    def before_test_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None: ...
    def after_test_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None: ...
    def before_save_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        """``checkpoint`` is the metadata about to be saved with the state; add JSON-serialisable entries."""

    def after_load_checkpoint(self, runner: Runner, checkpoint: dict) -> None:
        """``checkpoint`` is the metadata of the checkpoint just resumed from."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints, so a resumed run continues where it stopped."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what `state_dict` returned."""

    def extra_state(self, params: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Tensors this hook keeps in the TrainState (created once, saved and resumed with it)."""
        return {}

    @property
    def priority_value(self) -> int:
        return PRIORITIES[self.priority] if isinstance(self.priority, str) else int(self.priority)


@HOOKS.register
class LoggerHook(Hook):
    """Logs smoothed time, data_time and losses every ``interval`` iterations in MMEngine's format and writes them
    to ``vis_data/scalars.json`` (and any other visualizer backend).

    Losses stay on the device between log lines, so a compiled step is never synced more than once per line.
    ``progress``: ``True`` shows a live bar (eta, it/s, loss) instead of printing iteration lines to the terminal
    (the log file still gets every line); ``"auto"`` does so when stdout is a terminal. ``log_metric_by_epoch`` is
    accepted for MMEngine compatibility (`funceng.runner.compat`). A non-finite loss stops the run in the train
    loop, logger or not.
    """

    priority = "BELOW_NORMAL"

    def __init__(self, interval: int = 10, ignore_last: bool = True, log_metric_by_epoch: bool = True,
                 progress: bool | str = "auto"):
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
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _window(self, key: str) -> Window:
        return self._windows.setdefault(key, Window(self.interval))

    def before_train(self, runner):
        self._windows.clear()
        wanted = self.progress is True or (self.progress == "auto" and sys.stdout.isatty())
        self._show_bar = wanted and runner.rank == 0
        runner.logger.terminal_filter.quiet = self._show_bar

    def before_train_epoch(self, runner):
        if self._show_bar and runner.by_epoch:
            self._bar = ProgressBar(len(runner.train_dataloader), f"Epoch {runner.epoch + 1}/{runner.max_epochs}",
                                    initial=runner.train_loop.batches_done)
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
        self._pending.append((runner.iter, {k: v for k, v in outputs.items() if k not in ("lr", "grad_norm")}))
        loader_len = len(runner.train_dataloader)
        end_of_epoch = runner.by_epoch and batch_idx + 1 == loader_len
        position = batch_idx + 1 if runner.by_epoch else runner.iter
        if position % self.interval == 0 or (not runner.by_epoch and runner.iter == runner.max_iters):
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
        return {k: self._window(k).mean() for k in keys}

    def _log_train(self, runner, batch_idx, outputs):
        scalars = self._drain(runner)
        lr = outputs["lr"].item() if "lr" in outputs else None
        if runner.by_epoch:
            head = header("train", epoch=runner.epoch + 1, max_epochs=runner.max_epochs,
                          index=batch_idx + 1, total=len(runner.train_dataloader))
        else:
            head = header("train", epoch=None, max_epochs=None, index=runner.iter, total=runner.max_iters)
        time_mean = self._window("time").mean()
        eta = self._window("time").global_mean() * (runner.max_iters - runner.iter)
        memory = cuda_memory_mb(runner.device)
        ordered = {k: v for k, v in scalars.items() if k != "loss"}
        ordered["loss"] = scalars["loss"]
        if "grad_norm" in outputs:
            ordered["grad_norm"] = outputs["grad_norm"].item()
        line = iteration_line(head, lr, eta, time_mean, self._window("data_time").mean(), memory, ordered)
        runner.logger.info(line, extra={"iteration_line": True})
        self._bar_postfix = {"loss": scalars["loss"], **({"lr": lr} if lr is not None else {})}
        record = {"lr": lr, "data_time": self._window("data_time").mean(), "time": time_mean, **ordered,
                  "epoch": runner.epoch + 1 if runner.by_epoch else None, "iter": runner.iter}
        if memory is not None:
            record["memory"] = memory
        runner.scalars.write(record, runner.iter)

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
            line = iteration_line(head, None, eta, self._val_time.mean(), self._val_data_time.mean(),
                                  cuda_memory_mb(runner.device), {})
            runner.logger.info(line, extra={"iteration_line": True})

    def _val_header(self, runner, index, total):
        if runner.by_epoch:
            return header("val", epoch=runner.epoch, max_epochs=runner.max_epochs, index=index, total=total)
        return header("val", epoch=None, max_epochs=None, index=index, total=total)

    def after_val_epoch(self, runner, metrics=None):
        total = len(runner.val_dataloader)
        runner.logger.info(epoch_end_line(self._val_header(runner, total, total), metrics or {},
                                          self._val_all_time.global_mean(), self._val_all_data.global_mean()))
        step = runner.epoch if runner.by_epoch else runner.iter
        runner.scalars.write({**(metrics or {}), "data_time": self._val_all_data.global_mean(),
                              "time": self._val_all_time.global_mean()}, step)


@HOOKS.register
class CheckpointHook(Hook):
    """Saves ``epoch_N`` / ``iter_N`` checkpoints every ``interval`` (and the last one), keeps at most
    ``max_keep_ckpts`` of them, and with ``save_best`` keeps ``best_<metric>_<epoch|iter>_N`` for the best value
    (``rule``: ``"greater"`` or ``"less"``, inferred from the name if not given). ``out_dir``: checkpoints go to
    ``out_dir/<work_dir's name>`` (``last_checkpoint`` stays in work_dir). The Runner's checkpoint manager
    (`funceng.runner.checkpointer`) does the saving and the bookkeeping."""

    priority = "VERY_LOW"

    def __init__(self, interval: int = 1, by_epoch: bool | None = None, max_keep_ckpts: int = -1,
                 save_best: str | None = None, rule: str | None = None, save_last: bool = True,
                 out_dir: str | None = None):
        metric_rule(save_best or "", rule)  # checks rule
        self.interval, self.by_epoch, self.max_keep_ckpts = interval, by_epoch, max_keep_ckpts
        self.save_best, self.rule, self.save_last, self.out_dir = save_best, rule, save_last, out_dir

    def before_train(self, runner):
        if self.by_epoch is None:
            self.by_epoch = runner.by_epoch

    def _due(self, count: int, last: int) -> bool:
        return count % self.interval == 0 or (count >= last and self.save_last)

    def after_train_epoch(self, runner):
        if self.by_epoch and self._due(runner.epoch, runner.max_epochs):
            runner.logger.info(f"Saving checkpoint at {runner.epoch} epochs")
            runner.checkpointer.save_rolling(f"epoch_{runner.epoch}", self.max_keep_ckpts)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.by_epoch and self._due(runner.iter, runner.max_iters):
            runner.logger.info(f"Saving checkpoint at {runner.iter} iterations")
            runner.checkpointer.save_rolling(f"iter_{runner.iter}", self.max_keep_ckpts)

    def after_val_epoch(self, runner, metrics=None):
        if not self.save_best or not metrics:
            return
        key = next(iter(metrics)) if self.save_best == "auto" else self.save_best
        if key not in metrics:
            raise KeyError(f"CheckpointHook.save_best={self.save_best!r} is not among the metrics {sorted(metrics)}")
        value = float(metrics[key])
        unit, count = ("epoch", runner.epoch) if runner.by_epoch else ("iter", runner.iter)
        name = f"best_{key.replace('/', '_')}_{unit}_{count}"
        if runner.checkpointer.save_if_best(key, value, metric_rule(key, self.rule), name):
            runner.logger.info(f"The best checkpoint with {value:.4f} {key} at {count} {unit} is saved to {name}.")


@HOOKS.register
class EMAHook(Hook):
    """An exponential moving average of the parameters, kept in the TrainState under ``"ema"``:
    ``ema <- (1 - momentum) * ema + momentum * params`` after every train iteration from ``begin_iter``.
    Validation and testing use the averaged weights."""

    priority = "NORMAL"

    def __init__(self, momentum: float = 0.0002, begin_iter: int = 0):
        self.momentum, self.begin_iter = momentum, begin_iter

    def extra_state(self, params):
        return {"ema": {name: p.detach().clone() for name, p in params.items()}}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        state = runner.state
        ema, params = list(state["ema"].values()), list(state["params"].values())
        if runner.iter <= self.begin_iter:
            torch._foreach_copy_(ema, params)
        else:
            torch._foreach_lerp_(ema, params, self.momentum)

    def before_val_epoch(self, runner):
        runner.eval_params_key = "ema"

    def after_val_epoch(self, runner, metrics=None):
        runner.eval_params_key = "params"

    before_test_epoch = before_val_epoch
    after_test_epoch = after_val_epoch


@HOOKS.register
class SyncBuffersHook(Hook):
    """Averages floating-point buffers (BatchNorm running statistics) over the ranks after each training epoch
    and before validation, so every rank evaluates, and every checkpoint holds, the same statistics.

    Gradients are averaged in every step regardless; without this hook each rank keeps the buffer statistics
    of its own shard of the data and checkpoints hold rank 0's.
    """

    def _sync(self, runner):
        if runner.state is not None:
            dist.all_reduce_mean_([b for b in runner.state["buffers"].values() if b.is_floating_point()])

    def after_train_epoch(self, runner):
        self._sync(runner)

    def before_val_epoch(self, runner):
        self._sync(runner)


@HOOKS.register
class EarlyStoppingHook(Hook):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` validations, or became
    non-finite, or reached ``stopping_threshold``."""

    priority = "LOWEST"

    def __init__(self, monitor: str, rule: str | None = None, min_delta: float = 0.1, strict: bool = False,
                 check_finite: bool = True, patience: int = 5, stopping_threshold: float | None = None):
        self.monitor, self.min_delta, self.strict = monitor, min_delta, strict
        self.rule = metric_rule(monitor, rule)
        self.check_finite, self.patience, self.stopping_threshold = check_finite, patience, stopping_threshold
        self.best: float | None = None
        self.wait = 0

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]

    def after_val_epoch(self, runner, metrics=None):
        metrics = metrics or {}
        if self.monitor not in metrics:
            if self.strict:
                raise KeyError(f"EarlyStoppingHook: monitor {self.monitor!r} not in metrics {sorted(metrics)}")
            return
        value = float(metrics[self.monitor])
        reason = None
        if self.check_finite and not math.isfinite(value):
            reason = f"{self.monitor} is {value}"
        elif self.stopping_threshold is not None and improvement(value, self.stopping_threshold, self.rule) >= 0:
            reason = f"{self.monitor} reached the threshold {self.stopping_threshold}"
        elif self.best is None or improvement(value, self.best, self.rule) > self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                reason = f"{self.monitor} did not improve by {self.min_delta} for {self.patience} validations"
        if reason:
            runner.stop_training = True
            runner.logger.info(f"Early stopping: {reason} (best {self.best}).")


DEFAULT_HOOKS = {"logger": LoggerHook, "checkpoint": CheckpointHook}
BUILT_IN_DEFAULT_HOOKS = ("timer", "runtime_info", "param_scheduler", "sampler_seed", "visualization")


def build_hooks(default_hooks: Mapping[str, Any] | None, custom_hooks: Sequence[Any] | None) -> list[Hook]:
    """The run's hooks in priority order: ``default_hooks`` (``logger`` and ``checkpoint`` unless set to
    ``None``; MMEngine's other default hooks are built into the loops) and ``custom_hooks``."""
    default_hooks, custom_hooks = dict(default_hooks or {}), list(custom_hooks or [])
    check_keys("default_hooks", default_hooks, set(DEFAULT_HOOKS) | set(BUILT_IN_DEFAULT_HOOKS))
    hooks = []
    for name, cls in DEFAULT_HOOKS.items():
        cfg = default_hooks.get(name, {})
        if cfg is not None:  # None disables it
            hooks.append(_build_hook(cfg, f"default_hooks.{name}", cls))
    for name in BUILT_IN_DEFAULT_HOOKS:
        if default_hooks.get(name) is not None:
            compat.ignored(f"default_hooks.{name}")
    hooks += [_build_hook(cfg, f"custom_hooks[{i}]") for i, cfg in enumerate(custom_hooks)]
    return sorted(hooks, key=lambda h: h.priority_value)


def _build_hook(cfg: Any, where: str, default_type: type | None = None) -> Hook:
    if isinstance(cfg, Hook):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a Hook or a dict, got {type(cfg).__name__}")
    hook = HOOKS.build(cfg, where, default_type=default_type)
    if not isinstance(hook, Hook):
        raise ConfigError(f"{where}: {type(hook).__name__} is not a Hook")
    return hook
