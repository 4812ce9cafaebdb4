"""MMEngine's per-parameter rules (``paramwise_cfg``): each parameter's learning-rate and weight-decay
multipliers, as ``DefaultOptimWrapperConstructor`` assigns them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from funceng.errors import check_keys

PARAMWISE_KEYS = {
    "custom_keys",
    "bias_lr_mult",
    "bias_decay_mult",
    "norm_decay_mult",
    "dwconv_decay_mult",
    "flat_decay_mult",
}

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def paramwise_multipliers(model: nn.Module, paramwise_cfg: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``{param name: (lr_mult, decay_mult)}`` following MMEngine's ``DefaultOptimWrapperConstructor``."""
    check_keys("optim_wrapper.paramwise_cfg", paramwise_cfg, PARAMWISE_KEYS)
    custom = paramwise_cfg.get("custom_keys", {})
    for key, mults in custom.items():
        check_keys(f"optim_wrapper.paramwise_cfg.custom_keys[{key!r}]", mults, {"lr_mult", "decay_mult"})
    ordered = sorted(sorted(custom), key=len, reverse=True)  # longer keys win, then alphabetical: MMEngine's order
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
