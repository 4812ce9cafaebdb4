"""What a model or loss function returns, read as a total loss and the values to log; MMEngine's calling
convention for models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from funceng.data_preprocessor import BaseDataPreprocessor


def call_model(model: nn.Module, batch: Any, mode: str) -> Any:
    """MMEngine's calling convention: ``model(*batch, mode=...)`` (``**batch`` for a dict).

    A model with a ``data_preprocessor`` (a `funceng.model.BaseModel` given one) first has the batch passed
    through ``data_preprocessor(batch, training)``, with ``training`` true for ``mode="loss"``.
    """
    preprocess = getattr(model, "data_preprocessor", None)
    if preprocess is not None and type(preprocess) is not BaseDataPreprocessor:  # that one only moves the batch
        batch = preprocess(batch, mode == "loss")
    if isinstance(batch, Mapping):
        return model(**batch, mode=mode)
    if isinstance(batch, (tuple, list)):
        return model(*batch, mode=mode)
    return model(batch, mode=mode)


def parse_loss(output: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and the values to log from what a loss function returned.

    A scalar tensor is the loss. In a dict, every entry whose key contains ``"loss"`` is averaged (lists of
    tensors are summed) and added to the total; every entry is logged.
    """
    if isinstance(output, Tensor):
        if output.ndim != 0:
            raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(output.shape)}")
        return output, {}
    if not isinstance(output, Mapping):
        raise TypeError(
            "the loss function (or model(..., mode='loss')) must return a scalar tensor or a dict of losses "
            f"with a 'loss' entry; got {type(output).__name__}"
        )
    logs, total = {}, None
    for key, value in output.items():
        if isinstance(value, (list, tuple)):
            value = sum(v.mean() for v in value)
        elif isinstance(value, Tensor):
            value = value.mean()
        else:
            raise TypeError(f"loss entry {key!r} must be a tensor or a list of tensors, got {type(value).__name__}")
        logs[key] = value.detach()
        if "loss" in key:
            total = value if total is None else total + value
    if total is None:
        raise KeyError(f"the loss dict has no entry whose key contains 'loss'; keys: {sorted(output)}")
    return total, logs
