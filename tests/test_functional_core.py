"""The pure step off the happy path: frozen parameters, losses over several modules, wrong states, donation,
several states from one model, and function transforms. Each behaviour is pinned eager and compiled."""

import copy
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import funceng
from funceng import optim
from funceng.runner import Runner

from .models import batch, cross_entropy, mlp_with_batchnorm
from .runner_fixtures import TinyNet, runner_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32) if t.dtype == torch.float32 else t.detach()


def _frozen_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = mlp_with_batchnorm()
    model[0].requires_grad_(False)  # the usual way to fine-tune: freeze the pretrained layer
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0  # a negative zero must survive too
    return model


# -- 1. frozen parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compile, amp, accumulate",
    [(False, None, 1), (True, None, 1), (False, "bf16", 2), (True, "bf16", 2), (False, "fp16", 1), (True, "fp16", 3)],
)
def test_frozen_parameters_get_no_update_and_no_optimizer_state(fresh_dynamo, compile, amp, accumulate):
    model = _frozen_backbone()
    tx = optim.adamw(1e-2, weight_decay=0.1)
    state = funceng.TrainState.create(model, optim.accumulate(tx, accumulate))
    before = {name: _bits(p).clone() for name, p in state["params"].items()}
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile, amp=amp, accumulate=accumulate)
    for i in range(2 * accumulate):
        state, _ = step(state, batch(seed=i))
    exp_avg = state["opt_state", "inner", "0", "exp_avg"] if accumulate > 1 else state["opt_state", "0", "exp_avg"]
    assert set(exp_avg.keys()) == {"1.weight", "1.bias", "4.weight", "4.bias"}  # no state for "0.*"
    for name in ("0.weight", "0.bias"):
        assert torch.equal(_bits(state["params"][name]), before[name]), name
    for name in ("1.weight", "4.weight", "4.bias"):
        assert not torch.equal(_bits(state["params"][name]), before[name]), name


@pytest.mark.parametrize("compile", [False, True])
def test_fine_tuning_the_head_follows_torch_optim_exactly(fresh_dynamo, compile):
    model = _frozen_backbone().double()
    reference = copy.deepcopy(model)
    tx = optim.adam(1e-2)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile)
    torch_opt = torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    for i in range(4):
        x, y = batch(dtype=torch.float64, seed=i)
        state, _ = step(state, (x, y))
        torch_opt.zero_grad()
        cross_entropy(reference, (x, y)).backward()
        torch_opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state["params"][name], p.detach(), rtol=1e-12, atol=1e-12)


def test_a_state_created_before_freezing_is_refused_naming_the_optimizer_leaves():
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1, momentum=0.9)
    state = funceng.TrainState.create(model, tx)
    model[0].requires_grad_(False)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['opt_state.0.momentum_buffer.0.weight'.*freezing"):
        step(state, batch())


def test_a_step_for_a_fully_frozen_model_is_refused():
    model = mlp_with_batchnorm().requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model has requires_grad=False"):
        funceng.make_train_step(model, optim.sgd(0.1), cross_entropy)


@pytest.mark.parametrize("compile", [False, True])
def test_freeze_last_in_a_chain_keeps_parameters_bit_identical(fresh_dynamo, compile):
    torch.manual_seed(0)
    model = mlp_with_batchnorm()
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0
    tx = optim.chain(optim.adamw(1e-2, weight_decay=0.5), optim.freeze(lambda name, p: name.startswith("0.")))
    state = funceng.TrainState.create(model, tx)
    before = _bits(state["params"]["0.weight"]).clone()
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile)
    for i in range(3):
        state, _ = step(state, batch(seed=i))
    assert torch.equal(_bits(state["params"]["0.weight"]), before)
    assert not torch.equal(state["params"]["4.weight"], model[4].weight.detach().clone().zero_())


