"""`BaseModel`: MMEngine's model contract, ``forward(*inputs, mode)``, and its ``train_step`` / ``val_step`` /
``test_step``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from funceng.data_preprocessor import BaseDataPreprocessor, ImgDataPreprocessor
from funceng.errors import ConfigError
from funceng.loss import call_model, parse_loss
from funceng.registry import MODELS
from funceng.weight_init import BaseModule

__all__ = ["BaseDataPreprocessor", "BaseModel", "BaseModule", "ImgDataPreprocessor", "build_model"]


class BaseModel(BaseModule):
    """A module whose ``forward(*inputs, mode)`` serves training, evaluation and inference.

    - ``mode="loss"``: a dict of losses; every entry whose key contains ``"loss"`` is averaged and summed into
      the total, the other entries are logged;
    - ``mode="predict"``: what the metrics' ``process`` receives as ``data_samples``;
    - ``mode="tensor"``: the raw outputs.

    ``data_preprocessor``: a module (or a config dict built from ``MODELS``, e.g.
    ``dict(type="ImgDataPreprocessor", mean=..., std=...)``) called as ``data_preprocessor(batch, training)`` on
    every batch before ``forward``; default `BaseDataPreprocessor` (moves the batch to the device). Its
    parameters and buffers are part of the state. ``init_cfg``: MMEngine's weight initialisation
    (`funceng.weight_init`), applied by ``init_weights()``, which the Runner calls when training starts.

    The Runner trains with a pure, compiled step built from ``forward(mode="loss")``. A subclass that overrides
    ``train_step(data, optim_wrapper)`` (MMEngine's way to write a GAN) is trained by calling it instead, eagerly,
    with optimizer wrappers bound to the state (`funceng.runner.imperative_step`).
    """

    def __init__(self, data_preprocessor: nn.Module | Mapping | None = None, init_cfg: Any = None):
        super().__init__(init_cfg)
        if data_preprocessor is None:
            data_preprocessor = BaseDataPreprocessor()
        elif isinstance(data_preprocessor, Mapping):
            data_preprocessor = MODELS.build(data_preprocessor, "data_preprocessor")
        if not isinstance(data_preprocessor, nn.Module):
            raise ConfigError(
                f"data_preprocessor: expected an nn.Module called as data_preprocessor(batch, training) or a config "
                f"dict, got {type(data_preprocessor).__name__}"
            )
        self.data_preprocessor = data_preprocessor

    def forward(self, *inputs: Any, mode: str = "tensor") -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward(*inputs, mode) must be implemented")

    @staticmethod
    def parse_losses(losses: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, values to log)`` as MMEngine's ``BaseModel.parse_losses`` (the total logged as
        ``"loss"``)."""
        total, logs = parse_loss(losses)
        return total, {"loss": total.detach(), **logs}

    def train_step(self, data: Any, optim_wrapper: Any) -> dict[str, Tensor]:
        """MMEngine's default: preprocess, ``forward(mode="loss")`` in ``optim_context``, parse the losses,
        ``optim_wrapper.update_params(loss)``; returns the values to log. (The Runner runs the equivalent pure
        step unless a subclass overrides this.)"""
        with optim_wrapper.optim_context(self):
            losses = call_model(self, data, "loss")
        loss, log_vars = self.parse_losses(losses)
        optim_wrapper.update_params(loss)
        return log_vars

    def val_step(self, data: Any) -> Any:
        """``forward(mode="predict")`` on the preprocessed batch."""
        return call_model(self, data, "predict")

    def test_step(self, data: Any) -> Any:
        return call_model(self, data, "predict")


def build_model(cfg: Any) -> nn.Module:
    """A model, or one built from ``dict(type=ModelClass or a name registered in MODELS, **kwargs)``."""
    model = cfg if isinstance(cfg, nn.Module) else MODELS.build(cfg, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {type(model).__name__} is not an nn.Module")
    return model
