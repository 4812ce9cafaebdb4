"""funceng.optim trajectories equal torch.optim's in float64 (relative error <= 1e-9 over tens of steps)."""

import itertools

import pytest
import torch

from funceng import optim, schedules, tree

STEPS = 30


def _params():
    gen = torch.Generator().manual_seed(1)
    return {
        "w": torch.randn(5, 4, dtype=torch.float64, generator=gen),
        "b": torch.randn(4, dtype=torch.float64, generator=gen),
    }


def _grads(step: int, params):
    gen = torch.Generator().manual_seed(100 + step)
    # Gradients depend on the parameters, as real ones do, so trajectory errors would compound.
    return {n: torch.randn(p.shape, dtype=torch.float64, generator=gen) + 0.3 * p for n, p in params.items()}


def _run_torch(make_opt, make_sched=None, clip=None):
    params = {n: torch.nn.Parameter(p.clone()) for n, p in _params().items()}
    opt = make_opt(list(params.values()))
    sched = make_sched(opt) if make_sched else None
    trajectory = []
    for step in range(STEPS):
        grads = _grads(step, {n: p.detach() for n, p in params.items()})
        for n, p in params.items():
            p.grad = grads[n].clone()
        if clip is not None:
            clip(list(params.values()))
        opt.step()
        if sched:
            sched.step()
        trajectory.append({n: p.detach().clone() for n, p in params.items()})
    return trajectory


def _run_funceng(tx):
    params = _params()
    state = tx.init(params)
    trajectory = []
    for step in range(STEPS):
        updates, state = tx.update(_grads(step, params), state, params)
        optim.apply_updates(params, updates)
        trajectory.append({n: p.clone() for n, p in params.items()})
    return trajectory


def _assert_same_trajectory(ours, theirs):
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=f"step {step}, {name}")


SGD_CASES = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd)
    for m, d, n, wd in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 1e-2])
    if not (n and (m == 0 or d != 0))
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_matches_torch_for_every_option(kwargs):
    ours = _run_funceng(optim.sgd(0.05, **kwargs))
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, **kwargs))
    _assert_same_trajectory(ours, theirs)


ADAM_CASES = [
    dict(),
    dict(betas=(0.8, 0.99)),
    dict(eps=1e-3),
    dict(weight_decay=0.1),
]


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=str)
def test_adam_matches_torch_for_every_option(kwargs):
    ours = _run_funceng(optim.adam(0.01, **kwargs))
    theirs = _run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01, **kwargs))
    _assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("kwargs", ADAM_CASES[:3] + [dict(weight_decay=0.0), dict(weight_decay=0.3)], ids=str)
def test_adamw_matches_torch_for_every_option(kwargs):
    ours = _run_funceng(optim.adamw(0.01, **kwargs))
    theirs = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.01, **kwargs))
    _assert_same_trajectory(ours, theirs)


def test_torch_default_arguments_are_kept():
    ours = _run_funceng(optim.adamw())
    theirs = _run_torch(lambda ps: torch.optim.AdamW(ps))
    _assert_same_trajectory(ours, theirs)


def test_scheduled_learning_rate_matches_torch_scheduler():
    ours = _run_funceng(optim.sgd(schedules.cosine_annealing(0.1, T_max=20, eta_min=0.01), momentum=0.9))
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.01),
    )
    _assert_same_trajectory(ours, theirs)


def test_adam_with_warmup_schedule_matches_torch():
    sched = schedules.linear(0.01, start_factor=0.1, total_iters=10)
    ours = _run_funceng(optim.adam(sched, weight_decay=0.01))
    theirs = _run_torch(
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01),
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10),
    )
    _assert_same_trajectory(ours, theirs)


def test_clip_by_global_norm_matches_clip_grad_norm():
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1, momentum=0.9))
    ours = _run_funceng(tx)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5),
    )
    _assert_same_trajectory(ours, theirs)


