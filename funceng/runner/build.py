"""Building funceng objects from MMEngine-style config dicts, with errors that name the offending key."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from funceng import optim, schedules
from funceng.evaluator import BaseMetric
from funceng.runner.sampler import DefaultSampler

INF = 10**12
OPTIMIZERS: dict[str, Callable[..., optim.GradientTransformation]] = {
    "SGD": optim.sgd, "Adam": optim.adam, "AdamW": optim.adamw,
}
OPTIM_WRAPPERS = {"OptimWrapper", "AmpOptimWrapper"}
TRAIN_CFG_KEYS = {"type", "by_epoch", "max_epochs", "max_iters", "val_interval", "val_begin"}
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


class ConfigError(ValueError):
    """A config value that funceng cannot use; the message names the key and what was expected."""


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(where: str, cfg: Mapping[str, Any], allowed) -> None:
    for key in cfg:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_suggest(key, allowed)}; expected one of {sorted(allowed)}"
            )


def type_name(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", repr(value))


def check_train_cfg(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train_cfg`` with defaults filled in; typos and a missing length are errors."""
    check_keys("train_cfg", train_cfg, TRAIN_CFG_KEYS)
    cfg = dict(train_cfg)
    loop = cfg.pop("type", None)
    by_epoch = cfg.get("by_epoch", loop != "IterBasedTrainLoop")
    cfg["by_epoch"] = by_epoch
    needed = "max_epochs" if by_epoch else "max_iters"
    if needed not in cfg:
        raise ConfigError(f"train_cfg: by_epoch={by_epoch} needs {needed!r} (got keys {sorted(train_cfg)})")
    if not isinstance(cfg[needed], int) or cfg[needed] < 1:
        raise ConfigError(f"train_cfg.{needed} must be a positive int, got {cfg[needed]!r}")
    cfg.setdefault("val_interval", 1 if by_epoch else 1000)
    cfg.setdefault("val_begin", 1)
    return cfg


# -- optimizer ---------------------------------------------------------------------------------------------------

def _optimizer_factory(opt_cfg: Mapping[str, Any]) -> tuple[str, Callable[..., optim.GradientTransformation], dict]:
    if "type" not in opt_cfg:
        raise ConfigError("optim_wrapper.optimizer: missing 'type' (e.g. type='SGD' or type=torch.optim.SGD)")
    name = type_name(opt_cfg["type"])
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"optim_wrapper.optimizer.type: unknown optimizer {name!r}{_suggest(name, OPTIMIZERS)}; "
            f"supported: {sorted(OPTIMIZERS)}"
        )
    factory = OPTIMIZERS[name]
    kwargs = {k: v for k, v in opt_cfg.items() if k != "type"}
    check_keys(f"optim_wrapper.optimizer ({name})", kwargs, inspect.signature(factory).parameters)
    if "lr" not in kwargs:
        raise ConfigError(f"optim_wrapper.optimizer ({name}): missing 'lr'")
    return name, factory, kwargs