def test_set_to_zero_gives_negative_zero_updates_and_no_state():
    params = {"w": torch.tensor([-0.0, 1.0, -2.0])}
    tx = optim.set_to_zero()
    assert tx.init(params) == {}
    updates, _ = tx.update({"w": torch.tensor([5.0, -3.0, 0.0])}, {}, params)
    optim.apply_updates(params, updates)
    assert torch.equal(params["w"].view(torch.int32), torch.tensor([-0.0, 1.0, -2.0]).view(torch.int32))


def test_masked_passes_the_raw_updates_of_unmasked_parameters_as_optax_does():
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = optim.masked(optim.sgd(0.1), {"a": True, "b": False})
    updates, _ = tx.update({"a": torch.ones(2), "b": torch.ones(2)}, tx.init(params), params)
    assert torch.equal(updates["a"], torch.full((2,), -0.1)) and torch.equal(updates["b"], torch.ones(2))
    with pytest.raises(KeyError, match="mask: no entry for parameter 'b'"):
        optim.masked(optim.sgd(0.1), {"a": True}).init(params)
    with pytest.raises(KeyError, match="partition: no label for parameter 'b'"):
        optim.partition({"x": optim.sgd(0.1)}, {"a": "x"}).init(params)


# -- 2. losses that run through other modules ------------------------------------------------------------------


