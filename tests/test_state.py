"""TrainState: one locked TensorDict holding everything a run needs, with donation semantics."""

import pytest
import torch
from tensordict import TensorDict

import funceng
from funceng import optim

from .models import batch, cross_entropy, mlp_with_batchnorm


def test_create_holds_params_buffers_opt_state_step_and_rng():
    model = mlp_with_batchnorm()
    state = funceng.TrainState.create(model, optim.adamw(1e-3))
    assert isinstance(state, TensorDict) and state.is_locked
    assert set(state.keys()) == {"params", "buffers", "opt_state", "step", "loss_scale", "rng"}
    assert set(state["params"].flatten_keys(".").keys()) == {n for n, _ in model.named_parameters()}
    assert set(state["buffers"].keys()) == {n for n, _ in model.named_buffers()}
    assert state["step"].dtype == torch.int64 and state["step"].ndim == 0
    assert state["rng"]["cpu"].dtype == torch.uint8
    assert state["opt_state"]["0"]["exp_avg"]["0.weight"].shape == model[0].weight.shape


def test_state_owns_the_weights_and_the_model_shares_them():
    model = mlp_with_batchnorm()
    before = model[0].weight.detach().clone()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    assert torch.equal(state["params"]["0.weight"], before)
    assert model[0].weight.data_ptr() == state["params"]["0.weight"].data_ptr()  # no second copy


def test_seed_sets_the_rng_state():
    a = funceng.TrainState.create(mlp_with_batchnorm(), optim.sgd(0.1), seed=1)
    b = funceng.TrainState.create(mlp_with_batchnorm(), optim.sgd(0.1), seed=1)
    c = funceng.TrainState.create(mlp_with_batchnorm(), optim.sgd(0.1), seed=2)
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    assert not torch.equal(a["rng"]["cpu"], c["rng"]["cpu"])


def test_donated_state_fails_loudly_on_any_use():
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1, momentum=0.9)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    new, _ = step(state, batch())
    assert new["step"].item() == 1
    with pytest.raises(funceng.DonatedStateError, match="donated"):
        state["params"]
    with pytest.raises(funceng.DonatedStateError, match="use the returned state|Use the returned state"):
        step(state, batch())
    assert "donated" in repr(state)
    assert new.is_locked


def test_donate_false_keeps_the_input_state_unchanged():
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1, momentum=0.9)
    state = funceng.TrainState.create(model, tx)
    snapshot = state.clone()
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False, donate=False)
    new, _ = step(state, batch())
    assert (state == snapshot).all()
    assert not torch.equal(new["params"]["0.weight"], state["params"]["0.weight"])


def test_state_of_another_structure_is_rejected_with_the_difference():
    model = mlp_with_batchnorm()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=False, accumulate=2)
    step(funceng.TrainState.create(model, optim.accumulate(optim.sgd(0.1), 2)), batch())
    with pytest.raises(ValueError, match=r"opt_state.*missing keys \['acc', 'inner', 'mini_step'\]"):
        step(state, batch())


def test_a_plain_tensordict_without_the_keys_is_rejected():
    step = funceng.make_train_step(mlp_with_batchnorm(), optim.sgd(0.1), cross_entropy, compile=False)
    with pytest.raises(KeyError, match="missing keys"):
        step(TensorDict({"params": {}}, batch_size=[]), batch())


def test_fast_unflattener_matches_the_reference():
    from funceng import tree

    nested = {
        "a": {"x": torch.zeros(1), "y": torch.ones(1)},
        "b": torch.full((1,), 2.0),
        "c": {},
        "d": {"e": {"f": torch.full((1,), 3.0)}, "g": torch.full((1,), 4.0)},
    }
    template, leaves = tree.flatten(nested)
    assert tree.unflattener(template)(leaves) == tree.unflatten(template, leaves)
    assert tree.unflattener(template)(leaves)["d"]["e"]["f"] is leaves[3]