def _paramwise_multipliers(model: nn.Module, paramwise_cfg: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``{param name: (lr_mult, decay_mult)}`` following MMEngine's ``DefaultOptimWrapperConstructor``."""
    allowed = {"custom_keys", "bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult",
               "flat_decay_mult"}
    check_keys("optim_wrapper.paramwise_cfg", paramwise_cfg, allowed)
    custom = paramwise_cfg.get("custom_keys", {})
    for key, mults in custom.items():
        check_keys(f"optim_wrapper.paramwise_cfg.custom_keys[{key!r}]", mults, {"lr_mult", "decay_mult"})
    # Longer keys win, then alphabetical: the order MMEngine matches them in.
    ordered = sorted(sorted(custom), key=len, reverse=True)
    result = {}
    for module_name, module in model.named_modules():
        for short, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{short}" if module_name else short
            match = next((key for key in ordered if key in name), None)
            if match is not None:
                result[name] = (custom[match].get("lr_mult", 1.0), custom[match].get("decay_mult", 1.0))
                continue
            lr_mult, decay_mult = 1.0, 1.0
            is_norm = isinstance(module, NORM_LAYERS)
            if short == "bias" and not is_norm:
                lr_mult = paramwise_cfg.get("bias_lr_mult", 1.0)
                decay_mult = paramwise_cfg.get("bias_decay_mult", 1.0)
            if is_norm:
                decay_mult = paramwise_cfg.get("norm_decay_mult", 1.0)
            elif isinstance(module, nn.Conv2d) and module.in_channels == module.groups and param.ndim > 1:
                decay_mult = paramwise_cfg.get("dwconv_decay_mult", 1.0)
            elif param.ndim == 1 and "flat_decay_mult" in paramwise_cfg:
                decay_mult = paramwise_cfg["flat_decay_mult"]
            result[name] = (lr_mult, decay_mult)
    return result


def _scaled(lr: float | Callable, mult: float):
    if mult == 1.0:
        return lr
    if callable(lr):
        return lambda step: lr(step) * mult
    return lr * mult


def build_optimizer(
    optim_wrapper: Mapping[str, Any], model: nn.Module, lr_schedule: Callable | None = None, sharded: bool = False
) -> tuple[optim.GradientTransformation, str | None, int, float]:
    """``(tx, amp, accumulate, base_lr)`` from an MMEngine ``optim_wrapper`` dict.

    ``lr_schedule`` (from ``param_scheduler``) replaces the constant learning rate; param groups from
    ``paramwise_cfg`` scale it by their ``lr_mult``. ``sharded``: the gradients are row shards (FSDP2), so
    clipping by norm sums the squared norms over the ranks.
    """
    check_keys("optim_wrapper", optim_wrapper,
               {"type", "optimizer", "clip_grad", "accumulative_counts", "dtype", "paramwise_cfg", "loss_scale"})
    wrapper = type_name(optim_wrapper.get("type", "OptimWrapper"))
    if wrapper not in OPTIM_WRAPPERS:
        raise ConfigError(f"optim_wrapper.type: unknown wrapper {wrapper!r}; supported: {sorted(OPTIM_WRAPPERS)}")
    if "optimizer" not in optim_wrapper:
        raise ConfigError("optim_wrapper: missing 'optimizer' (e.g. optimizer=dict(type='SGD', lr=0.01))")
    name, factory, kwargs = _optimizer_factory(optim_wrapper["optimizer"])
    base_lr = kwargs["lr"]
    lr = lr_schedule if lr_schedule is not None else base_lr

    paramwise = optim_wrapper.get("paramwise_cfg")
    if paramwise:
        mults = _paramwise_multipliers(model, paramwise)
        groups = sorted(set(mults.values()))
        decay = kwargs.get("weight_decay", inspect.signature(factory).parameters["weight_decay"].default)
        transforms = {
            f"lr_mult={lm},decay_mult={dm}": factory(**{**kwargs, "lr": _scaled(lr, lm), "weight_decay": decay * dm})
            for lm, dm in groups
        }
        labels = {n: f"lr_mult={lm},decay_mult={dm}" for n, (lm, dm) in mults.items()}
        tx = optim.partition(transforms, labels)
    else:
        tx = factory(**{**kwargs, "lr": lr})

    clip = optim_wrapper.get("clip_grad")
    if clip:
        clip_type = clip.get("type", "norm")
        if clip_type == "norm":
            check_keys("optim_wrapper.clip_grad", clip, {"type", "max_norm", "norm_type", "error_if_nonfinite"})
            if clip.get("norm_type", 2) != 2:
                raise ConfigError("optim_wrapper.clip_grad.norm_type: only the L2 norm (2) is supported")
            tx = optim.chain(optim.clip_by_global_norm(clip["max_norm"], across_ranks=sharded), tx)
        elif clip_type == "value":
            check_keys("optim_wrapper.clip_grad", clip, {"type", "clip_value"})
            tx = optim.chain(optim.clip_by_value(clip["clip_value"]), tx)
        else:
            raise ConfigError(f"optim_wrapper.clip_grad.type: expected 'norm' or 'value', got {clip_type!r}")

    amp = None
    if wrapper == "AmpOptimWrapper":
        dtype = optim_wrapper.get("dtype", "float16")
        dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, dtype)
        if dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"optim_wrapper.dtype: expected 'float16' or 'bfloat16', got {dtype!r}")
        amp = dtype
    accumulate = int(optim_wrapper.get("accumulative_counts", 1))
    return optim.accumulate(tx, accumulate), amp, accumulate, base_lr


# -- learning-rate schedules ---------------------------------------------------------------------------------------

SCHEDULER_ARGS = {
    "ConstantLR": {"factor"},
    "LinearLR": {"start_factor", "end_factor"},
    "StepLR": {"step_size", "gamma"},
    "MultiStepLR": {"milestones", "gamma"},
    "ExponentialLR": {"gamma"},
    "CosineAnnealingLR": {"T_max", "eta_min", "eta_min_ratio"},
    "PolyLR": {"eta_min", "power"},
    "OneCycleLR": {"eta_max", "total_steps", "pct_start", "anneal_strategy", "div_factor", "final_div_factor",
                   "three_phase"},
}
COMMON_ARGS = {"type", "begin", "end", "by_epoch", "convert_to_iter_based", "last_step", "verbose"}