def _gan(compile: bool, steps: int):
    """examples/gan_two_steps.py's loop: the generator's loss runs through the discriminator."""
    spec = importlib.util.spec_from_file_location("gan_two_steps", ROOT / "examples" / "gan_two_steps.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    state_g, state_d, _ = example.train(steps, compile)
    return state_g, state_d


def test_gan_steps_keep_no_autograd_history_compile_once_each_and_match_eager(fresh_dynamo):
    compiled_g, compiled_d = _gan(compile=True, steps=30)
    for state in (compiled_g, compiled_d):
        assert not [k for k, v in state.items(include_nested=True, leaves_only=True) if v.requires_grad]
    assert counters["stats"]["unique_graphs"] == 2  # one per step object: no requires_grad recompile
    eager_g, eager_d = _gan(compile=False, steps=30)
    torch.testing.assert_close(compiled_g["params"], eager_g["params"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_d["params"], eager_d["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("teacher_trainable", [False, True])
def test_distillation_through_a_teacher_trains_only_the_student(fresh_dynamo, compile, teacher_trainable):
    torch.manual_seed(0)
    teacher, student = mlp_with_batchnorm().eval(), nn.Linear(6, 3)
    teacher.requires_grad_(teacher_trainable)
    teacher_before = copy.deepcopy(teacher.state_dict())

    def distillation_loss(model, batch):
        x, _ = batch
        with torch.no_grad():
            target = F.softmax(teacher(x) / 2.0, dim=-1)
        return F.kl_div(F.log_softmax(model(x) / 2.0, dim=-1), target, reduction="batchmean")

    tx = optim.sgd(0.5, momentum=0.9)
    state = funceng.TrainState.create(student, tx)
    step = funceng.make_train_step(student, tx, distillation_loss, compile=compile)
    losses = []
    for i in range(5):
        state, metrics = step(state, batch(seed=i % 2))
        losses.append(metrics["loss"].item())
    assert losses[-1] < losses[0]
    assert not any(v.requires_grad for v in state.values(include_nested=True, leaves_only=True))
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def _teacher_and_student():
    torch.manual_seed(0)
    return mlp_with_batchnorm(), nn.Linear(6, 3)  # the teacher's BatchNorm is in training mode


@pytest.mark.parametrize("compile", [False, True])
def test_a_loss_may_update_the_statistics_of_a_module_it_names(fresh_dynamo, compile):
    teacher, student = _teacher_and_student()
    loss_fn = lambda model, batch: F.mse_loss(model(batch[0]), teacher(batch[0]).detach())  # noqa: E731
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(student, tx)
    step = funceng.make_train_step(student, tx, loss_fn, compile=compile)
    for i in range(3):
        state, _ = step(state, batch(seed=i))
    reference_teacher, reference_student = _teacher_and_student()
    reference_opt = torch.optim.SGD(reference_student.parameters(), lr=0.1)
    for i in range(3):
        x, _ = batch(seed=i)
        reference_opt.zero_grad()
        F.mse_loss(reference_student(x), reference_teacher(x).detach()).backward()
        reference_opt.step()
    torch.testing.assert_close(teacher.state_dict(), reference_teacher.state_dict())  # running stats moved alike
    assert teacher[1].num_batches_tracked.item() == 3
    torch.testing.assert_close(dict(state["params"].items()), dict(reference_student.named_parameters()))


def test_a_compiled_loss_updating_statistics_of_a_module_it_reaches_indirectly_is_named(fresh_dynamo):
    teacher, student = _teacher_and_student()
    holder = {"teacher": teacher}  # a container: the step cannot see the module inside
    loss_fn = lambda model, batch: F.mse_loss(model(batch[0]), holder["teacher"](batch[0]).detach())  # noqa: E731
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(student, tx)
    compiled = funceng.make_train_step(student, tx, loss_fn, compile=True)
    with pytest.raises(RuntimeError, match=r"another module in training mode .* Name that module directly"):
        compiled(state, batch())
    teacher.eval()
    state, _ = compiled(state, batch())  # the refused call left the state and the step usable
    assert state["step"].item() == 1


# -- 3. a wrong state is named and does not spoil the step --------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True])
def test_a_wrong_optimizer_state_is_named_and_the_step_stays_usable(fresh_dynamo, compile):
    model = mlp_with_batchnorm()
    adam_state = funceng.TrainState.create(model, optim.adam(0.1))
    sgd_state = funceng.TrainState.create(model, optim.sgd(0.1))
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=compile)
    with pytest.raises(ValueError, match=r"unexpected keys \['opt_state.1'\]"):
        step(adam_state, batch())
    new, metrics = step(sgd_state, batch())
    assert new["step"].item() == 1 and torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("compile", [False, True])
def test_a_batch_that_fails_in_the_loss_leaves_the_state_and_the_step_usable(fresh_dynamo, compile):
    model = mlp_with_batchnorm()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    snapshot = state.clone()
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=compile)
    with pytest.raises(Exception, match="shapes cannot be multiplied|must have same reduction dim"):
        step(state, (torch.randn(16, 5), torch.zeros(16, dtype=torch.long)))
    assert (state == snapshot).all()  # not donated, not changed
    state, metrics = step(state, batch())
    assert state["step"].item() == 1 and torch.isfinite(metrics["loss"])


@pytest.mark.parametrize("compile", [False, True])
def test_a_state_for_another_shape_dtype_or_device_names_the_leaf(fresh_dynamo, compile):
    step = funceng.make_train_step(nn.Linear(6, 3), optim.sgd(0.1), cross_entropy, compile=compile)
    wider = funceng.TrainState.create(nn.Linear(6, 4), optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"'params/weight' is a torch.float32 tensor of shape \(4, 6\).*\(3, 6\)"):
        step(wider, batch())
    double = funceng.TrainState.create(nn.Linear(6, 3).double(), optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"'params/weight' is a torch.float64 tensor.*need torch.float32"):
        step(double, batch())
    meta = funceng.TrainState.create(nn.Linear(6, 3), optim.sgd(0.1)).to("meta")
    with pytest.raises(ValueError, match=r"'params/weight' .* on meta, but .* on cpu"):
        step(meta, batch())
    state, _ = step(funceng.TrainState.create(nn.Linear(6, 3), optim.sgd(0.1)), batch())
    assert state["step"].item() == 1


def test_eval_step_checks_only_weights_against_the_model():
    model = mlp_with_batchnorm()
    eval_step = funceng.make_eval_step(model, lambda m, b: m(b[0]), compile=False)
    assert eval_step(funceng.TrainState.create(model, optim.adam(0.1)), batch()).shape == (16, 3)
    assert eval_step(funceng.TrainState.create(model, optim.sgd(0.1)), batch()).shape == (16, 3)  # any optimizer
    with pytest.raises(ValueError, match=r"'params/4.weight' is a torch.float32 tensor of shape \(2, 12\)"):
        other = nn.Sequential(*list(mlp_with_batchnorm())[:4], nn.Linear(12, 2))
        eval_step(funceng.TrainState.create(other, optim.sgd(0.1)), batch())


# -- 4. donation --------------------------------------------------------------------------------------------------

USES = {
    "getitem": lambda s: s["params"],
    "keys": lambda s: s.keys(),
    "get": lambda s: s.get("params"),
    "items": lambda s: s.items(),
    "values": lambda s: s.values(),
    "iter": lambda s: iter(s),
    "len": lambda s: len(s),
    "contains": lambda s: "params" in s,
    "to": lambda s: s.to("cpu"),
    "clone": lambda s: s.clone(),
    "eq": lambda s: s == s,
    "apply": lambda s: s.apply(lambda t: t),
    "setitem": lambda s: s.__setitem__("x", torch.zeros(())),
    "setattr": lambda s: setattr(s, "x", 1),
    "is_locked": lambda s: s.is_locked,
    "pickle": lambda s: pickle.dumps(s),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_every_use_of_a_donated_state_raises(use):
    model = nn.Linear(6, 3)
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=False)(state, batch())
    with pytest.raises(funceng.DonatedStateError, match="donated to a train step"):
        USES[use](state)
    assert repr(state) == "TrainState(<donated>)" and isinstance(state, funceng.TrainState)


def test_every_use_of_a_state_donated_to_a_compiled_step_raises(fresh_dynamo):
    model = nn.Linear(6, 3)
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    new, _ = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=True)(state, batch())
    for use in USES.values():
        with pytest.raises(funceng.DonatedStateError):
            use(state)
    assert new["step"].item() == 1


@pytest.mark.parametrize("compile", [False, True])
def test_key_views_taken_before_a_step_list_every_leaf_of_the_next_state(fresh_dynamo, compile):
    model = nn.Linear(6, 3)
    state = funceng.TrainState.create(model, optim.sgd(0.1, momentum=0.9))
    keys_before = list(state.keys(include_nested=True, leaves_only=True))
    state[("params", "bias")].fill_(float("nan"))  # a NaN the user's check over keys() must find
    step = funceng.make_train_step(model, optim.sgd(0.1, momentum=0.9), cross_entropy, compile=compile)
    new, _ = step(state, batch())
    keys_after = list(new.keys(include_nested=True, leaves_only=True))
    assert keys_after == keys_before and len(keys_after) == 9
    assert [k for k in keys_after if not torch.isfinite(new[k].float()).all()] == [
        ("params", "weight"),
        ("params", "bias"),
        ("opt_state", "0", "momentum_buffer", "weight"),
        ("opt_state", "0", "momentum_buffer", "bias"),
    ]


# -- 5. several states from one model, and function transforms ---------------------------------------------------


@pytest.mark.parametrize("compile", [False, True])
def test_states_created_from_one_reinitialised_model_are_independent(fresh_dynamo, compile):
    torch.manual_seed(0)
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1, momentum=0.9)
    members, references = [], []
    for _ in range(3):
        for layer in (model[0], model[1], model[4]):
            layer.reset_parameters()
        members.append(funceng.TrainState.create(model, tx))
        references.append(copy.deepcopy(model))
    initial = [m["params"].clone() for m in members]
    assert not torch.equal(initial[0]["0.weight"], initial[1]["0.weight"])
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile)
    for i in range(3):  # interleaved: each member's step binds the model to that member only
        members = [step(member, batch(seed=i))[0] for member in members]
    for member, reference in zip(members, references):
        ref_state = funceng.TrainState.create(reference, tx)
        ref_step = funceng.make_train_step(reference, tx, cross_entropy, compile=False)
        for i in range(3):
            ref_state, _ = ref_step(ref_state, batch(seed=i))
        torch.testing.assert_close(member["params"], ref_state["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True])
def test_the_model_shares_the_stepped_state_weights_so_no_second_copy_lives(fresh_dynamo, compile):
    model = mlp_with_batchnorm()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=compile)
    state, _ = step(state, batch())
    assert model[0].weight.data_ptr() == state["params"]["0.weight"].data_ptr()
    assert model[1].running_mean is state["buffers"]["1.running_mean"]


@pytest.mark.parametrize("compile", [False, True])
def test_vmap_over_a_step_fails_at_once_pointing_to_population_steps(fresh_dynamo, compile):
    model = nn.Linear(6, 3)
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=compile, donate=False)
    x, y = batch()
    with pytest.raises(
        RuntimeError, match=r"cannot run inside torch.func.vmap.*make_population_step.*docs/population.md"
    ):
        torch.func.vmap(lambda xs: step(state, (xs, y))[1]["loss"])(x.unsqueeze(0).expand(2, -1, -1))
    eval_step = funceng.make_eval_step(model, lambda m, b: m(b), compile=compile)
    with pytest.raises(RuntimeError, match=r"cannot run inside torch.func.vmap"):
        torch.func.vmap(lambda xs: eval_step(state, xs))(x.unsqueeze(0).expand(2, -1, -1))
    assert step(state, (x, y))[0]["step"].item() == 1  # and the step still works outside


