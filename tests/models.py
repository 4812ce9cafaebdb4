"""Tiny models shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn


def mlp_with_batchnorm(dtype=torch.float32, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 3)).to(
        dtype
    )


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def batch(n: int = 16, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, dtype=dtype, generator=gen), torch.randint(0, 3, (n,), generator=gen)


class LossDictModel(nn.Module):
    """A BaseModel-style module: ``forward(x, y, mode)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(6, 3)

    def forward(self, x, y, mode="tensor"):
        out = self.net(x)
        if mode == "loss":
            accuracy = (out.argmax(1) == y).float()
            return {"loss_cls": F.cross_entropy(out, y), "loss_l2": [out.pow(2).mean()], "acc": accuracy}
        if mode == "predict":
            return out, y
        return out
