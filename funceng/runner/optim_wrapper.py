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
from funceng.optim.paramwise import paramwise_multipliers
from funceng.registry import OPTIM_WRAPPERS, OPTIMIZERS, keyword_parameters, type_name

OPTIMIZERS.register(optim.sgd, name="SGD")
OPTIMIZERS.register(optim.adam, name="Adam")
OPTIMIZERS.register(optim.adamw, name="AdamW")
OPTIM_WRAPPERS.register(OptimWrapper)
OPTIM_WRAPPERS.register(AmpOptimWrapper)
WRAPPER_KEYS = {"type", "optimizer", "clip_grad", "accumulative_counts", "dtype", "paramwise_cfg", "loss_scale"}
WRAPPER_KEYS |= {"constructor"}  # "DefaultOptimWrapperConstructor" here; others build wrapper objects
AMP_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class OptimizerSetup:
    """What ``optim_wrapper`` asks for: the transform (accumulating gradients over ``accumulate`` iterations),
    the AMP dtype name or ``None``, the optimizer's base learning rate, and the parameters that
    ``paramwise_cfg`` freezes with ``lr_mult=0``."""

    tx: optim.GradientTransformation
    amp: str | None
    accumulate: int
    base_lr: float
    frozen: tuple[str, ...] = ()


def optimizer_kwargs(optim_wrapper: Mapping[str, Any]) -> tuple[Callable[..., optim.GradientTransformation], dict]:
    """The optimizer factory named by ``optim_wrapper.optimizer`` and its keyword arguments, checked."""
    check_keys("optim_wrapper", optim_wrapper, WRAPPER_KEYS)
    opt_cfg = optim_wrapper.get("optimizer")
    if not isinstance(opt_cfg, Mapping):
        raise ConfigError("optim_wrapper: missing 'optimizer' (e.g. optimizer=dict(type='SGD', lr=0.01))")
    if "type" not in opt_cfg:
        raise ConfigError("optim_wrapper.optimizer: missing 'type' (e.g. type='SGD' or type=torch.optim.SGD)")
    factory = OPTIMIZERS.resolve(opt_cfg["type"], "optim_wrapper.optimizer.type")
    kwargs = {k: v for k, v in opt_cfg.items() if k != "type"}
    name = type_name(opt_cfg["type"])
    check_keys(f"optim_wrapper.optimizer ({name})", kwargs, keyword_parameters(factory))
    if "lr" not in kwargs:
        raise ConfigError(f"optim_wrapper.optimizer ({name}): missing 'lr'")
    return factory, kwargs


def build_optimizer(
    optim_wrapper: Mapping[str, Any], model: nn.Module, lr: Any = None, sharded: bool = False
) -> OptimizerSetup:
    """The optimizer that ``optim_wrapper`` describes for ``model``.

    ``lr`` (a schedule from ``param_scheduler``) replaces the constant learning rate; param groups from
    ``paramwise_cfg`` scale it by their ``lr_mult``. ``sharded``: the gradients are row shards (FSDP2), so
    clipping by norm sums the squared norms over the ranks.
    """
    factory, kwargs = optimizer_kwargs(optim_wrapper)
    wrapper = OPTIM_WRAPPERS.resolve(optim_wrapper.get("type", "OptimWrapper"), "optim_wrapper.type")
    base_lr = kwargs["lr"]
    lr = base_lr if lr is None else lr
    paramwise = optim_wrapper.get("paramwise_cfg")
    if paramwise:
        mults = paramwise_multipliers(model, paramwise)
        decay = kwargs.get("weight_decay", inspect.signature(factory).parameters["weight_decay"].default)
        label = lambda lr_mult, decay_mult: f"lr_mult={lr_mult},decay_mult={decay_mult}"  # noqa: E731
        transforms = {  # lr_mult=0 freezes for real: no update at all (with weight decay or AdamW too), no state
            label(lm, dm): optim.set_to_zero()
            if lm == 0
            else factory(**{**kwargs, "lr": _scaled(lr, lm), "weight_decay": decay * dm})
            for lm, dm in sorted(set(mults.values()))
        }
        tx = optim.partition(transforms, {name: label(lm, dm) for name, (lm, dm) in mults.items()})
        frozen = tuple(name for name, (lm, _) in mults.items() if lm == 0)
    else:
        tx, frozen = factory(**{**kwargs, "lr": lr}), ()
    tx = _with_clipping(tx, optim_wrapper.get("clip_grad"), sharded)
    amp = None
    if wrapper is AmpOptimWrapper:
        dtype = optim_wrapper.get("dtype", "float16")
        if dtype not in AMP_DTYPES:
            raise ConfigError(f"optim_wrapper.dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
        amp = AMP_DTYPES[dtype]
        loss_scale = optim_wrapper.get("loss_scale", "dynamic")
        if loss_scale != "dynamic":
            raise ConfigError(
                f"optim_wrapper.loss_scale: only 'dynamic' loss scaling is supported (as "
                f"torch.amp.GradScaler's defaults), got {loss_scale!r}"
            )
    elif "dtype" in optim_wrapper or "loss_scale" in optim_wrapper:
        raise ConfigError("optim_wrapper: 'dtype' and 'loss_scale' need type='AmpOptimWrapper'")
    accumulate = int(optim_wrapper.get("accumulative_counts", 1))
    return OptimizerSetup(optim.accumulate(tx, accumulate), amp, accumulate, base_lr, frozen)


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


def _scaled(lr: float | Callable, mult: float) -> float | Callable:
    if mult == 1.0:
        return lr
    if callable(lr):
        return lambda step: lr(step) * mult
    return lr * mult


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


def config_facade(runner: Any, cfg: Mapping[str, Any], schedule: Callable | None, base_lr: float) -> OptimWrapper:
    """``runner.optim_wrapper`` after a config built the pure step: an `OptimWrapper` that hooks can read
    (``get_lr()``: the scheduled lr of the base group; ``optimizer.param_groups``) but not step, since the
    compiled train step updates the state itself."""

    def refuse(grads):
        raise TypeError(
            "runner.optim_wrapper.step(): the Runner's compiled train step updates the state; to update it "
            "yourself, override BaseModel.train_step(data, optim_wrapper)"
        )

    def lrs() -> list[float]:
        return [float(schedule(runner.lr_step())) if schedule is not None else float(base_lr)]

    group = {k: v for k, v in (cfg.get("optimizer") or {}).items() if k != "type"}
    facade = OptimWrapper(accumulative_counts=int(cfg.get("accumulative_counts", 1)))
    names = [n for n, p in runner.model.named_parameters() if p.requires_grad]
    facade.bind(runner.model, BoundUpdate(names, refuse, lrs, [group]))
    return facade
