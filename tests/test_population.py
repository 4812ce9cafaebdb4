"""Populations: N members trained in one vmapped step, each following its single-model trajectory."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funceng
from funceng import optim, population, rng
from funceng.population_step import make_population_eval_step, make_population_step


def build_mlp(dropout: float = 0.0) -> nn.Module:
    # no bias before the BatchNorm: its gradient is zero in exact arithmetic, so Adam would amplify rounding noise
    return nn.Sequential(
        nn.Linear(6, 12, bias=False), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 3)
    )


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n: int, members: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if members is None else (members,)
    return [
        (torch.randn(*lead, 16, 6, generator=gen), torch.randint(0, 3, (*lead, 16), generator=gen)) for _ in range(n)
    ]


def adamw_with_state_hyperparams():
    return optim.inject_hyperparams(optim.adamw, ("lr", "weight_decay"))(lr=1e-2)


def single_run(seed, tx, data, *, lr=None, weight_decay=None, compile=False, **step_options):
    torch.manual_seed(seed)
    model = build_mlp()
    state = funceng.TrainState.create(model, tx, seed=seed)
    if lr is not None:
        state["opt_state", "hyperparams", "lr"].fill_(lr)
    if weight_decay is not None:
        state["opt_state", "hyperparams", "weight_decay"].fill_(weight_decay)
    step = funceng.make_train_step(model, tx, loss_fn, compile=compile, **step_options)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return state, torch.stack(losses)


def max_relative_difference(a, b) -> float:
    worst = 0.0
    for key in ("params", "buffers", "opt_state"):
        for (_, x), (_, y) in zip(a[key].items(True, True), b[key].items(True, True), strict=True):
            x, y = x.double(), y.double()
            worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
    return worst


@pytest.mark.parametrize("compile", [False, True])
def test_each_member_follows_its_single_model_run_for_20_steps(fresh_dynamo, compile):
    seeds, lrs, decays = [3, 5, 7], [1e-3, 3e-3, 1e-2], [0.0, 1e-2, 1e-1]
    tx = adamw_with_state_hyperparams()
    pop = population.create(build_mlp, tx, seeds=seeds, hyperparams={"lr": lrs, "weight_decay": decays})
    step = make_population_step(build_mlp(), tx, loss_fn, members=3, compile=compile)
    data = batches(20)
    losses = []
    for batch in data:
        pop, metrics = step(pop, batch)
        losses.append(metrics["loss"])
    assert metrics["loss"].shape == (3,) and metrics["lr"].tolist() == pytest.approx(lrs)
    for i, seed in enumerate(seeds):
        single, single_losses = single_run(seed, tx, data, lr=lrs[i], weight_decay=decays[i], compile=compile)
        assert max_relative_difference(population.member(pop, i), single) <= 1e-5
        torch.testing.assert_close(torch.stack(losses)[:, i], single_losses, rtol=1e-5, atol=1e-6)
        assert population.member(pop, i)["step"].item() == 20


def test_compiled_population_step_is_one_graph_and_new_hyperparameters_do_not_recompile(fresh_dynamo):
    from torch._dynamo.utils import counters

    tx = adamw_with_state_hyperparams()
    pop = population.create(build_mlp, tx, seeds=range(4), hyperparams={"lr": [1e-3, 1e-2, 1e-1, 1.0]})
    step = make_population_step(build_mlp(), tx, loss_fn, members=4, compile=True)
    for i, batch in enumerate(batches(5)):
        if i == 3:
            population.set_hyperparams(pop, lr=[2e-3, 2e-2, 2e-1, 2.0])
        pop, metrics = step(pop, batch)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    assert metrics["lr"].tolist() == pytest.approx([2e-3, 2e-2, 2e-1, 2.0])


def test_create_gives_member_i_exactly_the_single_state_for_seed_i_from_a_factory_or_a_model():
    tx = optim.sgd(0.1, momentum=0.9)
    seeds = [11, 12]
    from_factory = population.create(build_mlp, tx, seeds=seeds)
    from_model = population.create(build_mlp(), tx, seeds=seeds)  # re-initialised per member
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        single = funceng.TrainState.create(build_mlp(), tx, seed=seed)
        for pop in (from_factory, from_model):
            member = population.member(pop, i)
            for (path, x), (_, y) in zip(member.items(True, True), single.items(True, True), strict=True):
                assert torch.equal(x, y), path
        assert torch.equal(from_factory["rng", "cpu"][i], rng.generator_states(seed, torch.device("cpu"))["cpu"])
    torch.manual_seed(0)
    after_create = population.create(build_mlp, tx, seeds=seeds)
    assert torch.equal(after_create["params", "0.weight"], from_factory["params", "0.weight"])
    assert population.size(from_factory) == 2 and population.size(single) is None


def test_create_leaves_the_global_generator_where_it_was():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    population.create(build_mlp, optim.sgd(0.1), seeds=[1, 2, 3])
    assert torch.equal(torch.rand(3), expected)


def test_stack_and_member_round_trip_and_members_are_independent_copies():
    tx = optim.adam(1e-3)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(funceng.TrainState.create(build_mlp(), tx, seed=seed))
    pop = population.stack(states)
    assert pop["params", "0.weight"].shape == (3, 12, 6) and pop["step"].shape == (3,)
    for i, state in enumerate(states):
        member = population.member(pop, i)
        for (path, x), (_, y) in zip(member.items(True, True), state.items(True, True), strict=True):
            assert torch.equal(x, y), path
    copy = population.member(pop, 0)
    copy["params", "0.weight"].zero_()
    assert pop["params", "0.weight"][0].abs().sum() > 0
    view = population.member(pop, 1, copy=False)
    view["params", "0.weight"].zero_()
    assert pop["params", "0.weight"][1].abs().sum() == 0


def test_stack_refuses_states_of_different_models_naming_the_leaf():
    tx = optim.sgd(0.1)
    small = funceng.TrainState.create(build_mlp(), tx)
    wide = funceng.TrainState.create(nn.Sequential(nn.Linear(6, 13, bias=False), nn.BatchNorm1d(13), nn.ReLU(),
                                                   nn.Dropout(0.0), nn.Linear(13, 3)), tx)  # fmt: skip
    with pytest.raises(ValueError, match=r"leaf 'params/0.weight' of state 1 is torch.float32 \(13, 6\)"):
        population.stack([small, wide])
    other_optimizer = funceng.TrainState.create(build_mlp(), optim.adam(1e-3))
    with pytest.raises(ValueError, match="state 1 has another structure"):
        population.stack([small, other_optimizer])
    with pytest.raises(ValueError, match="already a population"):
        population.stack([population.stack([small])])
    with pytest.raises(IndexError, match="out of range for a population of 1"):
        population.member(population.stack([small]), 1)


def test_a_hyperparameter_not_kept_in_the_state_cannot_differ_per_member_and_says_how():
    pop = population.create(build_mlp, optim.adamw(1e-3, weight_decay=0.1), seeds=[0, 1])
    with pytest.raises(KeyError, match=r"keeps no 'weight_decay'.*inject_hyperparams"):
        population.set_hyperparams(pop, weight_decay=[0.0, 0.1])
    with pytest.raises(ValueError, match=r"one value per member of 2"):
        population.set_hyperparams(pop, lr=[1e-3, 1e-2, 1e-1])
    population.set_hyperparams(pop, lr=[0.0, 1e-2])
    assert pop["opt_state", "2", "lr"].tolist() == [0.0, 1e-2]


@pytest.mark.parametrize("compile", [False, True])
def test_a_member_with_lr_zero_does_not_move_while_the_others_train(fresh_dynamo, compile):
    tx = optim.sgd(0.1)
    pop = population.create(build_mlp, tx, seeds=[0, 0, 0], hyperparams={"lr": [0.0, 0.1, 0.5]})
    start = pop["params", "4.weight"].clone()
    step = make_population_step(build_mlp(), tx, loss_fn, members=3, compile=compile)
    for batch in batches(3):
        pop, _ = step(pop, batch)
    moved = (pop["params", "4.weight"] - start).flatten(1).norm(dim=1)
    assert moved[0] == 0 and 0 < moved[1] < moved[2]


@pytest.mark.parametrize("compile", [False, True])
def test_one_batch_per_member_trains_member_i_on_batch_i(fresh_dynamo, compile):
    tx = optim.sgd(0.05, momentum=0.9)
    pop = population.create(build_mlp, tx, seeds=[1, 1])  # same start, different data
    step = make_population_step(build_mlp(), tx, loss_fn, members=2, batch_per_member=True, compile=compile)
    data = batches(5, members=2)
    for batch in data:
        pop, _ = step(pop, batch)
    for i in range(2):
        single, _ = single_run(1, tx, [(x[i], y[i]) for x, y in data], compile=compile)
        assert max_relative_difference(population.member(pop, i), single) <= 1e-5
    with pytest.raises(ValueError, match="leading member dimension of 2; got one of shape \\(16, 6\\)"):
        step(pop, batches(1)[0])


@pytest.mark.parametrize("compile", [False, True])
def test_dropout_differs_across_members_and_a_population_run_is_reproducible(fresh_dynamo, compile):
    tx = optim.sgd(0.1)
    model = build_mlp(dropout=0.5)
    step = make_population_step(model, tx, loss_fn, members=3, compile=compile, donate=False)
    runs = []
    for _ in range(2):
        pop = population.create(lambda: build_mlp(0.5), tx, seeds=[4, 4, 4])  # identical members but for dropout
        losses = []
        for batch in batches(3):
            pop, metrics = step(pop, batch)
            losses.append(metrics["loss"])
        runs.append(torch.stack(losses))
    assert len(set(runs[0][0].tolist())) == 3  # each member drew its own dropout masks
    assert torch.equal(runs[0], runs[1])  # from the state's generators: the same population gives the same run


def test_a_population_of_one_with_dropout_draws_the_single_model_runs_masks():
    tx = optim.sgd(0.1)
    torch.manual_seed(2)
    model = build_mlp(dropout=0.5)
    single = funceng.TrainState.create(model, tx, seed=9)
    pop = population.stack([single.clone()])
    step = funceng.make_train_step(model, tx, loss_fn, compile=False)
    pop_step = make_population_step(model, tx, loss_fn, members=1, compile=False)
    for batch in batches(4):
        single, metrics = step(single, batch)
        pop, pop_metrics = pop_step(pop, batch)
        # the same dropout masks (a different mask changes the loss by far more than rounding)
        assert pop_metrics["loss"].item() == pytest.approx(metrics["loss"].item(), rel=1e-6)
    assert max_relative_difference(population.member(pop, 0), single) <= 1e-5
    assert torch.equal(pop["rng", "cpu"][0], single["rng", "cpu"])  # the generator advanced exactly as the single one


@pytest.mark.parametrize("compile", [False, True])
def test_a_schedule_scaled_per_member_gives_each_member_its_scaled_learning_rate(fresh_dynamo, compile):
    tx = optim.inject_hyperparams(optim.sgd, ("lr",))(lr=0.1)

    def halve_every_step(step, opt_state):
        opt_state["hyperparams"]["lr"].copy_(0.1 * 0.5 ** step.to(torch.float64))

    pop = population.create(build_mlp, tx, seeds=[0, 1, 2])
    step = make_population_step(
        build_mlp(), tx, loss_fn, members=3, compile=compile, schedule=halve_every_step,
        hyperparam_scales={"lr": [1.0, 2.0, 10.0]},
    )  # fmt: skip
    for batch in batches(3):
        pop, metrics = step(pop, batch)
    assert metrics["lr"].tolist() == pytest.approx([0.1 * 0.25 * s for s in (1.0, 2.0, 10.0)])
    with pytest.raises(ValueError, match="without a schedule"):
        make_population_step(build_mlp(), tx, loss_fn, members=3, hyperparam_scales={"lr": [1, 2, 3]})


# compiled, bf16 too; the single-model steps compiled after the population step also check that a population step
# leaves torch.compile's view of torch's own foreach kernels intact (patching torch itself broke them)
@pytest.mark.parametrize(("compile", "amp", "tolerance"), [(False, None, 1e-5), (True, "bf16", 1e-2)])
def test_freeze_and_accumulation_compose_per_member_eager_and_with_bf16_compiled(fresh_dynamo, compile, amp, tolerance):
    tx = adamw_with_state_hyperparams()

    def frozen_first_layer():
        model = build_mlp()
        model[0].weight.requires_grad_(False)
        return model

    seeds, lrs = [0, 1], [1e-2, 3e-2]
    pop = population.create(frozen_first_layer, optim.accumulate(tx, 2), seeds=seeds, hyperparams={"lr": lrs})
    frozen = pop["params", "0.weight"].clone()
    options = dict(accumulate=2, amp=amp, compile=compile)
    step = make_population_step(frozen_first_layer(), tx, loss_fn, members=2, **options)
    data = batches(6)
    for batch in data:
        pop, _ = step(pop, batch)
    assert torch.equal(pop["params", "0.weight"], frozen)
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = frozen_first_layer()
        single = funceng.TrainState.create(model, optim.accumulate(tx, 2), seed=seed)
        single["opt_state", "inner", "hyperparams", "lr"].fill_(lrs[i])
        single_step = funceng.make_train_step(model, tx, loss_fn, **options)
        for batch in data:
            single, _ = single_step(single, batch)
        assert max_relative_difference(population.member(pop, i), single) <= tolerance  # bf16: batched matmuls round


def test_eager_bf16_with_batchnorm_says_to_compile_instead():
    tx = optim.sgd(0.1)
    step = make_population_step(build_mlp(), tx, loss_fn, members=2, amp="bf16", compile=False)
    with pytest.raises(RuntimeError, match=r"vmap of a normalisation layer \(BatchNorm\) under autocast.*compile=True"):
        step(population.create(build_mlp, tx, seeds=[0, 1]), batches(1)[0])


@pytest.mark.parametrize("compile", [False, True])
def test_population_eval_step_gives_each_members_outputs(fresh_dynamo, compile):
    tx = optim.sgd(0.1)
    pop = population.create(build_mlp, tx, seeds=[0, 1, 2])
    eval_step = make_population_eval_step(build_mlp(), lambda m, b: m(b[0]), members=3, compile=compile)
    x, y = batches(1)[0]
    outputs = eval_step(pop, (x, y))
    assert outputs.shape == (3, 16, 3)
    for i in range(3):
        single = funceng.make_eval_step(build_mlp(), lambda m, b: m(b[0]), compile=False)
        torch.testing.assert_close(outputs[i], single(population.member(pop, i), (x, y)), rtol=1e-5, atol=1e-6)


def test_options_a_population_step_cannot_honour_are_refused_with_the_reason():
    tx = optim.sgd(0.1)
    with pytest.raises(ValueError, match="fp16.*bf16"):
        make_population_step(build_mlp(), tx, loss_fn, members=2, amp="fp16", compile=False)
    with pytest.raises(ValueError, match="collectives cannot run inside vmap"):
        make_population_step(build_mlp(), tx, loss_fn, members=2, data_parallel=True, compile=False)
    with pytest.raises(ValueError, match="members must be a positive int"):
        make_population_step(build_mlp(), tx, loss_fn, members=0)
    step = make_population_step(build_mlp(), tx, loss_fn, members=3, compile=False)
    with pytest.raises(ValueError, match="does not match the model and optimizer"):
        step(population.create(build_mlp, optim.adam(1e-3), seeds=[0, 1, 2]), batches(1)[0])
    with pytest.raises(ValueError, match=r"state leaf 'params/0.weight' is a torch.float32 tensor of shape \(2, 12"):
        step(population.create(build_mlp, tx, seeds=[0, 1]), batches(1)[0])


def test_after_a_population_step_funceng_computes_with_torchs_own_foreach_kernels_again():
    import funceng.optim.transforms

    tx = optim.adam(1e-3)
    step = make_population_step(build_mlp(), tx, loss_fn, members=2, compile=False)
    step(population.create(build_mlp, tx, seeds=[0, 1]), batches(1)[0])
    assert funceng.optim.transforms.torch is torch  # eager single-model steps keep their fused kernels


def test_a_custom_transform_using_foreach_kernels_is_named_inside_a_population_step():
    def custom_scale():
        def update(updates, state, params=None):
            torch._foreach_mul_(list(updates.values()), -0.1)
            return updates, state

        return optim.GradientTransformation(lambda params: {}, update)

    step = make_population_step(build_mlp(), custom_scale(), loss_fn, members=2, compile=False)
    with pytest.raises(RuntimeError, match=r"torch._foreach_\* kernel ran inside the population step.*per-tensor"):
        step(population.create(build_mlp, custom_scale(), seeds=[0, 1]), batches(1)[0])
