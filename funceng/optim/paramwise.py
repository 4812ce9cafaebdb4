"""MMEngine's per-parameter rules (``paramwise_cfg``): each parameter's learning-rate and weight-decay
multipliers and extra hyperparameters, as ``DefaultOptimWrapperConstructor.add_params`` assigns them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from funceng.errors import ConfigError, check_keys

PARAMWISE_KEYS = {
    "custom_keys",
    "bias_lr_mult",
    "bias_decay_mult",
    "norm_decay_mult",
    "dwconv_decay_mult",
    "flat_decay_mult",
    "bypass_duplicate",
    "dcn_offset_lr_mult",
}
# MMEngine's norm layers: batch, instance, group and layer norm
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


class ParamRule(NamedTuple):
    """What ``paramwise_cfg`` gives one parameter: multipliers of the base lr and weight decay, and the other
    hyperparameters a ``custom_keys`` entry sets (``(("momentum", 0.5),)``)."""

    lr_mult: float = 1.0
    decay_mult: float = 1.0
    extra: tuple[tuple[str, Any], ...] = ()


def paramwise_multipliers(
    model: nn.Module, paramwise_cfg: Mapping[str, Any], base_wd: float | None = None
) -> dict[str, ParamRule]:
    """``{param name: ParamRule}`` for the trainable parameters, by MMEngine's rules: a matching ``custom_keys``
    entry wins (longest key first, then alphabetical; matched against ``"<module>.<name>"``); else ``bias_lr_mult``
    for biases outside norm layers, and the first weight-decay rule of norm layers (``norm_decay_mult``), biases
    (``bias_decay_mult``), depth-wise convolutions (``dwconv_decay_mult``) and 1-D parameters
    (``flat_decay_mult``). Weight-decay rules need the optimizer's ``weight_decay`` given explicitly (``base_wd``),
    as in MMEngine, which refuses them otherwise."""
    check_keys("optim_wrapper.paramwise_cfg", paramwise_cfg, PARAMWISE_KEYS)
    custom = paramwise_cfg.get("custom_keys", {})
    if not isinstance(custom, Mapping):
        raise ConfigError(f"optim_wrapper.paramwise_cfg.custom_keys: expected a dict, got {type(custom).__name__}")
    if base_wd is None:
        needing = [k for k in ("bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult") if k in paramwise_cfg]
        needing += [f"custom_keys[{k!r}].decay_mult" for k, v in custom.items() if "decay_mult" in v]
        if needing:
            raise ConfigError(
                f"optim_wrapper.paramwise_cfg: {needing[0]} needs the optimizer's weight_decay set explicitly "
                "(MMEngine: 'base_wd should not be None'); add weight_decay=... to optim_wrapper.optimizer"
            )
    if paramwise_cfg.get("dcn_offset_lr_mult") is not None:
        from funceng.runner import compat

        compat.ignored("optim_wrapper.paramwise_cfg.dcn_offset_lr_mult")
    ordered = sorted(sorted(custom), key=len, reverse=True)
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    result: dict[str, ParamRule] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for short, param in module.named_parameters(recurse=False):
            if id(param) not in trainable:
                continue
            name = trainable[id(param)]
            if name in result:  # met again through another module: a shared parameter keeps its first rule
                if not paramwise_cfg.get("bypass_duplicate", False):
                    raise ConfigError(
                        f"optim_wrapper.paramwise_cfg: parameter {name!r} is shared with "
                        f"{f'{prefix}.{short}' if prefix else short!r}, so it would be in two param groups (torch "
                        "refuses that); set paramwise_cfg.bypass_duplicate=True"
                    )
                continue
            result[name] = _rule(f"{prefix}.{short}", short, module, param, paramwise_cfg, custom, ordered, base_wd)
    return result


def group_hyperparameters(rule: ParamRule, lr: float, weight_decay: float | None) -> dict[str, Any]:
    """A param group's hyperparameters under ``rule``, as MMEngine sets them: ``lr * lr_mult``, ``weight_decay *
    decay_mult`` when the optimizer's weight decay is given, then a ``custom_keys`` entry's other values."""
    group: dict[str, Any] = {"lr": lr * rule.lr_mult}
    if weight_decay is not None:
        group["weight_decay"] = weight_decay * rule.decay_mult
    group.update((key, tuple(value) if isinstance(value, list) else value) for key, value in rule.extra)
    return group


def _rule(full: str, short: str, module, param, cfg, custom, ordered, base_wd) -> ParamRule:
    key = next((k for k in ordered if k in full), None)
    if key is not None:
        entry = custom[key]
        decay = entry.get("decay_mult", 1.0) if base_wd is not None else 1.0
        extra = tuple(sorted((k, v) for k, v in entry.items() if k not in ("lr_mult", "decay_mult")))
        return ParamRule(entry.get("lr_mult", 1.0), decay, extra)
    is_norm = isinstance(module, NORM_LAYERS)
    is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
    lr_mult, decay_mult = 1.0, 1.0
    if short == "bias" and not is_norm and cfg.get("bias_lr_mult") is not None:
        lr_mult = cfg["bias_lr_mult"]
    if base_wd is not None:
        if is_norm and cfg.get("norm_decay_mult") is not None:
            decay_mult = cfg["norm_decay_mult"]
        elif short == "bias" and cfg.get("bias_decay_mult") is not None:
            decay_mult = cfg["bias_decay_mult"]
        elif is_dwconv and cfg.get("dwconv_decay_mult") is not None:
            decay_mult = cfg["dwconv_decay_mult"]
        elif param.ndim == 1 and cfg.get("flat_decay_mult") is not None:
            decay_mult = cfg["flat_decay_mult"]
    return ParamRule(lr_mult, decay_mult)