def _factor(kind: str, args: dict, base_lr: float, length: int, scale: int) -> Callable:
    """The factor ``lr / base_lr`` of one MMEngine scheduler as a function of its local step (``t - begin``)."""
    if kind == "ConstantLR":
        f = schedules.constant_factor(1.0, args.get("factor", 1 / 3), length - 1)
    elif kind == "LinearLR":
        f = schedules.linear(1.0, args.get("start_factor", 1 / 3), args.get("end_factor", 1.0), length - 1)
    elif kind == "StepLR":
        f = schedules.step(1.0, args["step_size"] * scale, args.get("gamma", 0.1))
    elif kind == "MultiStepLR":
        f = schedules.multi_step(1.0, [m * scale for m in args["milestones"]], args.get("gamma", 0.1))
    elif kind == "ExponentialLR":
        gamma = args["gamma"] ** (1.0 / scale)
        f = schedules.exponential(1.0, gamma)
    elif kind == "CosineAnnealingLR":
        t_max = args.get("T_max", length / scale) * scale
        eta_min = args.get("eta_min_ratio", None)
        eta_min = eta_min if eta_min is not None else args.get("eta_min", 0.0) / base_lr
        f = schedules.cosine_annealing(1.0, t_max, eta_min)
    elif kind == "PolyLR":
        f = schedules.polynomial(1.0, length, args.get("power", 1.0), args.get("eta_min", 0.0) / base_lr)
    elif kind == "OneCycleLR":
        total = args.get("total_steps", length / scale) * scale
        f = schedules.one_cycle(
            args["eta_max"] / base_lr, int(total), args.get("pct_start", 0.3), args.get("anneal_strategy", "cos"),
            args.get("div_factor", 25.0), args.get("final_div_factor", 1e4), args.get("three_phase", False),
        )
    else:
        raise AssertionError(kind)
    return f


def build_lr_schedule(param_scheduler: Mapping | list | None, base_lr: float, epoch_length: int) -> Callable | None:
    """The learning rate as a function of the optimizer's update count, from MMEngine ``param_scheduler`` dicts.

    Each scheduler acts on ``[begin, end)`` (epochs when ``by_epoch``, evaluated at epoch starts unless
    ``convert_to_iter_based``) and holds its last value after ``end``; active schedulers multiply.
    """
    if not param_scheduler:
        return None
    cfgs = [param_scheduler] if isinstance(param_scheduler, Mapping) else list(param_scheduler)
    parts = []
    for i, cfg in enumerate(cfgs):
        where = f"param_scheduler[{i}]"
        if "type" not in cfg:
            raise ConfigError(f"{where}: missing 'type'; supported: {sorted(SCHEDULER_ARGS)}")
        kind = type_name(cfg["type"])
        if kind not in SCHEDULER_ARGS:
            raise ConfigError(
                f"{where}.type: unknown scheduler {kind!r}{_suggest(kind, SCHEDULER_ARGS)}; "
                f"supported: {sorted(SCHEDULER_ARGS)}"
            )
        check_keys(f"{where} ({kind})", cfg, COMMON_ARGS | SCHEDULER_ARGS[kind])
        by_epoch = cfg.get("by_epoch", True)
        unit = epoch_length if by_epoch else 1
        iter_based = not by_epoch or cfg.get("convert_to_iter_based", False)
        scale = unit if iter_based else 1
        begin = cfg.get("begin", 0) * unit
        end = min(cfg.get("end", INF) * unit, INF)
        if end <= begin:
            raise ConfigError(f"{where}: end ({cfg.get('end')}) must be greater than begin ({cfg.get('begin', 0)})")
        length = (end - begin) if iter_based else math.ceil((end - begin) / unit)
        parts.append((begin, end, unit, iter_based, _factor(kind, cfg, base_lr, length, scale)))

    def schedule(step):
        t = torch.as_tensor(step).to(torch.float64)
        lr = t * 0.0 + base_lr
        for begin, end, unit, iter_based, factor in parts:
            local = torch.clamp(t, max=end - 1) - begin
            if not iter_based:
                local = torch.floor(local / unit)
            lr = lr * torch.where(t >= begin, factor(torch.clamp(local, min=0)), 1.0)
        return lr

    return schedule


# -- data and metrics ----------------------------------------------------------------------------------------------

def _resolve_dataset_type(name: str):
    try:
        import torchvision.datasets as tv_datasets
    except ImportError:  # pragma: no cover - torchvision is an optional extra
        tv_datasets = None
    if tv_datasets is not None and hasattr(tv_datasets, name):
        return getattr(tv_datasets, name)
    raise ConfigError(f"dataset type {name!r} is not a class nor a torchvision dataset name; pass the class itself")


