"""make_train_step / make_eval_step in eager mode: exact PyTorch semantics, pure functions of (state, batch)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import funceng
from funceng import optim, schedules

from .models import LossDictModel, batch, cross_entropy, mlp_with_batchnorm


def test_eager_step_matches_hand_written_torch_loop_with_batchnorm():
    model = mlp_with_batchnorm(torch.float64)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    tx = optim.sgd(schedules.step(0.05, 3, 0.5), momentum=0.9, weight_decay=1e-3)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    for i in range(10):
        data = batch(dtype=torch.float64, seed=i)
        opt.zero_grad()
        cross_entropy(reference, data).backward()
        opt.step()
        sched.step()
        state, metrics = step(state, data)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state["params"][name], p.detach(), rtol=1e-9, atol=1e-12)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(state["buffers"][name], b, rtol=1e-9, atol=1e-12)
    assert state["buffers"]["1.num_batches_tracked"].item() == 10
    assert state["step"].item() == 10
    assert metrics["lr"].item() == pytest.approx(0.05 * 0.5**3)


def test_model_holds_the_latest_weights_after_a_step():
    model = mlp_with_batchnorm()
    tx = optim.adam(1e-2)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    for i in range(3):
        state, _ = step(state, batch(seed=i))
    assert torch.equal(model[0].weight.detach(), state["params"]["0.weight"])
    assert torch.equal(model[1].running_mean, state["buffers"]["1.running_mean"])


def test_base_model_losses_are_summed_and_other_entries_logged():
    model = LossDictModel()
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, compile=False)  # loss_fn=None: model(*batch, mode="loss")
    x, y = batch()
    with torch.no_grad():
        out = model.net(x)
        expected = F.cross_entropy(out, y) + out.pow(2).mean()
    state, metrics = step(state, (x, y))
    assert metrics["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["loss_cls"].item() == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert 0.0 <= metrics["acc"].item() <= 1.0
    assert not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (lambda out: (out.sum(),), TypeError, "must return a scalar tensor or a dict of losses.*got tuple"),
        (lambda out: {"accuracy": out.sum()}, KeyError, "no entry whose key contains 'loss'"),
        (lambda out: out, ValueError, "scalar tensor, got shape"),
    ],
)
def test_wrong_loss_return_is_a_clear_error(returned, error, match):
    model = mlp_with_batchnorm()
    step = funceng.make_train_step(model, optim.sgd(0.1), lambda m, b: returned(m(b[0])), compile=False)
    with pytest.raises(error, match=match):
        step(funceng.TrainState.create(model, optim.sgd(0.1)), batch())


def test_same_state_and_batch_give_the_same_result_even_with_dropout():
    model = mlp_with_batchnorm(dropout=0.5)
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(model, tx, seed=3)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False, donate=False)
    a, metrics_a = step(state, batch())
    torch.manual_seed(12345)  # the global generator does not matter: the state's does
    b, metrics_b = step(state, batch())
    assert torch.equal(metrics_a["loss"], metrics_b["loss"])
    assert (a == b).all()
    c, metrics_c = step(a, batch())
    assert not torch.equal(metrics_a["loss"], metrics_c["loss"])  # the state's generator advanced
    assert not torch.equal(a["rng"]["cpu"], state["rng"]["cpu"])


def test_step_leaves_the_global_generator_alone():
    model = mlp_with_batchnorm(dropout=0.5)
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    step = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=False)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    step(state, batch())
    assert torch.equal(torch.rand(3), expected)


def test_accumulated_half_batches_equal_one_full_batch_step():
    model = torch.nn.Linear(6, 3).double()
    reference = copy.deepcopy(model)
    tx = optim.sgd(0.1, momentum=0.9)
    state = funceng.TrainState.create(model, optim.accumulate(tx, 2))
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False, accumulate=2)
    ref_state = funceng.TrainState.create(reference, tx)
    ref_step = funceng.make_train_step(reference, tx, cross_entropy, compile=False)
    for i in range(3):
        x, y = batch(16, torch.float64, seed=i)
        state, _ = step(state, (x[:8], y[:8]))
        state, _ = step(state, (x[8:], y[8:]))
        ref_state, _ = ref_step(ref_state, (x, y))
        torch.testing.assert_close(state["params"]["weight"], ref_state["params"]["weight"], rtol=1e-12, atol=1e-14)


def test_clipping_reports_grad_norm_and_metrics_are_snapshots():
    model = mlp_with_batchnorm()
    tx = optim.chain(optim.clip_by_global_norm(1e-3), optim.sgd(schedules.exponential(0.1, 0.5)))
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    state, first = step(state, batch())
    state, second = step(state, batch(seed=1))
    assert first["grad_norm"].item() > 1e-3
    assert first["lr"].item() == pytest.approx(0.1) and second["lr"].item() == pytest.approx(0.05)


def _loss_times_factor(model, b):
    x, y, factor = b
    return F.cross_entropy(model(x), y) * factor


def test_fp16_skips_a_non_finite_step_and_backs_off_the_loss_scale():
    model = mlp_with_batchnorm()
    tx = optim.adam(1e-2)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, _loss_times_factor, compile=False, amp="fp16")
    x, y = batch()
    state, metrics = step(state, (x, y, torch.tensor(1.0)))
    assert torch.isfinite(metrics["loss"]) and metrics["loss_scale"].item() == 2.0**16
    params = state["params"].clone()
    opt_state = state["opt_state"].clone()
    state, metrics = step(state, (x, y, torch.tensor(float("inf"))))
    assert (state["params"] == params).all()
    assert (state["opt_state"] == opt_state).all()  # Adam's count and moments untouched
    assert state["loss_scale"]["scale"].item() == 2.0**15
    state, metrics = step(state, (x, y, torch.tensor(1.0)))
    assert not torch.equal(state["params"]["0.weight"], params["0.weight"])
    assert state["opt_state"]["0"]["count"].item() == 2


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_an_fp16_step_skipped_for_a_nan_batch_leaves_the_batchnorm_statistics_as_they_were(compile):
    torch.manual_seed(0)
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile, amp="fp16")
    x, y = batch()
    state, _ = step(state, (x, y))
    buffers = state["buffers"].clone()
    poisoned = x.clone()
    poisoned[0, 0] = float("nan")
    state, metrics = step(state, (poisoned, y))
    assert not torch.isfinite(metrics["loss"]) and metrics["loss_scale"].item() == 2.0**15  # skipped
    assert (state["buffers"] == buffers).all()  # running mean/var and num_batches_tracked untouched
    state, _ = step(state, (x, y))
    assert (
        state["buffers"]["1.num_batches_tracked"].item() == 2
        and torch.isfinite(state["buffers"]["1.running_var"]).all()
    )


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_skipped_fp16_micro_step_with_accumulation_and_a_frozen_layer_changes_nothing(compile):
    """fp16 + accumulation + a frozen parameter + compile: the skipped micro-step leaves the weights, the
    accumulator, the BatchNorm statistics and the frozen layer as they were; the window then completes."""
    torch.manual_seed(0)
    model = mlp_with_batchnorm()
    model[0].bias.requires_grad_(False)
    tx = optim.accumulate(optim.sgd(0.1, momentum=0.9), every=2)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=compile, amp="fp16")
    x, y = batch()
    state, _ = step(state, (x, y))  # micro-step 1 of the first window
    before = state.clone()
    poisoned = x.clone()
    poisoned[0, 0] = float("nan")
    state, metrics = step(state, (poisoned, y))
    assert not torch.isfinite(metrics["loss"]) and metrics["loss_scale"].item() == 2.0**15
    for part in ("params", "opt_state", "buffers"):
        assert (state[part] == before[part]).all(), part
    state, _ = step(state, (x, y))  # completes the window: the update lands, the frozen bias stays
    assert not torch.equal(state["params"]["0.weight"], before["params"]["0.weight"])
    assert torch.equal(state["params"]["0.bias"], before["params"]["0.bias"])
    assert all(torch.isfinite(t).all() for t in state.values(True, True) if t.is_floating_point())


def test_bf16_autocast_trains_fp32_params():
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False, amp="bf16")
    before = state["params"]["0.weight"].clone()
    state, metrics = step(state, batch())
    assert state["params"]["0.weight"].dtype == torch.float32
    assert torch.isfinite(metrics["loss"]) and not torch.equal(before, state["params"]["0.weight"])


def test_unused_parameters_get_zero_gradients():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    state = funceng.TrainState.create(model, optim.sgd(0.1))
    before = state["params"]["unused.weight"].clone()
    state, _ = funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile=False)(state, batch())
    assert torch.equal(state["params"]["unused.weight"], before)


def test_eval_step_uses_running_stats_and_leaves_the_state_alone():
    model = mlp_with_batchnorm()
    tx = optim.sgd(0.1)
    state = funceng.TrainState.create(model, tx)
    step = funceng.make_train_step(model, tx, cross_entropy, compile=False)
    for i in range(3):
        state, _ = step(state, batch(seed=i))
    snapshot = state.clone()
    eval_step = funceng.make_eval_step(model, lambda m, b: m(b[0]), compile=False)
    x, _ = batch(seed=9)
    out = eval_step(state, (x,))
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
    assert (state == snapshot).all()
    assert not out.requires_grad


def test_invalid_options_are_rejected():
    model = mlp_with_batchnorm()
    with pytest.raises(ValueError, match="amp must be one of"):
        funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, amp="fp8")
    with pytest.raises(ValueError, match="compile must be"):
        funceng.make_train_step(model, optim.sgd(0.1), cross_entropy, compile="yes")
    with pytest.raises(ValueError, match="Nesterov"):
        optim.sgd(0.1, nesterov=True)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_schedule_follows_the_iteration_through_an_fp16_skipped_step(compile, fresh_dynamo):
    from funceng.runner.param_scheduler import ScheduledHyperparams, TrainLength, schedule_tables

    model = mlp_with_batchnorm()
    length = TrainLength(epoch_length=4, max_iters=4, max_epochs=1, by_epoch=False)
    tables = schedule_tables([dict(type="LinearLR", start_factor=0.25, by_epoch=False)], [dict(lr=0.1)], length)
    hyperparams = ScheduledHyperparams(tables, [None], "cpu")
    tx = optim.inject_hyperparams(optim.sgd, ["lr"])(lr=0.1)
    state = funceng.TrainState.create(model, tx)
    hyperparams.locate(state["opt_state"])
    step = funceng.make_train_step(
        model, tx, _loss_times_factor, compile=compile, amp="fp16", schedule=hyperparams.write
    )
    x, y = batch()
    lrs = []
    for factor in (1.0, float("inf"), 1.0, 1.0):
        before = state["params"]["0.weight"].clone()
        state, metrics = step(state, (x, y, torch.tensor(factor)))
        lrs.append(metrics["lr"].item())
        assert torch.equal(before, state["params"]["0.weight"]) == (factor != 1.0)  # the inf step is skipped
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1])  # ... but the lr moved on, as MMEngine's does
