"""MMEngine's ``optim_wrapper`` dict as a funceng optimizer: the transform ``tx`` and the step's options (AMP,
gradient accumulation), with MMEngine's per-parameter rules (``paramwise_cfg``) and gradient clipping."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from funceng import optim
from funceng.errors import ConfigError, check_keys
from funceng.optim.imperative import AmpOptimWrapper, BoundUpdate, OptimWrapper
from funceng.optim.paramwise import ParamRule, group_hyperparameters, paramwise_multipliers
from funceng.registry import OPTIM_WRAPPERS, OPTIMIZERS, keyword_parameters, type_name
from funceng.runner import compat
from funceng.runner.param_scheduler import ScheduledHyperparams, TrainLength, schedule_tables

TORCH_OPTIMIZERS = {
    "SGD": optim.sgd,
    "Adam": optim.adam,
    "AdamW": optim.adamw,
    "Adagrad": optim.adagrad,
    "RMSprop": optim.rmsprop,
    "Adadelta": optim.adadelta,
    "Adamax": optim.adamax,
    "NAdam": optim.nadam,
    "RAdam": optim.radam,
    "Rprop": optim.rprop,
    "ASGD": optim.asgd,
    "Adafactor": optim.adafactor,
    "SparseAdam": optim.sparse_adam,
    "Muon": optim.muon,
}
for _name, _factory in TORCH_OPTIMIZERS.items():
    OPTIMIZERS.register(_factory, name=_name)
OPTIM_WRAPPERS.register(OptimWrapper)
OPTIM_WRAPPERS.register(AmpOptimWrapper)
# torch.optim options that choose an implementation, not a result: funceng always runs foreach kernels
IMPLEMENTATION_OPTIONS = {"foreach", "fused", "capturable", "differentiable"}
REFUSED_OPTIMIZERS = {
    "LBFGS": "it re-evaluates the loss through a closure several times per step, which a pure (state, batch) step "
    "cannot do; use Adam or SGD, or train imperatively with an overridden train_step",
}
WRAPPER_KEYS = {"type", "optimizer", "clip_grad", "accumulative_counts", "dtype", "paramwise_cfg", "loss_scale"}
WRAPPER_KEYS |= {"constructor"}  # "DefaultOptimWrapperConstructor" here; others build wrapper objects
AMP_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def optimizer_kwargs(optim_wrapper: Mapping[str, Any]) -> tuple[Callable[..., optim.GradientTransformation], dict]:
    """The optimizer factory named by ``optim_wrapper.optimizer`` and its keyword arguments, checked."""
    check_keys("optim_wrapper", optim_wrapper, WRAPPER_KEYS)
    opt_cfg = optim_wrapper.get("optimizer")
    if not isinstance(opt_cfg, Mapping):
        raise ConfigError("optim_wrapper: missing 'optimizer' (e.g. optimizer=dict(type='SGD', lr=0.01))")
    if "type" not in opt_cfg:
        raise ConfigError("optim_wrapper.optimizer: missing 'type' (e.g. type='SGD' or type=torch.optim.SGD)")
    name = type_name(opt_cfg["type"])
    if name in REFUSED_OPTIMIZERS:
        raise ConfigError(f"optim_wrapper.optimizer.type={name!r} is not supported: {REFUSED_OPTIMIZERS[name]}")
    factory = OPTIMIZERS.resolve(opt_cfg["type"], "optim_wrapper.optimizer.type")
    kwargs = {k: v for k, v in opt_cfg.items() if k != "type"}
    for option in sorted(IMPLEMENTATION_OPTIONS & set(kwargs)):
        compat.ignored(f"optim_wrapper.optimizer.{option}")
        del kwargs[option]
    check_keys(f"optim_wrapper.optimizer ({name})", kwargs, keyword_parameters(factory))
    if "lr" not in kwargs:
        raise ConfigError(f"optim_wrapper.optimizer ({name}): missing 'lr'")
    return factory, kwargs


@dataclass(frozen=True)
class OptimizerSetup:
    """What ``optim_wrapper`` and ``param_scheduler`` ask for: the transform (accumulating gradients over
    ``accumulative_counts`` iterations), the AMP dtype name or ``None``, the scheduled hyperparameters
    (`funceng.runner.param_scheduler.ScheduledHyperparams`: the train step's ``schedule``), the parameters
    that ``paramwise_cfg`` freezes with ``lr_mult=0`` and fp16's initial loss scale (``None``: 2**16)."""

    tx: optim.GradientTransformation
    amp: str | dict | None
    hyperparams: ScheduledHyperparams
    frozen: tuple[str, ...] = ()
    init_scale: float | None = None


def build_optimizer(
    optim_wrapper: Mapping[str, Any],
    model: nn.Module,
    param_scheduler: Any,
    length: TrainLength,
    sharded: bool = False,
    device: Any = None,
    swept: Any = (),
) -> OptimizerSetup:
    """The optimizer that ``optim_wrapper`` describes for ``model``, its hyperparameters driven by
    ``param_scheduler`` over a run of ``length``.

    Param groups come from ``paramwise_cfg`` (one per distinct `funceng.optim.paramwise.ParamRule`). Each group's
    optimizer keeps its learning rate and scheduled hyperparameters in the state (`funceng.optim.inject_hyperparams`).
    ``sharded``: the gradients are row shards (FSDP2), so clipping by norm sums the squared norms over the ranks.
    ``swept``: names of hyperparameters a population gives each member its own value of (kept in the state too).
    """
    factory, kwargs = optimizer_kwargs(optim_wrapper)
    wrapper = OPTIM_WRAPPERS.resolve(optim_wrapper.get("type", "OptimWrapper"), "optim_wrapper.type")
    defaults = {
        k: p.default
        for k, p in inspect.signature(factory).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    paramwise = optim_wrapper.get("paramwise_cfg")
    optimizer_name = type_name(optim_wrapper["optimizer"]["type"])
    if paramwise:
        rules = paramwise_multipliers(model, paramwise, kwargs.get("weight_decay"))
        # groups in the order of their first parameter, so the first (the logged lr) is MMEngine's param_groups[0]
        trained = list(dict.fromkeys(rule for rule in rules.values() if rule.lr_mult != 0))
        groups = {_label(rule): _group_kwargs(kwargs, defaults, rule, optimizer_name) for rule in trained}
        frozen = tuple(name for name, rule in rules.items() if rule.lr_mult == 0)
    else:
        groups, frozen = {None: dict(kwargs)}, ()
    tables = schedule_tables(param_scheduler, [{**defaults, **g} for g in groups.values()], length)
    hyperparams = ScheduledHyperparams(tables, list(groups), device)
    injected = optim.inject_hyperparams(factory, injectable(factory, hyperparams.injected | set(swept), optimizer_name))
    if paramwise:
        transforms = {label: injected(**g) for label, g in groups.items()}
        if frozen:  # lr_mult=0 freezes for real: no update at all (with weight decay or AdamW too), no state
            transforms["frozen"] = optim.set_to_zero()
        labels = {n: _label(rule) if rule.lr_mult != 0 else "frozen" for n, rule in rules.items()}
        tx = optim.partition(transforms, labels)
    else:
        tx = injected(**groups[None])
    tx = _with_clipping(tx, optim_wrapper.get("clip_grad"), sharded)
    amp, init_scale = None, None
    if wrapper is AmpOptimWrapper:
        amp, init_scale = _amp_and_loss_scale(optim_wrapper.get("dtype", "float16"), optim_wrapper.get("loss_scale"))
    elif "dtype" in optim_wrapper or "loss_scale" in optim_wrapper:
        raise ConfigError("optim_wrapper: 'dtype' and 'loss_scale' need type='AmpOptimWrapper'")
    tx = optim.accumulate(tx, int(optim_wrapper.get("accumulative_counts", 1)), total=length.max_iters)
    return OptimizerSetup(tx, amp, hyperparams, frozen, init_scale)


LOSS_SCALE_KEYS = {"init_scale", "growth_factor", "backoff_factor", "growth_interval", "enabled"}


def _amp_and_loss_scale(dtype: Any, loss_scale: Any) -> tuple[str | dict, float | None]:
    """The train step's ``amp`` and the initial loss scale for MMEngine's ``AmpOptimWrapper(dtype, loss_scale)``:
    ``"dynamic"`` (the default) is GradScaler's defaults, a number a static scale (non-finite steps are still
    skipped), a dict GradScaler's arguments."""
    if dtype not in AMP_DTYPES:
        raise ConfigError(f"optim_wrapper.dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
    if AMP_DTYPES[dtype] == "bfloat16" or loss_scale in (None, "dynamic"):
        if loss_scale not in (None, "dynamic"):
            raise ConfigError("optim_wrapper.loss_scale: bfloat16 needs no loss scaling; leave loss_scale out")
        return AMP_DTYPES[dtype], None
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        return {"dtype": "float16", "growth_factor": 1.0, "backoff_factor": 1.0}, float(loss_scale)
    if isinstance(loss_scale, Mapping):
        check_keys("optim_wrapper.loss_scale", loss_scale, LOSS_SCALE_KEYS)
        if not loss_scale.get("enabled", True):
            raise ConfigError(
                "optim_wrapper.loss_scale.enabled=False: float16 without loss scaling underflows; use "
                "dtype='bfloat16', which needs none"
            )
        options = {k: v for k, v in loss_scale.items() if k not in ("init_scale", "enabled")}
        return {"dtype": "float16", **options}, loss_scale.get("init_scale")
    raise ConfigError(f"optim_wrapper.loss_scale: expected 'dynamic', a number or a dict, got {loss_scale!r}")


def _label(rule: ParamRule) -> str:
    return ",".join([f"lr_mult={rule.lr_mult}", f"decay_mult={rule.decay_mult}"] + [f"{k}={v}" for k, v in rule.extra])


def _group_kwargs(kwargs: dict, defaults: dict, rule: ParamRule, optimizer: str) -> dict:
    """One param group's optimizer arguments under ``rule`` (`funceng.optim.paramwise.group_hyperparameters`)."""
    for key, value in rule.extra:
        if key not in defaults:
            raise ConfigError(
                f"optim_wrapper.paramwise_cfg.custom_keys: {key}={value!r} is not a hyperparameter of {optimizer} "
                f"(it takes {sorted(defaults)})"
            )
    return {**kwargs, **group_hyperparameters(rule, kwargs["lr"], kwargs.get("weight_decay"))}


def injectable(factory: Callable, names: set[str], optimizer: str) -> list[str]:
    """``names`` that a schedule may drive in ``factory``: the learning rate, momentum / betas and weight decay
    (the hyperparameters funceng's optimizers accept as state tensors)."""
    accepted = keyword_parameters(factory) or set()
    schedulable = {"lr", "momentum", "betas", "weight_decay"} & accepted
    unknown = names - schedulable
    if unknown:
        raise ConfigError(
            f"param_scheduler: {optimizer}'s {sorted(unknown)} cannot be scheduled; funceng schedules "
            f"{sorted(schedulable)} of {optimizer}"
        )
    return sorted(names)


def _with_clipping(tx: optim.GradientTransformation, clip: Mapping | None, sharded: bool):
    if not clip:
        return tx
    clip_type = clip.get("type", "norm")
    if clip_type == "norm":
        check_keys("optim_wrapper.clip_grad", clip, {"type", "max_norm", "norm_type", "error_if_nonfinite"})
        if clip.get("norm_type", 2) != 2:
            raise ConfigError("optim_wrapper.clip_grad.norm_type: only the L2 norm (2) is supported")
        if clip.get("error_if_nonfinite", False):
            raise ConfigError(
                "optim_wrapper.clip_grad.error_if_nonfinite=True is not supported: a pure step cannot raise "
                "without a host sync. funceng stops the run when the loss becomes non-finite, naming the iteration"
            )
        return optim.chain(optim.clip_by_global_norm(clip["max_norm"], across_ranks=sharded), tx)
    if clip_type == "value":
        check_keys("optim_wrapper.clip_grad", clip, {"type", "clip_value"})
        return optim.chain(optim.clip_by_value(clip["clip_value"]), tx)
    raise ConfigError(f"optim_wrapper.clip_grad.type: expected 'norm' or 'value', got {clip_type!r}")


def scale_lr(
    optim_wrapper: Mapping[str, Any], auto_scale_lr: Mapping[str, Any], global_batch: int | None, logger: Any
) -> Mapping[str, Any]:
    """``auto_scale_lr``, the linear scaling rule: the optimizer's ``lr`` times ``global_batch *
    accumulative_counts / base_batch_size``; the dict (its keys checked by the Runner) turns it on unless
    ``enable=False``."""
    if not auto_scale_lr or not auto_scale_lr.get("enable", True):
        return optim_wrapper
    if not isinstance(optim_wrapper, Mapping):
        raise ConfigError("auto_scale_lr scales the lr of a config: give optim_wrapper as a dict, not an object")
    if "base_batch_size" not in auto_scale_lr:
        raise ConfigError("auto_scale_lr: missing 'base_batch_size' (the batch size the lr was tuned for)")
    if not global_batch:
        raise ConfigError("auto_scale_lr needs a train_dataloader with a batch_size")
    opt_cfg = dict(optim_wrapper.get("optimizer", {}))
    if "lr" not in opt_cfg:
        raise ConfigError("auto_scale_lr: optim_wrapper.optimizer has no 'lr' to scale")
    real = global_batch * int(optim_wrapper.get("accumulative_counts", 1))
    ratio = real / auto_scale_lr["base_batch_size"]
    logger.info(
        f"LR is set based on batch size of {auto_scale_lr['base_batch_size']} and the current batch size "
        f"is {real}. Scaling the original LR by {ratio}."
    )
    return {**optim_wrapper, "optimizer": {**opt_cfg, "lr": opt_cfg["lr"] * ratio}}


def config_facade(runner: Any, cfg: Mapping[str, Any], hyperparams: ScheduledHyperparams) -> OptimWrapper:
    """``runner.optim_wrapper`` after a config built the pure step: an `OptimWrapper` that hooks can read
    (``get_lr()``, ``get_momentum()``: the first group's scheduled values at the hooks' iteration;
    ``optimizer.param_groups``) but
    not step, since the compiled train step updates the state itself."""

    def refuse(grads):
        raise TypeError(
            "runner.optim_wrapper.step(): the Runner's compiled train step updates the state; to update it "
            "yourself, override BaseModel.train_step(data, optim_wrapper)"
        )

    def current() -> list[dict]:
        return [hyperparams.group_values(runner.state, 0, runner.lr_step())]

    group = {k: v for k, v in (cfg.get("optimizer") or {}).items() if k != "type"}
    facade = OptimWrapper(accumulative_counts=int(cfg.get("accumulative_counts", 1)))
    names = [n for n, p in runner.model.named_parameters() if p.requires_grad]
    facade.bind(runner.model, BoundUpdate(names, refuse, current, [group]))
    return facade
