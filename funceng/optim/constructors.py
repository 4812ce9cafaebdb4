"""MMEngine's optimizer wrapper constructors: optimizer wrapper objects around ``torch.optim`` optimizers, built
from an ``optim_wrapper`` config (`build_optim_wrapper`), for Runner runs that train imperatively
(`funceng.runner.imperative_step`) and for scripts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from funceng.errors import ConfigError
from funceng.optim.imperative import AmpOptimWrapper, OptimWrapper, OptimWrapperDict
from funceng.optim.paramwise import group_hyperparameters, paramwise_multipliers
from funceng.registry import OPTIM_WRAPPER_CONSTRUCTORS


def is_wrapper_object(optim_wrapper: Any) -> bool:
    return isinstance(optim_wrapper, (OptimWrapper, OptimWrapperDict))


def build_optim_wrapper(model: nn.Module, cfg: Mapping[str, Any]) -> OptimWrapper | OptimWrapperDict:
    """MMEngine's ``build_optim_wrapper``: the config's ``constructor`` (default
    `DefaultOptimWrapperConstructor`, or one registered in ``OPTIM_WRAPPER_CONSTRUCTORS``) called on ``model``."""
    cfg = dict(cfg)
    constructor = cfg.pop("constructor", "DefaultOptimWrapperConstructor")
    paramwise_cfg = cfg.pop("paramwise_cfg", None)
    build = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type=constructor, optim_wrapper_cfg=cfg, paramwise_cfg=paramwise_cfg), "optim_wrapper.constructor"
    )
    return build(model)


@OPTIM_WRAPPER_CONSTRUCTORS.register
class DefaultOptimWrapperConstructor:
    """MMEngine's: an `OptimWrapper` (or `AmpOptimWrapper`) around the ``torch.optim`` optimizer the config names,
    with one param group per (lr_mult, decay_mult) of ``paramwise_cfg`` (MMEngine's rules)."""

    def __init__(self, optim_wrapper_cfg: Mapping[str, Any], paramwise_cfg: Mapping[str, Any] | None = None):
        self.optim_wrapper_cfg, self.paramwise_cfg = dict(optim_wrapper_cfg), paramwise_cfg

    def __call__(self, model: nn.Module) -> OptimWrapper:
        return wrapper_from_cfg(self.optim_wrapper_cfg, model, "optim_wrapper", self.paramwise_cfg)


@OPTIM_WRAPPER_CONSTRUCTORS.register
class MultiOptimWrapperConstructor:
    """MMEngine's: one wrapper per submodule named by the config's keys (``generator=dict(optimizer=...)``)."""

    def __init__(self, optim_wrapper_cfg: Mapping[str, Any], paramwise_cfg: Mapping[str, Any] | None = None):
        self.optim_wrapper_cfg, self.paramwise_cfg = dict(optim_wrapper_cfg), dict(paramwise_cfg or {})

    def __call__(self, model: nn.Module) -> OptimWrapperDict:
        built = {}
        for name, cfg in self.optim_wrapper_cfg.items():
            if not isinstance(getattr(model, name, None), nn.Module):
                raise ConfigError(f"optim_wrapper.{name}: the model has no submodule {name!r}")
            paramwise = self.paramwise_cfg.get(name)
            built[name] = wrapper_from_cfg(cfg, getattr(model, name), f"optim_wrapper.{name}", paramwise)
        return OptimWrapperDict(**built)


def _param_groups(module: nn.Module, opt_cfg: Mapping[str, Any], paramwise_cfg: Mapping | None) -> Any:
    """``module``'s parameters, or with ``paramwise_cfg`` one param group per distinct rule (MMEngine makes one
    per parameter; the values are the same)."""
    if not paramwise_cfg:
        return module.parameters()
    named = dict(module.named_parameters())
    base_wd = opt_cfg.get("weight_decay")
    groups: dict[Any, list] = {}
    for name, rule in paramwise_multipliers(module, paramwise_cfg, base_wd).items():
        groups.setdefault(rule, []).append(named[name])
    return [
        {"params": params, **group_hyperparameters(rule, opt_cfg["lr"], base_wd)} for rule, params in groups.items()
    ]


def wrapper_from_cfg(
    cfg: Mapping[str, Any], module: nn.Module, where: str, paramwise_cfg: Mapping | None = None
) -> OptimWrapper:
    """``dict(type="OptimWrapper" | "AmpOptimWrapper", optimizer=dict(type=<torch.optim name or class>, lr=...),
    ...)`` as a wrapper object over ``module``'s parameters."""
    cfg = dict(cfg)
    paramwise_cfg = cfg.pop("paramwise_cfg", None) or paramwise_cfg
    kind = cfg.pop("type", "OptimWrapper")
    kind = getattr(kind, "__name__", kind)
    opt_cfg = dict(cfg.pop("optimizer", None) or {})
    if "type" not in opt_cfg or "lr" not in opt_cfg:
        raise ConfigError(f"{where}: expected optimizer=dict(type=..., lr=...), got {opt_cfg}")
    opt_type = opt_cfg.pop("type")
    opt_class = opt_type if isinstance(opt_type, type) else getattr(torch.optim, str(opt_type), None)
    if opt_class is None:
        raise ConfigError(f"{where}.optimizer.type: torch.optim has no {opt_type!r}")
    wrapper_class = {"OptimWrapper": OptimWrapper, "AmpOptimWrapper": AmpOptimWrapper}.get(kind)
    if wrapper_class is None:
        raise ConfigError(f"{where}.type: expected 'OptimWrapper' or 'AmpOptimWrapper', got {kind!r}")
    try:
        optimizer = opt_class(_param_groups(module, {**opt_cfg, "lr": opt_cfg["lr"]}, paramwise_cfg), **opt_cfg)
        return wrapper_class(optimizer=optimizer, **cfg)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
