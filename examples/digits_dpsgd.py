"""DP-SGD on scikit-learn's digits: per-example gradients clipped to ``max_norm``, Gaussian noise, the privacy spent
(ε at δ = 1e-5) from Opacus's RDP accountant; a non-private run of the same model beside it.

    python examples/digits_dpsgd.py [--epochs 15] [--noise-multiplier 1.0] [--max-norm 1.0] [--compile]
"""

import argparse

import torch
import torch.nn.functional as F
from digits_cnn import DigitsDataset
from torch import nn
from torch.utils.data import DataLoader

import funceng
from funceng import optim
from funceng.privacy import DPSGD, epsilon

BATCH = 50
DELTA = 1e-5


def build() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights for both runs
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def loss_fn(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def accuracy(eval_step, state, loader) -> float:
    correct = total = 0
    for images, labels in loader:
        correct += (eval_step(state, images).argmax(1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def train(privacy: DPSGD | None, epochs: int, compile: bool) -> tuple[float, int]:
    train_set = DigitsDataset("train")
    loader = DataLoader(
        train_set, batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(DigitsDataset("val"), batch_size=297)
    model = build()
    tx = optim.sgd(0.5 if privacy else 0.1, momentum=0.9)
    state = funceng.TrainState.create(model, tx, seed=0)
    step = funceng.make_train_step(model, tx, loss_fn, compile=compile, privacy=privacy)
    eval_step = funceng.make_eval_step(model, lambda m, images: m(images), compile=False)
    steps = 0
    for epoch in range(epochs):
        for batch in loader:
            state, metrics = step(state, batch)
            steps += 1
        acc = accuracy(eval_step, state, val)
        name = "DP-SGD" if privacy else "non-private"
        print(f"{name} epoch {epoch + 1}: loss {metrics['loss'].item():.4f}, val accuracy {acc:.2f}%", flush=True)
    return acc, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    privacy = DPSGD(max_norm=args.max_norm, noise_multiplier=args.noise_multiplier)
    private_acc, steps = train(privacy, args.epochs, args.compile)
    public_acc, _ = train(None, args.epochs, args.compile)
    sample_rate = BATCH / len(DigitsDataset("train"))
    eps = epsilon(args.noise_multiplier, sample_rate, steps, DELTA)
    print()
    print(
        f"DP-SGD: noise multiplier {args.noise_multiplier}, max_norm {args.max_norm}, sampling rate {sample_rate:.4f}, "
        f"{steps} steps"
    )
    print(f"privacy spent: epsilon = {eps:.2f} at delta = {DELTA:g} (Opacus RDP accountant)")
    print(f"val accuracy: {private_acc:.2f}% with DP-SGD, {public_acc:.2f}% without")


if __name__ == "__main__":
    main()
