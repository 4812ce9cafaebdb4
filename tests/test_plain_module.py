"""The Runner trains a plain ``nn.Module`` given the functional API's ``loss_fn`` / ``predict_fn``: the same module
and functions trained by hand with ``make_train_step`` end with the same weights, eager and compiled, and the
Runner's checkpoint holds the by-hand state's leaves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import funceng
from funceng import optim
from funceng.errors import ConfigError
from funceng.metrics import Accuracy, Loss
from funceng.runner import Runner
from tests.runner_fixtures import dataset


def net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def predict_fn(model, batch):
    return model(batch[0])


def plain_runner(tmp_path, model, compile=False, **overrides):
    kwargs = dict(
        model=model,
        loss_fn=loss_fn,
        predict_fn=predict_fn,
        work_dir=tmp_path / "work",
        train_dataloader=DataLoader(dataset(64), batch_size=16, shuffle=False),
        val_dataloader=DataLoader(dataset(32, seed=1), batch_size=16),
        val_evaluator=[Accuracy(), Loss()],
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        default_hooks=dict(checkpoint=dict(interval=2)),
        randomness=dict(seed=0),
        compile=compile,
    )
    return Runner(**{**kwargs, **overrides})


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_plain_module_trains_through_the_runner_as_by_hand(tmp_path, compile, fresh_dynamo):
    with plain_runner(tmp_path, net(), compile) as runner:
        runner.train()
        metrics = runner.val()
    by_hand_model = net()
    tx = optim.sgd(0.1, momentum=0.9)
    state = funceng.TrainState.create(by_hand_model, tx, seed=0)
    step = funceng.make_train_step(by_hand_model, tx, loss_fn, compile=compile)
    for _ in range(2):
        for batch in DataLoader(dataset(64), batch_size=16, shuffle=False):
            state, _ = step(state, batch)
    for group in ("params", "buffers"):
        for name, value in state[group].items():
            torch.testing.assert_close(runner.state[group][name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert set(metrics) == {"accuracy", "loss"} and 0 <= metrics["accuracy"] <= 100 and metrics["loss"] > 0
    saved, _ = funceng.load_state(runner.work_dir / "epoch_2")
    assert (
        set(saved["params"].keys())
        == set(state["params"].keys())
        == {f"{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    )


def test_a_plain_module_without_loss_fn_or_predict_fn_is_refused_naming_them(tmp_path):
    with pytest.raises(ConfigError, match=r"Sequential.forward takes no 'mode' argument.*give loss_fn=lambda model"):
        plain_runner(tmp_path, net(), loss_fn=None)
    with pytest.raises(ConfigError, match=r"validation and testing need predict_fn=lambda model, batch"):
        plain_runner(tmp_path, net(), predict_fn=None)
    with pytest.raises(ConfigError, match=r"loss_fn: expected a function loss_fn\(model, batch\), got int"):
        plain_runner(tmp_path, net(), loss_fn=3)
    plain_runner(tmp_path, net(), predict_fn=None, val_dataloader=None, val_evaluator=None).close()  # training only


def test_a_base_model_may_take_a_loss_fn_instead_of_its_loss_mode(tmp_path):
    from tests.runner_fixtures import TinyNet

    calls = []

    def squared_error_on_logits(model, batch):
        calls.append(1)
        x, y = batch
        return (model(x, y, mode="tensor") ** 2).mean()

    with plain_runner(
        tmp_path, TinyNet(), loss_fn=squared_error_on_logits, predict_fn=None, val_evaluator=None, val_dataloader=None
    ) as runner:
        runner.train()
    assert calls  # traced or called: the Runner used the given loss, not forward(mode="loss")


def test_a_plain_module_trains_as_a_population_through_the_runner(tmp_path):
    kwargs = dict(train_cfg=dict(by_epoch=True, max_epochs=2, population=dict(seeds=[0, 1], lr=[0.1, 0.01])))
    with plain_runner(tmp_path, net(), **kwargs) as runner:
        runner.train()
    metrics = runner.last_metrics
    assert {"member_0/accuracy", "member_1/accuracy", "member_0/loss", "best_member"} <= set(metrics)
    assert runner.state["step"].tolist() == [8, 8]  # two members, 4 batches x 2 epochs each


def test_a_plain_module_with_a_frozen_layer_bf16_and_accumulation_compiled_trains_as_by_hand(tmp_path, fresh_dynamo):
    model = net()
    model[0].requires_grad_(False)
    wrapper = dict(
        type="AmpOptimWrapper",
        dtype="bfloat16",
        accumulative_counts=2,
        optimizer=dict(type="SGD", lr=0.1, momentum=0.9),
    )
    with plain_runner(tmp_path, model, True, optim_wrapper=wrapper, val_evaluator=None, val_dataloader=None) as runner:
        runner.train()
    by_hand_model = net()
    by_hand_model[0].requires_grad_(False)
    sgd = optim.inject_hyperparams(optim.sgd, ["lr", "momentum"])  # as the Runner keeps them: in the state
    tx = optim.accumulate(sgd(lr=0.1, momentum=0.9), 2, total=8)
    state = funceng.TrainState.create(by_hand_model, tx, seed=0)
    step = funceng.make_train_step(by_hand_model, tx, loss_fn, compile=True, amp="bf16")  # tx accumulates
    for _ in range(2):
        for batch in DataLoader(dataset(64), batch_size=16, shuffle=False):
            state, _ = step(state, batch)
    torch.testing.assert_close(runner.state["params"]["0.weight"], net()[0].weight, rtol=0, atol=0)  # frozen
    for name, value in state["params"].items():
        torch.testing.assert_close(runner.state["params"][name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_a_plain_module_run_resumes_to_the_uninterrupted_weights(tmp_path):
    with plain_runner(tmp_path / "whole", net()) as whole:
        whole.train()
    one_epoch = dict(train_cfg=dict(by_epoch=True, max_epochs=1), default_hooks=dict(checkpoint=dict(interval=1)))
    with plain_runner(tmp_path / "cut", net(), **one_epoch) as first:
        first.train()
    with plain_runner(tmp_path / "cut", net(), resume=True, default_hooks=dict(checkpoint=dict(interval=1))) as rest:
        rest.train()
    for group in ("params", "buffers", "opt_state"):
        for name, value in whole.state[group].items():
            torch.testing.assert_close(rest.state[group][name], value, rtol=0, atol=0, msg=f"{group}.{name}")
