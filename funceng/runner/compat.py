"""MMEngine arguments that funceng accepts so MMEngine scripts and configs run, but does not act on.

Every such argument is listed in `IGNORED` with the reason it has no effect here. Giving one a value (other than
its default) records it with `ignored`; the Runner then logs it once per process as a warning, so nothing is
ignored silently. Arguments that would change results if ignored are refused with a `ConfigError` instead,
where they are read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

IGNORED: dict[str, str] = {
    "Runner(default_scope)": "funceng has one registry per kind of component and no scopes",
    "BaseMetric(collect_device)": "results are always gathered through the CPU process group",
    "BaseMetric(collect_dir)": "results are always gathered in memory",
    "LoggerHook(log_metric_by_epoch)": "validation metrics are logged at the epoch (or iteration) they belong to",
    "default_hooks.timer": "the loops time every iteration themselves",
    "default_hooks.runtime_info": "the learning rate and the position in the run are logged by LoggerHook",
    "default_hooks.param_scheduler": "param_scheduler is applied inside the train step",
    "default_hooks.sampler_seed": "the loops call the sampler's set_epoch themselves",
    "default_hooks.visualization": "funceng draws no predictions; scalars go to visualizer.vis_backends",
    "model_wrapper_cfg.find_unused_parameters": "unused parameters get zero gradients, so it always holds",
    "param_scheduler.verbose": "the learning rate is logged by LoggerHook",
    "optim_wrapper.optimizer.foreach": "funceng's optimizers always run foreach kernels",
    "optim_wrapper.optimizer.fused": "funceng's optimizers always run foreach kernels (compiled: fused by inductor)",
    "optim_wrapper.optimizer.capturable": "funceng's optimizer state is always on the parameters' device",
    "optim_wrapper.optimizer.differentiable": "the optimizer runs outside autograd, inside the pure step",
    "optim_wrapper.paramwise_cfg.dcn_offset_lr_mult": "it acts on mmcv's deformable convolutions only",
    "visualizer.type": "funceng has one visualizer; its backends come from visualizer.vis_backends",
    "visualizer.name": "funceng has one visualizer per Runner",
}

_pending: list[str] = []
_logged: set[str] = set()


def ignored(argument: str) -> None:
    """Records that ``argument`` (a key of `IGNORED`) was given; `log_ignored` reports it once per process."""
    if argument not in IGNORED:
        raise KeyError(f"{argument!r} is not listed in funceng.runner.compat.IGNORED")
    if argument not in _logged and argument not in _pending:
        _pending.append(argument)


def log_ignored(logger: logging.Logger) -> None:
    """Logs each recorded argument not logged before, once, as a warning."""
    for argument in _pending:
        logger.warning(f"{argument} is accepted for MMEngine compatibility and ignored: {IGNORED[argument]}.")
        _logged.add(argument)
    _pending.clear()


def note_metrics(metrics: Iterable[Any]) -> None:
    """Records the compatibility-only arguments `funceng.evaluator.BaseMetric` objects were given."""
    for metric in metrics:
        if getattr(metric, "collect_device", "cpu") != "cpu":
            ignored("BaseMetric(collect_device)")
        if getattr(metric, "collect_dir", None) is not None:
            ignored("BaseMetric(collect_dir)")