def build_dataset(cfg: Any) -> Any:
    if not isinstance(cfg, Mapping):
        return cfg
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind is None:
        raise ConfigError("dataset: missing 'type'")
    cls = _resolve_dataset_type(kind) if isinstance(kind, str) else kind
    return cls(**cfg)


def build_dataloader(cfg: Any, name: str, seed: int | None = None, train: bool = False) -> Any:
    """A `DataLoader` from an MMEngine dataloader dict; built loaders (any iterable with ``len``) pass through.

    The sampler is a `DefaultSampler`: this rank's shard, reshuffled each epoch from ``seed + epoch`` (so the
    order does not depend on the number of ranks); evaluation loaders are not padded (``round_up=False``).
    """
    if cfg is None or not isinstance(cfg, Mapping):
        return cfg
    cfg = dict(cfg)
    if "dataset" not in cfg:
        raise ConfigError(f"{name}: missing 'dataset'")
    dataset = build_dataset(cfg.pop("dataset"))
    sampler = cfg.pop("sampler", None) or {}
    if isinstance(sampler, Mapping):
        check_keys(f"{name}.sampler", sampler, {"type", "shuffle", "seed", "round_up"})
        kind = type_name(sampler.get("type", "DefaultSampler"))
        if kind != "DefaultSampler":
            raise ConfigError(f"{name}.sampler.type: only 'DefaultSampler' is supported, got {kind!r}")
        shuffle = cfg.pop("shuffle", sampler.get("shuffle", True))
        sampler_seed = sampler.get("seed", seed)
        cfg["sampler"] = DefaultSampler(dataset, shuffle=shuffle, seed=sampler_seed or 0,
                                        round_up=sampler.get("round_up", train))
    else:
        cfg["sampler"] = sampler
    cfg.setdefault("pin_memory", torch.cuda.is_available())  # with non_blocking copies: transfers overlap compute
    collate = cfg.pop("collate_fn", None)
    if isinstance(collate, Mapping):
        kind = type_name(collate.get("type", "default_collate"))
        if kind not in ("default_collate", "pseudo_collate"):
            raise ConfigError(f"{name}.collate_fn.type: expected 'default_collate' or 'pseudo_collate', got {kind!r}")
        collate = None if kind == "default_collate" else (lambda batch: list(zip(*batch)))
    if collate is not None:
        cfg["collate_fn"] = collate
    try:
        return DataLoader(dataset, **cfg)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


MODEL_WRAPPERS = {"MMDistributedDataParallel": {"type", "find_unused_parameters"},
                  "MMFullyShardedDataParallel": {"type", "shard_modules"}}


def check_model_wrapper_cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """``model_wrapper_cfg`` with its type checked. Data parallelism (the default) needs no options: gradients
    of unused parameters are zeros, so ``find_unused_parameters`` always holds. ``MMFullyShardedDataParallel``
    shards the state with FSDP2; ``shard_modules`` are the module classes that form FSDP units."""
    cfg = dict(cfg or {"type": "MMDistributedDataParallel"})
    kind = type_name(cfg.get("type", "MMDistributedDataParallel"))
    if kind not in MODEL_WRAPPERS:
        raise ConfigError(f"model_wrapper_cfg.type: unknown wrapper {kind!r}{_suggest(kind, MODEL_WRAPPERS)}; "
                          f"supported: {sorted(MODEL_WRAPPERS)}")
    check_keys("model_wrapper_cfg", cfg, MODEL_WRAPPERS[kind])
    return {**cfg, "type": kind}


def build_model(cfg: Any) -> nn.Module:
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, Mapping) or "type" not in cfg or isinstance(cfg["type"], str):
        raise ConfigError(f"model: expected an nn.Module or dict(type=ModelClass, ...), got {cfg!r}")
    cfg = dict(cfg)
    model = cfg.pop("type")(**cfg)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {type_name(type(model))} is not an nn.Module")
    return model


def build_metric(cfg: Any) -> BaseMetric:
    if isinstance(cfg, BaseMetric):
        return cfg
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ConfigError(f"evaluator: expected a BaseMetric or a dict with 'type', got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if isinstance(kind, str):
        if kind not in BaseMetric.registry:
            raise ConfigError(f"evaluator: unknown metric {kind!r}; defined metrics: {sorted(BaseMetric.registry)}")
        kind = BaseMetric.registry[kind]
    metric = kind(**cfg)
    if not isinstance(metric, BaseMetric):
        raise ConfigError(f"evaluator: {type_name(kind)} is not a BaseMetric subclass")
    return metric
