"""The compiled step: one graph for forward, backward and optimizer; agrees with eager; no recompiles."""

import copy

import torch
from torch._dynamo.utils import counters

import funceng
from funceng import optim, schedules

from .models import batch, cross_entropy, mlp_with_batchnorm


def test_compiled_step_matches_eager_in_one_graph_and_lr_schedule_never_recompiles(fresh_dynamo):
    model = mlp_with_batchnorm()
    twin = copy.deepcopy(model)
    tx = optim.chain(optim.clip_by_global_norm(10.0), optim.sgd(schedules.cosine_annealing(0.1, 8), momentum=0.9))
    eager_state = funceng.TrainState.create(model, tx)
    compiled_state = funceng.TrainState.create(twin, tx)
    eager = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    compiled = funceng.make_train_step(twin, tx, cross_entropy, compile=True)
    lrs = []
    for i in range(6):
        eager_state, eager_metrics = eager(eager_state, batch(seed=i))
        compiled_state, metrics = compiled(compiled_state, batch(seed=i))
        lrs.append(metrics["lr"].item())
        torch.testing.assert_close(metrics["loss"], eager_metrics["loss"], rtol=1e-4, atol=1e-5)
    assert len(set(lrs)) == 6  # the schedule moved every step...
    assert counters["stats"]["unique_graphs"] == 1  # ...inside a single graph, compiled once
    assert counters["stats"]["calls_captured"] > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    for name in eager_state["params"].keys():
        torch.testing.assert_close(compiled_state["params"][name], eager_state["params"][name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_state["buffers"]["1.running_var"], eager_state["buffers"]["1.running_var"])
    assert compiled_state["step"].item() == 6


def test_compiled_eval_step_matches_eager(fresh_dynamo):
    model = mlp_with_batchnorm()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    predict = lambda m, b: m(b[0])  # noqa: E731
    eager = funceng.make_eval_step(model, predict, compile=False)(state, batch())
    compiled = funceng.make_eval_step(model, predict, compile=True)(state, batch())
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"]


def test_compiled_runner_trains_base_model_in_one_train_and_one_eval_graph(fresh_dynamo, tmp_path):
    from torch.utils.data import DataLoader

    from funceng.runner import Runner

    from .runner_fixtures import dataset, runner_kwargs

    ragged_train = DataLoader(dataset(150), batch_size=16, shuffle=True)  # 9 batches of 16, then one of 6
    ragged_val = DataLoader(dataset(40, seed=1), batch_size=16)  # 16, 16, 8
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            compile=True,
            default_hooks=dict(checkpoint=None),
            train_dataloader=ragged_train,
            val_dataloader=ragged_val,
            param_scheduler=dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=20),
        )
    )
    runner.train()
    assert runner.iter == 20
    assert counters["stats"]["unique_graphs"] == 2  # one train step, one eval step: no recompile, last batches too
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(runner.model.net[0].weight.detach(), runner.state["params"]["net.0.weight"])


def test_a_step_keeps_no_state_alive_that_its_caller_dropped(fresh_dynamo):
    import gc
    import weakref

    model = torch.nn.Linear(6, 3)
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    evaluate = funceng.make_eval_step(model, lambda m, b: m(b[0]), compile=True)  # compiled: the model stays unbound
    copy_of_state = state.clone()
    first = evaluate(copy_of_state, batch())
    torch.testing.assert_close(evaluate(copy_of_state, batch()), first)  # the same state again: remembered leaves
    weight = weakref.ref(copy_of_state["params"]["weight"])
    del copy_of_state
    gc.collect()
    assert weight() is None  # the step forgot the leaves of the state it had seen
    torch.testing.assert_close(evaluate(state, batch()), first)


def test_one_compiled_step_trains_many_states_of_a_batchnorm_model_in_one_graph(fresh_dynamo):
    # each new state rebinds the model's BatchNorm buffers; the step must not guard on those tensors (it used to,
    # recompiling per state until torch.compile's limit of 8 made the ninth state a hard failure)
    model = mlp_with_batchnorm()
    tx = optim.adam(1e-3)
    states = [funceng.TrainState.create(model, tx, seed=i) for i in range(12)]
    step = funceng.make_train_step(model, tx, cross_entropy, compile=True)
    for _ in range(2):
        for i in range(12):
            states[i], _ = step(states[i], batch(seed=i))
    assert counters["stats"]["unique_graphs"] == 1
    assert [s["step"].item() for s in states] == [2] * 12
    assert not torch.equal(states[0]["buffers", "1.running_mean"], states[1]["buffers", "1.running_mean"])