# -- the Runner: frozen parameters through the config --------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True])
def test_runner_leaves_requires_grad_false_and_lr_mult_zero_parameters_unchanged(fresh_dynamo, tmp_path, compile):
    model = TinyNet()
    model.net[0].requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optim_wrapper = dict(
        type="AmpOptimWrapper",
        dtype="bfloat16",
        accumulative_counts=2,
        optimizer=dict(type="AdamW", lr=0.05, weight_decay=0.5),
        paramwise_cfg=dict(custom_keys={"net.4": dict(lr_mult=0.0)}),
    )
    kwargs = runner_kwargs(tmp_path, model=model, compile=compile, optim_wrapper=optim_wrapper)
    runner = Runner(**{**kwargs, "train_cfg": dict(by_epoch=True, max_epochs=1)})
    runner.train()
    params = runner.state["params"]
    for name in ("net.0.weight", "net.0.bias", "net.4.weight", "net.4.bias"):
        assert torch.equal(_bits(params[name]), _bits(before[name])), name
    assert not torch.equal(params["net.1.weight"], before["net.1.weight"])
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "Frozen by requires_grad=False: 2 parameters stay unchanged (net.0.weight, net.0.bias)" in log
    assert "Frozen by paramwise_cfg lr_mult=0: 2 parameters stay unchanged (net.4.weight, net.4.bias)" in log


