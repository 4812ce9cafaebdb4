"""`BaseModel`: MMEngine's model contract, ``forward(*inputs, mode)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from funceng.errors import ConfigError
from funceng.loss import parse_loss
from funceng.registry import Registry

MODELS = Registry("model")  # config files may name a registered model as dict(type="Name", ...)


class BaseModel(nn.Module):
    """A module whose ``forward(*inputs, mode)`` serves training, evaluation and inference.

    - ``mode="loss"``: a dict of losses; every entry whose key contains ``"loss"`` is averaged and summed into
      the total, the other entries are logged;
    - ``mode="predict"``: what the metrics' ``process`` receives as ``data_samples``;
    - ``mode="tensor"``: the raw outputs.

    ``data_preprocessor``: a module called as ``data_preprocessor(batch, training)`` on every batch before
    ``forward`` (by `funceng.loss.call_model`, which the default steps use); its parameters and buffers are part
    of the state. ``init_cfg`` is accepted for MMEngine compatibility and has no effect: the Runner logs it as
    ignored (`funceng.runner.compat`).
    """

    def __init__(self, data_preprocessor: nn.Module | None = None, init_cfg: Any = None):
        super().__init__()
        if data_preprocessor is not None and not isinstance(data_preprocessor, nn.Module):
            raise ConfigError(
                f"data_preprocessor: expected an nn.Module called as data_preprocessor(batch, training), got "
                f"{type(data_preprocessor).__name__} (config dicts are not built here: build the module yourself)"
            )
        self.data_preprocessor = data_preprocessor
        self.init_cfg = init_cfg

    def forward(self, *inputs: Any, mode: str = "tensor") -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward(*inputs, mode) must be implemented")

    @staticmethod
    def parse_losses(losses: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, values to log)`` as MMEngine's ``BaseModel.parse_losses``."""
        return parse_loss(losses)


def build_model(cfg: Any) -> nn.Module:
    """A model, or one built from ``dict(type=ModelClass or a name registered in MODELS, **kwargs)``."""
    model = cfg if isinstance(cfg, nn.Module) else MODELS.build(cfg, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {type(model).__name__} is not an nn.Module")
    return model
