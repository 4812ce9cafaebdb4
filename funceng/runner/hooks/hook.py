"""The `Hook` base class, the registry of hooks, and the hooks of a run built from its config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from funceng.errors import ConfigError, check_keys
from funceng.registry import HOOKS
from funceng.runner import compat

if TYPE_CHECKING:
    from funceng.runner.runner import Runner

PRIORITIES = {
    "HIGHEST": 0,
    "VERY_HIGH": 10,
    "HIGH": 30,
    "ABOVE_NORMAL": 40,
    "NORMAL": 50,
    "BELOW_NORMAL": 60,
    "LOW": 70,
    "VERY_LOW": 90,
    "LOWEST": 100,
}


class Hook:
    """Base class: override the stages you need. ``priority`` (a name or an int, lower runs first) orders hooks;
    a hook config may set it too (``dict(type="MyHook", priority="HIGH")``).

    The runner's counters read as in MMEngine: during ``after_train_iter`` ``runner.iter`` is the index of the
    iteration just run (so ``runner.iter + 1`` iterations are done), and during ``after_train_epoch``
    ``runner.epoch`` is the index of the epoch just finished.
    """

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

    def extra_state(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Tensors this hook keeps in the TrainState (created once, saved and resumed with it)."""
        return {}

    @property
    def priority_value(self) -> int:
        return PRIORITIES[self.priority] if isinstance(self.priority, str) else int(self.priority)

    # -- MMEngine's helpers for "is it time?" ----------------------------------------------------------------------

    def every_n_epochs(self, runner: Runner, n: int, start: int = 0) -> bool:
        done = runner.epoch + 1 - start
        return n > 0 and done >= 0 and done % n == 0

    def every_n_train_iters(self, runner: Runner, n: int, start: int = 0) -> bool:
        done = runner.iter + 1 - start
        return n > 0 and done >= 0 and done % n == 0

    def every_n_inner_iters(self, batch_idx: int, n: int) -> bool:
        return n > 0 and (batch_idx + 1) % n == 0

    def end_of_epoch(self, dataloader: Any, batch_idx: int) -> bool:
        return batch_idx + 1 == len(dataloader)

    def is_last_train_epoch(self, runner: Runner) -> bool:
        return runner.epoch + 1 == runner.max_epochs

    def is_last_train_iter(self, runner: Runner) -> bool:
        return runner.iter + 1 == runner.max_iters


DEFAULT_HOOKS = {"logger": "LoggerHook", "checkpoint": "CheckpointHook"}  # registered by their modules
DEFAULT_HOOK_CONFIGS = {"logger": {}, "checkpoint": {"interval": 1}}
BUILT_IN_DEFAULT_HOOKS = {  # MMEngine's other default hooks, whose work the loops do: key -> MMEngine's class name
    "timer": "IterTimerHook",
    "runtime_info": "RuntimeInfoHook",
    "param_scheduler": "ParamSchedulerHook",
    "sampler_seed": "DistSamplerSeedHook",
    "visualization": "NaiveVisualizationHook",
}


def build_hooks(default_hooks: Mapping[str, Any] | None, custom_hooks: Sequence[Any] | None) -> list[Hook]:
    """The run's hooks in priority order: ``default_hooks`` (``logger`` and ``checkpoint`` unless set to
    ``None``; MMEngine's other default hooks are built into the loops) and ``custom_hooks``."""
    default_hooks, custom_hooks = dict(default_hooks or {}), list(custom_hooks or [])
    check_keys("default_hooks", default_hooks, set(DEFAULT_HOOKS) | set(BUILT_IN_DEFAULT_HOOKS))
    hooks = []
    for name, type_name in DEFAULT_HOOKS.items():
        cfg = default_hooks.get(name, DEFAULT_HOOK_CONFIGS[name])  # a given dict replaces the default, as in MMEngine
        if cfg is not None:  # None disables it
            hooks.append(_build_hook(cfg, f"default_hooks.{name}", type_name))
    for name in BUILT_IN_DEFAULT_HOOKS:
        if default_hooks.get(name) is not None:
            compat.ignored(f"default_hooks.{name}")
    hooks += [_build_hook(cfg, f"custom_hooks[{i}]") for i, cfg in enumerate(custom_hooks)]
    return sorted(hooks, key=lambda h: h.priority_value)


def _build_hook(cfg: Any, where: str, default_type: str | None = None) -> Hook:
    if isinstance(cfg, Hook):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a Hook or a dict, got {type(cfg).__name__}")
    cfg = dict(cfg)
    priority = cfg.pop("priority", None)
    hook = HOOKS.build(cfg, where, default_type=default_type)
    if not isinstance(hook, Hook):
        raise ConfigError(f"{where}: {type(hook).__name__} is not a Hook")
    if priority is not None:
        if not isinstance(priority, int) and priority not in PRIORITIES:
            raise ConfigError(f"{where}.priority: expected an int or one of {list(PRIORITIES)}, got {priority!r}")
        hook.priority = priority
    return hook
