"""DP-SGD: per-example gradients, clipping and noise as Opacus defines them, and ε from Opacus's accountant."""

import copy

import opacus  # a dev dependency (`make test` installs it); funceng itself needs it only for `epsilon`
import opacus.optimizers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funceng
from funceng import optim, population
from funceng.population_step import make_population_step
from funceng.privacy import DPSGD, epsilon, per_example_grads


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def data(n: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen) * 3, torch.randint(0, 3, (n,), generator=gen)


def test_per_example_gradients_equal_a_loop_over_single_examples_and_opacus_grad_samples():
    model = build()
    x, y = data()
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads, losses = per_example_grads(model, loss_fn, params, {}, (x, y))
    for i in range(len(x)):
        model.zero_grad()
        loss = loss_fn(model, (x[i : i + 1], y[i : i + 1]))
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-7)
    inner = copy.deepcopy(model)
    sampled = opacus.GradSampleModule(inner)  # hooks into inner's own parameters
    F.cross_entropy(sampled(x), y).backward()
    for name, p in inner.named_parameters():
        torch.testing.assert_close(grads[name], p.grad_sample, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compile", [False, True])
def test_a_dp_step_without_noise_applies_opacus_clipped_average(fresh_dynamo, compile):
    max_norm, lr = 0.3, 0.5
    model = build()
    inner = copy.deepcopy(model)
    reference = opacus.GradSampleModule(inner)
    dp_optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=max_norm,
        expected_batch_size=12,
    )  # fmt: skip
    tx = optim.sgd(lr)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, loss_fn, compile=compile, privacy=DPSGD(max_norm, 0.0))
    for seed in range(3):
        batch = data(seed=seed)
        dp_optimizer.zero_grad()
        F.cross_entropy(reference(batch[0]), batch[1]).backward()
        dp_optimizer.step()
        state, metrics = step(state, batch)
    for name, p in inner.named_parameters():
        torch.testing.assert_close(state["params", name], p.detach(), rtol=1e-5, atol=1e-6)
    assert 0 < metrics["clipped_fraction"].item() <= 1  # large inputs: some examples exceed the norm


def test_clipping_bounds_each_examples_contribution_and_the_noise_has_std_noise_multiplier_times_max_norm():
    max_norm, sigma, batch_size = 0.5, 2.0, 8
    template = nn.Linear(200, 20)
    x, y = torch.randn(batch_size, 200) * 10, torch.randint(0, 20, (batch_size,))
    tx = optim.sgd(1.0)

    def update(noise_multiplier, seed):
        model = copy.deepcopy(template)  # a step points its model at the state it trains: start afresh each time
        state = funceng.TrainState.create(model, tx, seed=seed)
        before = {k: v.clone() for k, v in state["params"].items()}
        step = funceng.make_train_step(model, tx, loss_fn, compile=False, privacy=DPSGD(max_norm, noise_multiplier))
        state, _ = step(state, (x, y))
        return torch.cat([(before[k] - state["params", k]).flatten() for k in before])  # = the DP gradient

    clean = update(0.0, seed=0)
    assert clean.norm().item() <= max_norm + 1e-5  # the mean of B clipped gradients has norm <= max_norm
    noise = torch.stack([(update(sigma, seed=s) - clean) * batch_size for s in range(3)])
    assert noise.std().item() == pytest.approx(sigma * max_norm, rel=0.05)
    assert noise.mean().abs().item() < 0.05
    assert torch.equal(update(sigma, seed=7), update(sigma, seed=7))  # drawn from the state's generator
    assert not torch.equal(update(sigma, seed=7), update(sigma, seed=8))


def test_expected_batch_size_divides_the_sum_instead_of_the_batch_length():
    tx = optim.sgd(1.0)
    deltas = []
    for expected in (None, 24):
        model = build()
        state = funceng.TrainState.create(model, tx)
        before = state["params", "2.bias"].clone()
        step = funceng.make_train_step(model, tx, loss_fn, compile=False, privacy=DPSGD(1.0, 0.0, expected))
        state, _ = step(state, data())
        deltas.append(before - state["params", "2.bias"])
    torch.testing.assert_close(deltas[1], deltas[0] * 12 / 24)


def test_a_population_of_one_dp_run_draws_the_single_runs_noise_and_members_differ():
    tx = optim.sgd(0.1)
    privacy = DPSGD(max_norm=1.0, noise_multiplier=1.0)
    single = funceng.TrainState.create(build(1), tx, seed=5)
    pop = population.stack([single.clone()])
    step = funceng.make_train_step(build(1), tx, loss_fn, compile=False, privacy=privacy)
    pop_step = make_population_step(build(1), tx, loss_fn, members=1, compile=False, privacy=privacy)
    for seed in range(3):
        single, _ = step(single, data(seed=seed))
        pop, _ = pop_step(pop, data(seed=seed))
    torch.testing.assert_close(population.member(pop, 0)["params", "0.weight"], single["params", "0.weight"])
    twins = population.stack([single.clone(), single.clone()])
    twins, _ = make_population_step(build(1), tx, loss_fn, members=2, compile=False, privacy=privacy)(twins, data())
    assert not torch.equal(twins["params", "0.weight"][0], twins["params", "0.weight"][1])  # own noise per member


def test_dp_sgd_refuses_what_would_make_its_guarantee_wrong():
    tx = optim.sgd(0.1)
    with pytest.raises(ValueError, match=r"1 is a BatchNorm1d, which mixes the examples.*GroupNorm"):
        funceng.make_train_step(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), tx, loss_fn, privacy=DPSGD(1.0, 1.0))
    with pytest.raises(ValueError, match="add noise to every micro-batch"):
        funceng.make_train_step(build(), tx, loss_fn, accumulate=2, privacy=DPSGD(1.0, 1.0))
    with pytest.raises(ValueError, match="fp16"):
        funceng.make_train_step(build(), tx, loss_fn, amp="fp16", privacy=DPSGD(1.0, 1.0))
    with pytest.raises(ValueError, match="every rank would add its own noise"):
        funceng.make_train_step(build(), tx, loss_fn, data_parallel=True, privacy=DPSGD(1.0, 1.0))
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        DPSGD(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        DPSGD(1.0, -1.0)


def test_epsilon_is_opacus_rdp_accountants_and_grows_with_steps():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(300):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    assert epsilon(1.1, 0.01, 300, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(1.1, 0.01, 100, 1e-5) < epsilon(1.1, 0.01, 300, 1e-5) < epsilon(0.8, 0.01, 300, 1e-5)


@pytest.mark.parametrize("compile", [False, True])
def test_dp_sgd_with_a_frozen_layer_and_bf16_leaves_it_unchanged_and_trains_the_rest(fresh_dynamo, compile):
    model = build()
    model[0].weight.requires_grad_(False)
    tx = optim.sgd(0.5)
    state = funceng.TrainState.create(model, tx, seed=3)
    frozen, head = state["params", "0.weight"].clone(), state["params", "2.weight"].clone()
    step = funceng.make_train_step(
        model, tx, loss_fn, compile=compile, amp="bf16", privacy=DPSGD(max_norm=1.0, noise_multiplier=0.5)
    )
    for seed in range(3):
        state, metrics = step(state, data(seed=seed))
    assert torch.equal(state["params", "0.weight"], frozen)
    assert not torch.equal(state["params", "2.weight"], head)
    assert torch.isfinite(metrics["loss"]) and "clipped_fraction" in metrics
