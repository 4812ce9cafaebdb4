"""MMEngine's ``cfg.activation_checkpointing``: named submodules recompute their activations in the backward pass
(``torch.utils.checkpoint``, non-reentrant) instead of keeping them, trading compute for memory. The gradients
are the same. Eager steps only: a compiled step differentiates with ``torch.func.grad``, which does not support
``torch.utils.checkpoint`` (torch 2.14); there inductor already chooses what to recompute."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from funceng.errors import ConfigError


def turn_on_activation_checkpointing(model: nn.Module, modules: str | Sequence[str]) -> list[str]:
    """Wraps the ``forward`` of each named submodule of ``model`` in ``torch.utils.checkpoint``; returns the
    names. An unknown name is an error naming the submodules there are."""
    names = [modules] if isinstance(modules, str) else list(modules)
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            close = [n for n in known if n and (n.startswith(name) or name.startswith(n))][:5]
            raise ConfigError(f"cfg.activation_checkpointing: the model has no submodule {name!r} (near: {close})")
        module = known[name]
        module.forward = _checkpointed(module.forward)
    return names


def _checkpointed(forward: Any) -> Any:
    @functools.wraps(forward)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapper


def apply_memory_options(model: nn.Module, cfg: Any, compile: Any) -> list[str]:
    """The Runner's ``cfg`` options that change how a model keeps activations: ``activation_checkpointing`` (names
    of submodules) is applied, for an eager step (``compile`` false or ``"auto"``, which then picks eager);
    ``efficient_conv_bn_eval`` is refused."""
    if cfg.get("activation_checkpointing") and compile not in (False, None, "auto"):
        raise ConfigError(
            "cfg.activation_checkpointing needs an eager train step: a compiled step differentiates with "
            "torch.func.grad, which does not support torch.utils.checkpoint (inductor chooses what to recompute "
            "there). Pass compile=False, or drop activation_checkpointing"
        )
    if cfg.get("efficient_conv_bn_eval"):
        raise ConfigError(
            "cfg.efficient_conv_bn_eval is not supported by funceng (it rewrites Conv+BN forwards in place); "
            "use cfg.activation_checkpointing to save activation memory"
        )
    modules = cfg.get("activation_checkpointing")
    return turn_on_activation_checkpointing(model, modules) if modules else []
