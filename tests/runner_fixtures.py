"""A tiny BaseModel, metric and data for Runner tests."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from funceng.evaluator import BaseMetric
from funceng.model import BaseModel


class TinyNet(BaseModel):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))

    def forward(self, x, y, mode="tensor"):
        out = self.net(x)
        if mode == "loss":
            return {"loss": F.cross_entropy(out, y)}
        if mode == "predict":
            return out, y
        return out


class Accuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        scores, labels = data_samples
        self.results.append({"n": len(labels), "correct": (scores.argmax(1) == labels).sum().item()})

    def compute_metrics(self, results):
        return {"accuracy": 100.0 * sum(r["correct"] for r in results) / sum(r["n"] for r in results)}


def dataset(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x, y)


def loaders(n_train: int = 160, n_val: int = 48, batch_size: int = 16, shuffle: bool = True):
    train = DataLoader(dataset(n_train), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(dataset(n_val, seed=1), batch_size=batch_size)
    return train, val


def runner_kwargs(tmp_path, **overrides):
    train, val = loaders()
    kwargs = dict(
        model=TinyNet(),
        work_dir=tmp_path / "work",
        train_dataloader=train,
        val_dataloader=val,
        val_evaluator=dict(type=Accuracy),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        randomness=dict(seed=0),
    )
    kwargs.update(overrides)
    return kwargs
