"""A seed x learning-rate sweep in one run: 16 seeds x 4 learning rates of an MLP on scikit-learn's digits, all
64 members trained together by the Runner's population step (`train_cfg.population`), validated every epoch; the
table shows each learning rate's accuracy over the seeds and the best member.

    python examples/digits_population.py [--seeds 16] [--lrs 0.003 0.01 0.03 0.1] [--epochs 8] [--eager]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from digits_cnn import Accuracy, DigitsDataset
from torch import nn
from torch.utils.data import DataLoader

from funceng.model import BaseModel
from funceng.runner import Runner


class DigitsMLP(BaseModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, images, labels, mode="tensor"):
        logits = self.net(images)
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels)}
        if mode == "predict":
            return logits, labels
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="work_dirs/digits_population")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="run the population step eagerly (default: compiled)")
    args = parser.parse_args()

    seeds = list(range(args.seeds))
    population = dict(seeds=seeds, grid=dict(lr=args.lrs))
    torch.manual_seed(0)
    with Runner(
        model=DigitsMLP(),
        work_dir=args.work_dir,
        train_dataloader=DataLoader(DigitsDataset("train"), batch_size=50, shuffle=True),
        val_dataloader=DataLoader(DigitsDataset("val"), batch_size=297),
        val_evaluator=dict(type=Accuracy),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        param_scheduler=[dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=args.epochs)],
        train_cfg=dict(by_epoch=True, max_epochs=args.epochs, population=population),
        default_hooks=dict(logger=dict(interval=10), checkpoint=dict(interval=args.epochs, save_best="accuracy")),
        randomness=dict(seed=0),
        compile=not args.eager,
    ) as runner:
        runner.train()
    metrics = runner.last_metrics
    members = len(seeds) * len(args.lrs)
    accuracy = [metrics[f"member_{i}/accuracy"] for i in range(members)]  # members are seed-major: (seed, lr)
    print()
    print(f"{members} members ({len(seeds)} seeds x {len(args.lrs)} learning rates), {args.epochs} epochs")
    print("| lr | mean accuracy | std | min | max |")
    print("|---:|---:|---:|---:|---:|")
    for j, lr in enumerate(args.lrs):
        column = [accuracy[i * len(args.lrs) + j] for i in range(len(seeds))]
        spread = statistics.stdev(column) if len(column) > 1 else 0.0
        print(f"| {lr:g} | {statistics.mean(column):.2f}% | {spread:.2f} | {min(column):.2f}% | {max(column):.2f}% |")
    best = metrics["best_member"]
    print(
        f"best member: {best} (seed {seeds[best // len(args.lrs)]}, lr {args.lrs[best % len(args.lrs)]:g}) "
        f"with {metrics['accuracy']:.2f}% validation accuracy"
    )
    print(f"plots: funceng plot {runner.work_dir}")


if __name__ == "__main__":
    main()
