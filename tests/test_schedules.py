"""funceng.schedules produce the values of the matching torch.optim.lr_scheduler classes."""

import pytest
import torch
from torch.optim import lr_scheduler as ls

from funceng import schedules

BASE = 0.1
N = 60


def _torch_values(make_scheduler, base=BASE, n=N):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base, momentum=0.9)
    sched = make_scheduler(opt)
    values = []
    for _ in range(n):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return torch.tensor(values, dtype=torch.float64)


def _our_values(schedule, n=N):
    return torch.stack([schedule(torch.tensor(i)) for i in range(n)])


CASES = {
    "ConstantLR": (
        schedules.constant_factor(BASE, factor=0.5, total_iters=7),
        lambda o: ls.ConstantLR(o, factor=0.5, total_iters=7),
    ),
    "LinearLR": (
        schedules.linear(BASE, start_factor=0.2, end_factor=0.9, total_iters=13),
        lambda o: ls.LinearLR(o, start_factor=0.2, end_factor=0.9, total_iters=13),
    ),
    "StepLR": (schedules.step(BASE, step_size=7, gamma=0.5), lambda o: ls.StepLR(o, step_size=7, gamma=0.5)),
    "MultiStepLR": (
        schedules.multi_step(BASE, milestones=[5, 20, 20, 41], gamma=0.3),
        lambda o: ls.MultiStepLR(o, milestones=[5, 20, 20, 41], gamma=0.3),
    ),
    "ExponentialLR": (schedules.exponential(BASE, gamma=0.95), lambda o: ls.ExponentialLR(o, gamma=0.95)),
    "CosineAnnealingLR": (
        schedules.cosine_annealing(BASE, T_max=25, eta_min=0.001),
        lambda o: ls.CosineAnnealingLR(o, T_max=25, eta_min=0.001),
    ),
    "PolynomialLR": (
        schedules.polynomial(BASE, total_iters=40, power=2.0),
        lambda o: ls.PolynomialLR(o, total_iters=40, power=2.0),
    ),
    "OneCycleLR-cos": (
        schedules.one_cycle(0.5, total_steps=N),
        lambda o: ls.OneCycleLR(o, max_lr=0.5, total_steps=N, cycle_momentum=False),
    ),
    "OneCycleLR-linear-3phase": (
        schedules.one_cycle(0.5, total_steps=N, pct_start=0.25, anneal_strategy="linear", three_phase=True),
        lambda o: ls.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=N,
            pct_start=0.25,
            anneal_strategy="linear",
            three_phase=True,
            cycle_momentum=False,
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_schedule_matches_torch_scheduler(name):
    ours, make = CASES[name]
    n = N - 1 if name.startswith("OneCycle") else N  # OneCycleLR refuses to step past total_steps
    torch.testing.assert_close(_our_values(ours, n), _torch_values(make, n=n), rtol=1e-9, atol=1e-12)


def test_join_runs_schedules_end_to_end_like_sequential_lr():
    ours = schedules.join(
        [schedules.linear(BASE, start_factor=0.1, total_iters=5), schedules.exponential(BASE, gamma=0.9)], [5]
    )
    theirs = _torch_values(
        lambda o: ls.SequentialLR(
            o, [ls.LinearLR(o, start_factor=0.1, total_iters=5), ls.ExponentialLR(o, gamma=0.9)], milestones=[5]
        )
    )
    torch.testing.assert_close(_our_values(ours), theirs, rtol=1e-9, atol=1e-12)


def test_constant_and_int_steps():
    assert schedules.constant(0.3)(7).item() == pytest.approx(0.3)
    assert schedules.linear_warmup(1.0, warmup_steps=4)(2).item() == pytest.approx(0.5)
    assert schedules.linear_warmup(1.0, warmup_steps=4)(100).item() == pytest.approx(1.0)


def test_schedules_are_branchless_tensor_functions():
    step = torch.tensor(3)
    for name, (schedule, _) in CASES.items():
        value = schedule(step)
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.ndim == 0, name


def test_join_requires_one_boundary_between_schedules():
    with pytest.raises(ValueError, match="2 schedules need 1 boundaries"):
        schedules.join([schedules.constant(1.0), schedules.constant(2.0)], [])