def test_clip_by_global_norm_reports_the_norm_before_clipping():
    tx = optim.clip_by_global_norm(1.0)
    grads = {"a": torch.tensor([3.0, 4.0])}
    updates, state = tx.update(grads, tx.init(grads), None)
    assert state["grad_norm"].item() == pytest.approx(5.0)
    assert torch.linalg.vector_norm(updates["a"]).item() == pytest.approx(1.0, rel=1e-5)


def test_clip_by_value_matches_clip_grad_value():
    tx = optim.chain(optim.clip_by_value(0.2), optim.adam(0.01))
    ours = _run_funceng(tx)
    theirs = _run_torch(
        lambda ps: torch.optim.Adam(ps, lr=0.01), clip=lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.2)
    )
    _assert_same_trajectory(ours, theirs)


def test_partition_gives_groups_their_own_lr_and_decay_like_param_groups():
    tx = optim.partition(
        {"decay": optim.sgd(0.1, momentum=0.9, weight_decay=0.05), "no_decay": optim.sgd(0.02, momentum=0.9)},
        lambda name, p: "no_decay" if p.ndim == 1 else "decay",
    )
    ours = _run_funceng(tx)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(
            [{"params": [ps[0]], "weight_decay": 0.05}, {"params": [ps[1]], "lr": 0.02}], lr=0.1, momentum=0.9
        )
    )
    _assert_same_trajectory(ours, theirs)


def test_partition_rejects_unknown_label():
    tx = optim.partition({"a": optim.sgd(0.1)}, {"w": "a", "b": "typo"})
    with pytest.raises(KeyError, match="'b' has label 'typo'"):
        tx.init(_params())


def test_masked_leaves_unmasked_updates_unchanged():
    tx = optim.masked(optim.add_decayed_weights(0.5), lambda name, p: name == "w")
    params = _params()
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    torch.testing.assert_close(updates["w"], 0.5 * params["w"])
    assert torch.count_nonzero(updates["b"]) == 0


def test_accumulate_applies_the_mean_update_every_k_steps():
    k = 3
    inner, acc = optim.sgd(0.1, momentum=0.9), optim.accumulate(optim.sgd(0.1, momentum=0.9), k)
    params_ref, params_acc = _params(), _params()
    state_ref, state_acc = inner.init(params_ref), acc.init(params_acc)
    for window in range(4):
        micro = [_grads(10 * window + i, params_ref) for i in range(k)]
        for i, grads in enumerate(micro):
            updates, state_acc = acc.update({n: g.clone() for n, g in grads.items()}, state_acc, params_acc)
            optim.apply_updates(params_acc, updates)
            if i < k - 1:  # nothing moves until the k-th micro-step
                for n in params_ref:
                    torch.testing.assert_close(params_acc[n], params_ref[n], rtol=0, atol=0)
        mean = {n: sum(g[n] for g in micro) / k for n in params_ref}
        updates, state_ref = inner.update(mean, state_ref, params_ref)
        optim.apply_updates(params_ref, updates)
        for n in params_ref:
            torch.testing.assert_close(params_acc[n], params_ref[n], rtol=1e-12, atol=1e-14)
    assert state_acc["mini_step"].item() == 0


def test_apply_if_false_leaves_state_and_params_bitwise_unchanged():
    tx = optim.adam(0.1)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(0, params), state, params)
    before = [t.clone() for t in tree.leaves(state)]
    updates, state = optim.apply_if(torch.tensor(False), tx, _grads(1, params), state, params)
    for old, new in zip(before, tree.leaves(state), strict=True):
        assert torch.equal(old, new)
    assert all(torch.count_nonzero(u) == 0 for u in updates.values())


def test_a_purely_functional_user_transform_composes():
    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(updates, state, params=None):  # returns new tensors instead of writing in place
        return {n: u * 2 for n, u in updates.items()}, {"count": state["count"] + 1}

    tx = optim.chain(optim.GradientTransformation(init, update), optim.sgd(0.1))
    ours = _run_funceng(tx)
    theirs = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.2))
    _assert_same_trajectory(ours, theirs)
