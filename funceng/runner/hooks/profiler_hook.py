"""`ProfilerHook`: profiles training iterations with ``torch.profiler`` (MMEngine's ProfilerHook)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from funceng.errors import ConfigError, check_keys
from funceng.runner.hooks.hook import HOOKS, Hook

SCHEDULE_KEYS = {"wait", "warmup", "active", "repeat", "skip_first"}
TRACE_TYPES = {"tb_trace": {"type", "dir_name"}, "log_trace": {"type", "sort_by", "row_limit"}}


@HOOKS.register
class ProfilerHook(Hook):
    """Runs training under ``torch.profiler.profile`` for a few iterations, then stops profiling.

    ``schedule``: ``dict(wait=, warmup=, active=, repeat=1, skip_first=0)`` in iterations (torch.profiler's
    schedule; with one, ``by_epoch`` does not apply); without one, the first ``profile_times`` epochs
    (``by_epoch=True``) or iterations are profiled whole.

    ``on_trace_ready``: what each finished cycle produces, a dict or a list of them (default: both):

    - ``dict(type="tb_trace", dir_name=...)`` writes a TensorBoard trace (default dir: ``<log_dir>/profiler``;
      view it with ``tensorboard --logdir`` and the ``torch-tb-profiler`` plugin, or in Perfetto);
    - ``dict(type="log_trace", sort_by=..., row_limit=20)`` logs the ``key_averages`` table.

    ``json_trace_path`` also exports the last cycle as a Chrome trace. ``activity_with_cuda`` (default: on when
    CUDA is available) adds CUDA kernels; ``record_shapes``, ``profile_memory``, ``with_stack`` and
    ``with_flops`` are torch.profiler's options.
    """

    priority = "VERY_LOW"

    def __init__(
        self,
        by_epoch: bool = True,
        profile_times: int = 1,
        activity_with_cpu: bool = True,
        activity_with_cuda: bool | None = None,
        schedule: Mapping[str, int] | None = None,
        on_trace_ready: Mapping | list[Mapping] | None = None,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        with_flops: bool = False,
        json_trace_path: str | None = None,
    ):
        if not isinstance(profile_times, int) or profile_times < 1:
            raise ConfigError(f"ProfilerHook.profile_times: expected a positive int, got {profile_times!r}")
        if schedule is not None:
            check_keys("ProfilerHook.schedule", schedule, SCHEDULE_KEYS)
            if not schedule.get("active"):
                raise ConfigError("ProfilerHook.schedule: 'active' (the iterations to record) must be at least 1")
            by_epoch = False  # a schedule counts iterations, as torch.profiler's does (the start line says so)
        traces = on_trace_ready if on_trace_ready is not None else [{"type": "tb_trace"}, {"type": "log_trace"}]
        self.traces = [traces] if isinstance(traces, Mapping) else list(traces)
        for i, trace in enumerate(self.traces):
            kind = trace.get("type")
            if kind not in TRACE_TYPES:
                raise ConfigError(
                    f"ProfilerHook.on_trace_ready[{i}].type: expected one of {sorted(TRACE_TYPES)}, got {kind!r}"
                )
            check_keys(f"ProfilerHook.on_trace_ready[{i}]", trace, TRACE_TYPES[kind])
        activities = [torch.profiler.ProfilerActivity.CPU] if activity_with_cpu else []
        if activity_with_cuda or (activity_with_cuda is None and torch.cuda.is_available()):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if not activities:
            raise ConfigError("ProfilerHook: activity_with_cpu and activity_with_cuda are both off: nothing to profile")
        self.by_epoch, self.profile_times, self.schedule = by_epoch, profile_times, dict(schedule or {})
        self.options = dict(
            activities=activities,
            record_shapes=record_shapes,
            profile_memory=profile_memory,
            with_stack=with_stack,
            with_flops=with_flops,
        )
        self.json_trace_path = json_trace_path
        self.profiler: torch.profiler.profile | None = None
        self.steps_left = 0
        self.trace_dirs: list[Path] = []
        self.tables: list[str] = []

    def before_train(self, runner) -> None:
        if self.schedule:
            cycle = self.schedule.get("wait", 0) + self.schedule.get("warmup", 0) + self.schedule["active"]
            self.steps_left = self.schedule.get("skip_first", 0) + cycle * self.schedule.get("repeat", 1)
            schedule = torch.profiler.schedule(**{"repeat": 1, **self.schedule})
        else:
            per_unit = len(runner.train_dataloader) if self.by_epoch else 1
            self.steps_left = self.profile_times * per_unit
            schedule = torch.profiler.schedule(wait=0, warmup=0, active=self.steps_left, repeat=1)
        if self.by_epoch and not runner.by_epoch:
            raise ConfigError("ProfilerHook(by_epoch=True) needs an epoch-based train loop: give by_epoch=False")
        self.profiler = torch.profiler.profile(
            schedule=schedule, on_trace_ready=self._cycle_done(runner), **self.options
        )
        self.profiler.__enter__()
        how = (
            f"schedule {self.schedule}, in iterations"
            if self.schedule
            else f"{self.profile_times} " + ("epoch(s)" if self.by_epoch else "iteration(s)")
        )
        runner.logger.info(f"ProfilerHook: profiling the next {self.steps_left} training iterations ({how})")

    def _cycle_done(self, runner):
        handlers = []
        for trace in self.traces:
            if trace["type"] == "tb_trace":
                folder = Path(trace.get("dir_name") or runner.log_dir / "profiler")
                self.trace_dirs.append(folder)
                handlers.append(torch.profiler.tensorboard_trace_handler(str(folder)))
            else:
                cuda = torch.profiler.ProfilerActivity.CUDA in self.options["activities"]
                sort_by = trace.get("sort_by") or ("self_cuda_time_total" if cuda else "self_cpu_time_total")
                row_limit = trace.get("row_limit", 20)

                def log_table(prof, sort_by=sort_by, row_limit=row_limit):
                    table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
                    self.tables.append(table)
                    runner.logger.info(f"ProfilerHook: the {row_limit} costliest ops by {sort_by}\n{table}")

                handlers.append(log_table)

        def on_trace_ready(prof):
            for handler in handlers:
                handler(prof)
            if self.json_trace_path:
                prof.export_chrome_trace(str(self.json_trace_path))

        return on_trace_ready

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        self.steps_left -= 1
        if self.steps_left <= 0:
            self._stop(runner)

    def after_train(self, runner) -> None:
        if self.profiler is not None:  # training ended before the schedule did
            self._stop(runner)

    def _stop(self, runner) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        where = ", ".join(str(d) for d in self.trace_dirs)
        runner.logger.info("ProfilerHook: profiling done" + (f"; TensorBoard traces in {where}" if where else ""))
