"""`BaseModel`: MMEngine's model contract, ``forward(*inputs, mode)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from funceng.step import parse_loss


class BaseModel(nn.Module):
    """A module whose ``forward(*inputs, mode)`` serves training, evaluation and inference.

    - ``mode="loss"``: a dict of losses; every entry whose key contains ``"loss"`` is averaged and summed into
      the total, the other entries are logged;
    - ``mode="predict"``: what the metrics' ``process`` receives as ``data_samples``;
    - ``mode="tensor"``: the raw outputs.

    ``data_preprocessor`` and ``init_cfg`` are accepted for MMEngine compatibility; a given preprocessor is
    called on every batch before ``forward``.
    """

    def __init__(self, data_preprocessor: nn.Module | None = None, init_cfg: Any = None):
        super().__init__()
        self.data_preprocessor = data_preprocessor
        self.init_cfg = init_cfg

    def forward(self, *inputs: Any, mode: str = "tensor") -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward(*inputs, mode) must be implemented")

    @staticmethod
    def parse_losses(losses: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total loss, values to log)`` as MMEngine's ``BaseModel.parse_losses``."""
        return parse_loss(losses)
