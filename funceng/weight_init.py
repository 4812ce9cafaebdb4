"""MMEngine's weight initialisation: `BaseModule` with ``init_cfg`` and ``init_weights()``, and the initialisers
(``Normal``, ``Constant``, ``Uniform``, ``Xavier``, ``Kaiming``, ``TruncNormal``, ``Pretrained``) registered in
``WEIGHT_INITIALIZERS``.

An ``init_cfg`` is a dict or a list of dicts: ``type``, the initialiser's arguments (``std``, ``bias``,
``bias_prob``, ...), ``layer`` (the class names, or a direct base class's name, of the submodules it applies to;
without it, none, as in MMEngine) and ``override`` (dicts with a ``name``: that child module, all of it, initialised
by the override's own ``type`` and arguments, or by the outer ones when it gives only the name). The Runner
calls ``model.init_weights()`` when training starts, after seeding, as MMEngine's does; children that are
BaseModules initialise themselves after their parent, and ``Pretrained`` weights are loaded last.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from funceng.errors import ConfigError
from funceng.registry import WEIGHT_INITIALIZERS


def bias_init_with_prob(prior_prob: float) -> float:
    """The bias whose sigmoid is ``prior_prob``."""
    return float(-math.log((1 - prior_prob) / prior_prob))


class BaseInit:
    """Applies ``init_one`` to the submodules whose class (or a base class) is named in ``layer``."""

    def __init__(self, *, bias: float = 0, bias_prob: float | None = None, layer: str | Sequence[str] | None = None):
        self.bias = bias_init_with_prob(bias_prob) if bias_prob is not None else bias
        self.layer = [layer] if isinstance(layer, str) else list(layer or [])
        self.wholemodule = False  # an override initialises its whole child module

    def __call__(self, module: nn.Module) -> None:
        def visit(m: nn.Module) -> None:
            names = {type(m).__name__, *(base.__name__ for base in type(m).__bases__)}
            if self.wholemodule or names & set(self.layer):
                self.init_one(m)

        module.apply(visit)

    def init_one(self, m: nn.Module) -> None:
        raise NotImplementedError

    def _weight_and_bias(self, m: nn.Module, init_weight) -> None:
        with torch.no_grad():
            if getattr(m, "weight", None) is not None:
                init_weight(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.constant_(m.bias, self.bias)


@WEIGHT_INITIALIZERS.register(name="Constant")
class ConstantInit(BaseInit):
    def __init__(self, val: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.val = val

    def init_one(self, m):
        self._weight_and_bias(m, lambda w: nn.init.constant_(w, self.val))


@WEIGHT_INITIALIZERS.register(name="Normal")
class NormalInit(BaseInit):
    def __init__(self, mean: float = 0, std: float = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.mean, self.std = mean, std

    def init_one(self, m):
        self._weight_and_bias(m, lambda w: nn.init.normal_(w, self.mean, self.std))


@WEIGHT_INITIALIZERS.register(name="Uniform")
class UniformInit(BaseInit):
    def __init__(self, a: float = 0, b: float = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.a, self.b = a, b

    def init_one(self, m):
        self._weight_and_bias(m, lambda w: nn.init.uniform_(w, self.a, self.b))


@WEIGHT_INITIALIZERS.register(name="TruncNormal")
class TruncNormalInit(BaseInit):
    def __init__(self, mean: float = 0, std: float = 1, a: float = -2, b: float = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.mean, self.std, self.a, self.b = mean, std, a, b

    def init_one(self, m):
        self._weight_and_bias(m, lambda w: trunc_normal_(w, self.mean, self.std, self.a, self.b))


def trunc_normal_(tensor: torch.Tensor, mean: float, std: float, a: float, b: float) -> torch.Tensor:
    """A normal(mean, std) sample truncated to [a, b], by the inverse CDF of a uniform sample (MMEngine's method, so
    the same generator state gives MMEngine's numbers)."""

    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        tensor.uniform_(2 * cdf((a - mean) / std) - 1, 2 * cdf((b - mean) / std) - 1)
        tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean)
        return tensor.clamp_(min=a, max=b)


