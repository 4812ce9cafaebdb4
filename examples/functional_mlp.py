"""The functional API by hand: train an MLP on scikit-learn's bundled handwritten digits (no download).

python examples/functional_mlp.py [--compile]
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import funceng
from funceng import optim, schedules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="compile the whole train step")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1500], perm[1500:]
    batch_size = 50
    steps_per_epoch = len(train) // batch_size

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    warmup = schedules.linear_warmup(0.1, steps_per_epoch)
    decay = schedules.cosine_annealing(0.1, steps_per_epoch * (args.epochs - 1))
    lr = schedules.join([warmup, decay], [steps_per_epoch])
    tx = optim.chain(optim.clip_by_global_norm(5.0), optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=1e-4))
    state = funceng.TrainState.create(model, tx, seed=0)

    def loss_fn(model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels)

    train_step = funceng.make_train_step(model, tx, loss_fn, compile=args.compile)
    eval_step = funceng.make_eval_step(model, lambda model, batch: model(batch[0]), compile=args.compile)

    for epoch in range(args.epochs):
        order = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            state, metrics = train_step(state, (x[idx], y[idx]))
            losses.append(metrics["loss"])
        accuracy = (eval_step(state, (x[val],)).argmax(1) == y[val]).float().mean()
        print(
            f"epoch {epoch + 1}/{args.epochs}  step {state['step'].item()}  lr {metrics['lr'].item():.4e}  "
            f"loss {torch.stack(losses).mean().item():.4f}  val accuracy {100 * accuracy.item():.2f}%"
        )


if __name__ == "__main__":
    main()
