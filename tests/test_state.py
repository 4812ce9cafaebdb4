"""TrainState: one locked TensorDict holding everything a run needs, with donation semantics."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import funceng
from funceng import optim
from funceng.state import donate

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


def test_state_owns_a_copy_of_the_weights_and_leaves_the_model_alone():
    model = mlp_with_batchnorm()
    before = model[0].weight.detach().clone()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    assert torch.equal(state["params"]["0.weight"], before)
    assert model[0].weight.data_ptr() != state["params"]["0.weight"].data_ptr()  # bound by the first step


def test_tensordict_behaviour_that_donation_relies_on():
    """`funceng.state.donate` moves a TrainState's attributes to a new object in O(1). It relies on this
    tensordict behaviour, tested for the range pyproject.toml allows:"""
    state = funceng.TrainState.create(nn.Linear(2, 2), optim.sgd(0.1))
    # 1. a TensorDict keeps everything in its instance __dict__: no __slots__ hold contents
    tensordict_classes = [cls for cls in type(state).__mro__ if cls.__module__.startswith("tensordict")]
    assert all(not getattr(cls, "__slots__", ()) for cls in tensordict_classes)
    assert "_tensordict" in vars(state)
    # 2. while locked, key views are cached in `_cache` and refer to the object they were made for
    view = state.keys(include_nested=True, leaves_only=True)
    assert view.tensordict is state and "_cache" in vars(state)
    # 3. nested TensorDicts remember their locked parents as weakrefs and ask them `_is_locked`
    parents = vars(state["params"])["__lock_parents_weakrefs"]
    assert [ref() for ref in parents] == [state]
    new = donate(state)
    assert len(list(new.keys(include_nested=True, leaves_only=True))) == 7  # no view of the old object
    assert new.unlock_().is_locked is False and new.lock_().is_locked  # the Runner adds hook entries this way
    assert new["params"].is_locked


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
    expected = r"missing keys \['opt_state.mini_step', 'opt_state.acc', 'opt_state.inner'\] and unexpected keys"
    with pytest.raises(ValueError, match=expected):
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
