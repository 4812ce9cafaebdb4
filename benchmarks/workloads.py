"""The benchmark workloads, shared by every benchmark in this folder: the models, their data and their loss.

- ``mlp``: 64-256-256-10; ``cnn``: two conv-BN-ReLU-pool blocks on 32x32 images; ``resnet18``: torchvision's,
  10 classes; ``gpt``: a 2-layer decoder, width 128, context 64, vocabulary 256.

Models are built inside worker processes, so the builders import torch themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DISTINCT_BATCHES = 8


def mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def gpt():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self, vocab: int = 256, context: int = 64, dim: int = 128, layers: int = 2, heads: int = 4):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
            self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
            self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            return self.head(self.ln(self.blocks(x)))

    return GPT()


@dataclass(frozen=True)
class Workload:
    build: Any
    batch_size: int
    quick_batch_size: int
    input_shape: tuple[int, ...]
    classes: int
    tokens: bool = False


WORKLOADS = {
    "mlp": Workload(mlp, 128, 128, (64,), 10),
    "cnn": Workload(cnn, 32, 32, (3, 32, 32), 10),
    "resnet18": Workload(resnet18, 32, 8, (3, 32, 32), 10),
    "gpt": Workload(gpt, 16, 8, (64,), 256, tokens=True),
}


def make_batches(workload: Workload, batch_size: int, count: int = DISTINCT_BATCHES) -> list:
    """``count`` random ``(inputs, targets)`` batches for ``workload`` (seeded: the same in every process)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        if workload.tokens:
            seq = torch.randint(0, workload.classes, (batch_size, workload.input_shape[0] + 1), generator=gen)
            out.append((seq[:, :-1], seq[:, 1:]))
        else:
            out.append(
                (
                    torch.randn(batch_size, *workload.input_shape, generator=gen),
                    torch.randint(0, workload.classes, (batch_size,), generator=gen),
                )
            )
    return out


def workload_loss(out, y):
    """Cross-entropy over the last dimension (classes or vocabulary), for every workload."""
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def time_interleaved(systems: dict[str, Any], windows: int, calls: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each system (a no-argument callable): ``warmup`` untimed calls each (compilation
    included), then ``windows`` timed windows of ``calls`` calls, interleaved across systems so that the machine's
    drift hits all of them alike."""
    import statistics
    import time

    for run in systems.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(windows):
        for name, run in systems.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(t) for name, t in times.items()}