def test_resuming_a_run_with_frozen_parameters_is_bitwise_exact(tmp_path):
    def make_runner(work, max_epochs, resume=False):
        torch.manual_seed(0)
        model = TinyNet()
        model.net[0].requires_grad_(False)
        optim_wrapper = dict(
            optimizer=dict(type="AdamW", lr=0.05, weight_decay=0.1),
            paramwise_cfg=dict(custom_keys={"net.4": dict(lr_mult=0.0)}),
        )
        kwargs = runner_kwargs(work, model=model, optim_wrapper=optim_wrapper, resume=resume)
        return Runner(**{**kwargs, "train_cfg": dict(by_epoch=True, max_epochs=max_epochs)})

    straight = make_runner(tmp_path / "straight", 3)
    straight.train()
    make_runner(tmp_path / "interrupted", 2).train()
    resumed = make_runner(tmp_path / "interrupted", 3, resume=True)
    resumed.train()
    keys = list(straight.state.keys(include_nested=True, leaves_only=True))
    assert keys == list(resumed.state.keys(include_nested=True, leaves_only=True))
    assert {key[-1] for key in keys if "exp_avg" in key} == {"net.1.weight", "net.1.bias"}  # none for frozen ones
    assert resumed.iter == straight.iter == 30 and resumed.state["step"].item() == 30
    assert "resumed epoch: 2, iter: 20" in (resumed.log_dir / f"{resumed.timestamp}.log").read_text()
    for key in keys:
        assert torch.equal(straight.state[key], resumed.state[key]), key
