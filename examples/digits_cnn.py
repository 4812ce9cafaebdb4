"""The demo (`make demo`): a small CNN learns scikit-learn's bundled handwritten digits through the Runner.

It has the seed tutorial's structure (a BaseModel, a BaseMetric, plain DataLoaders, a Runner that validates every
epoch and checkpoints) on real data that needs no download: 1,797 8x8 scans from 43 writers.

    python examples/digits_cnn.py [--work-dir work_dirs/digits] [--epochs 15]
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from funceng.evaluator import BaseMetric
from funceng.model import BaseModel
from funceng.plot import plot_run
from funceng.runner import Runner


class DigitsDataset(Dataset):
    """scikit-learn's digits as ``(1x8x8 image in [0, 1], label)``; a fixed 1,500 / 297 train / val split."""

    def __init__(self, split: str = "train"):
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        keep = order[:1500] if split == "train" else order[1500:]
        self.images, self.labels = images[keep], labels[keep]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class DigitsCNN(BaseModel):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, 10))

    def forward(self, images, labels, mode="tensor"):
        logits = self.head(self.features(images))
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels)}
        if mode == "predict":
            return logits, labels
        return logits


class Accuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        scores, labels = data_samples
        self.results.append({"batch_size": len(labels), "correct": (scores.argmax(dim=1) == labels).sum().item()})

    def compute_metrics(self, results):
        correct = sum(r["correct"] for r in results)
        return {"accuracy": 100.0 * correct / sum(r["batch_size"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="work_dirs/digits")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    with Runner(
        model=DigitsCNN(),
        work_dir=args.work_dir,
        train_dataloader=DataLoader(DigitsDataset("train"), batch_size=32, shuffle=True),
        val_dataloader=DataLoader(DigitsDataset("val"), batch_size=64),
        val_evaluator=dict(type=Accuracy),
        optim_wrapper=dict(
            optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=5e-4),
            paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
        ),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=40),
            dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=args.epochs),
        ],
        train_cfg=dict(by_epoch=True, max_epochs=args.epochs, val_interval=1),
        default_hooks=dict(logger=dict(interval=10), checkpoint=dict(interval=5, save_best="accuracy")),
        visualizer=dict(vis_backends=[dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]),
        randomness=dict(seed=0),
    ) as runner:  # closes the log and the TensorBoard writer at the end
        runner.train()
    metrics = runner.last_metrics
    plots = plot_run(runner.work_dir)
    print()
    print(f"final validation accuracy: {metrics['accuracy']:.2f}%")
    print(f"log:         {runner.log_dir / (runner.timestamp + '.log')}")
    print(f"checkpoints: {runner.work_dir}  (newest: {Path((runner.work_dir / 'last_checkpoint').read_text()).name})")
    print(f"tensorboard: tensorboard --logdir {runner.log_dir / 'vis_data'}")
    print("plots:       " + "\n             ".join(str(p) for p in plots))


if __name__ == "__main__":
    main()
