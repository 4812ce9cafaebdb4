"""A GAN with two pure train steps: one state and one step per network, alternating in a plain loop.

The generator's loss runs through the discriminator, a module whose parameters require grad: a step's loss may
close over any module. The step differentiates only its own state's parameters, runs the optimizer outside
autograd (no history reaches either state) and compiles once. The discriminator module computes with the
discriminator state's current weights, because its step binds the module to that state and updates it in place.

python examples/gan_two_steps.py [--steps 600]   # trains eagerly and compiled, and checks they agree
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import funceng
from funceng import optim

NOISE = 4


def real_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    """The data: points on a ring of radius 2."""
    angle = torch.rand(n, generator=generator) * 2 * torch.pi
    ring = torch.stack([angle.cos(), angle.sin()], dim=1) * 2
    return ring + 0.05 * torch.randn(n, 2, generator=generator)


def train(steps: int, compile: bool) -> tuple[funceng.TrainState, funceng.TrainState, list[tuple[float, float]]]:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 2))
    discriminator = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))
    tx_g, tx_d = optim.adam(2e-3, betas=(0.5, 0.999)), optim.adam(2e-3, betas=(0.5, 0.999))
    state_g = funceng.TrainState.create(generator, tx_g, seed=0)
    state_d = funceng.TrainState.create(discriminator, tx_d, seed=1)

    def generator_loss(g: nn.Module, noise: torch.Tensor) -> torch.Tensor:
        logits = discriminator(g(noise))  # closes over the discriminator: not trained by this step
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def discriminator_loss(d: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        noise, real = batch
        real_logits, fake_logits = d(real), d(generator(noise).detach())
        real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        return real_loss + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    step_g = funceng.make_train_step(generator, tx_g, generator_loss, compile=compile)
    step_d = funceng.make_train_step(discriminator, tx_d, discriminator_loss, compile=compile)
    data = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        noise, real = torch.randn(64, NOISE, generator=data), real_samples(64, data)
        state_d, metrics_d = step_d(state_d, (noise, real))
        state_g, metrics_g = step_g(state_g, noise)
        losses.append((metrics_d["loss"].item(), metrics_g["loss"].item()))
    return state_g, state_d, losses


def ring_error(params: dict[str, torch.Tensor]) -> float:
    """How far generated points are from the ring, on average (0 is on the ring)."""
    generator = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 2))
    generator.load_state_dict(params)
    with torch.no_grad():
        points = generator(torch.randn(1000, NOISE, generator=torch.Generator().manual_seed(1)))
    return (points.norm(dim=1) - 2).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)
    untrained = nn.Sequential(nn.Linear(NOISE, 32), nn.ReLU(), nn.Linear(32, 2)).state_dict()
    print(f"untrained generator: distance from the ring {ring_error(untrained):.3f}")
    results = {}
    for compile in (False, True):
        state_g, state_d, losses = train(args.steps, compile)
        results[compile] = state_g, state_d
        d_loss, g_loss = losses[-1]
        mode, distance = "compiled" if compile else "eager", ring_error(dict(state_g["params"].items()))
        print(f"{mode:8s} final losses: discriminator {d_loss:.4f}, generator {g_loss:.4f}; "
              f"distance from the ring {distance:.3f}")  # fmt: skip
    max_diff = max(
        (results[True][i]["params"][name] - results[False][i]["params"][name]).abs().max().item()
        for i in (0, 1)
        for name in results[True][i]["params"].keys()
    )
    print(f"eager vs compiled: largest weight difference {max_diff:.2e}")
    assert max_diff < 1e-3, "eager and compiled steps should give the same numbers up to float rounding"


if __name__ == "__main__":
    main()