@WEIGHT_INITIALIZERS.register(name="Xavier")
class XavierInit(BaseInit):
    def __init__(self, gain: float = 1, distribution: str = "normal", **kwargs: Any):
        super().__init__(**kwargs)
        if distribution not in ("uniform", "normal"):
            raise ConfigError(f"init_cfg Xavier: distribution must be 'uniform' or 'normal', got {distribution!r}")
        self.gain, self.distribution = gain, distribution

    def init_one(self, m):
        fn = nn.init.xavier_uniform_ if self.distribution == "uniform" else nn.init.xavier_normal_
        self._weight_and_bias(m, lambda w: fn(w, gain=self.gain))


@WEIGHT_INITIALIZERS.register(name="Kaiming")
class KaimingInit(BaseInit):
    def __init__(
        self, a: float = 0, mode: str = "fan_out", nonlinearity: str = "relu", distribution: str = "normal", **kw: Any
    ):
        super().__init__(**kw)
        if distribution not in ("uniform", "normal"):
            raise ConfigError(f"init_cfg Kaiming: distribution must be 'uniform' or 'normal', got {distribution!r}")
        self.a, self.mode, self.nonlinearity, self.distribution = a, mode, nonlinearity, distribution

    def init_one(self, m):
        fn = nn.init.kaiming_uniform_ if self.distribution == "uniform" else nn.init.kaiming_normal_
        self._weight_and_bias(m, lambda w: fn(w, a=self.a, mode=self.mode, nonlinearity=self.nonlinearity))


@WEIGHT_INITIALIZERS.register(name="Pretrained")
class PretrainedInit:
    """Weights from a ``.pth`` file (read without running code from it, `funceng.mmengine_format`), those under
    ``prefix`` (``"backbone."``) if given; names the module lacks or the file lacks are errors naming them."""

    def __init__(self, checkpoint: str, prefix: str | None = None, map_location: str = "cpu"):
        self.checkpoint, self.prefix = checkpoint, prefix

    def __call__(self, module: nn.Module) -> None:
        from funceng.mmengine_format import read_weights

        weights = read_weights(self.checkpoint)
        if self.prefix:
            weights = {k[len(self.prefix) :]: v for k, v in weights.items() if k.startswith(self.prefix)}
        missing, unexpected = module.load_state_dict(weights, strict=False)
        for what, names in (("missing keys", missing), ("unexpected keys", unexpected)):
            if names:  # non-strict, as MMEngine's load_checkpoint: said, not raised
                logging.getLogger("funceng").warning(f"init_cfg Pretrained {self.checkpoint}: {what} {list(names)}")


def initialize(module: nn.Module, init_cfg: Mapping | Sequence[Mapping]) -> None:
    """Applies ``init_cfg`` (see the module docstring) to ``module``."""
    for cfg in [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg):
        cfg = dict(cfg)
        overrides = cfg.pop("override", None)
        if "type" in cfg:
            WEIGHT_INITIALIZERS.build(cfg, "init_cfg")(module)
        for override in [overrides] if isinstance(overrides, Mapping) else list(overrides or []):
            override = dict(override)
            name = override.pop("name", None)
            child = getattr(module, name, None) if name else None
            if not isinstance(child, nn.Module):
                raise ConfigError(f"init_cfg override: {type(module).__name__} has no child module {name!r}")
            if override and "type" not in override:
                raise ConfigError(f"init_cfg override {name!r}: give a 'type' with its arguments, or only the name")
            initializer = WEIGHT_INITIALIZERS.build(override or cfg, f"init_cfg override {name!r}")
            initializer.wholemodule = True
            initializer(child)


class BaseModule(nn.Module):
    """MMEngine's ``BaseModule``: a module with an ``init_cfg`` that ``init_weights()`` applies once."""

    def __init__(self, init_cfg: Mapping | Sequence[Mapping] | None = None):
        super().__init__()
        self.init_cfg = init_cfg
        self._is_init = False

    @property
    def is_init(self) -> bool:
        return self._is_init

    def init_weights(self) -> None:
        if self._is_init:
            return
        cfgs = [] if self.init_cfg is None else [self.init_cfg] if isinstance(self.init_cfg, Mapping) else self.init_cfg
        pretrained = [c for c in cfgs if c.get("type") == "Pretrained"]
        initialize(self, [c for c in cfgs if c.get("type") != "Pretrained"])
        for child in self.children():
            if callable(getattr(child, "init_weights", None)) and not getattr(child, "is_init", False):
                child.init_weights()
        if pretrained:
            initialize(self, pretrained)
        self._is_init = True
