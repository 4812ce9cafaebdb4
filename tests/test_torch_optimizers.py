"""Every funceng optimizer against ``torch.optim`` on torch's own optimizer test database
(``torch.testing._internal.common_optimizers.optim_db``): every CPU configuration of every optimizer funceng
implements, in float64, for 30 steps with the learning rate changing at every step (written into the state, as
a schedule does). Parameters must agree to 1e-12 after every step."""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal import common_optimizers  # noqa: E402 (needs expecttest, a dev dependency)

from funceng import optim
from funceng.optim.hyperparams import inject_hyperparams
from funceng.runner.optim_wrapper import TORCH_OPTIMIZERS

FACTORIES = TORCH_OPTIMIZERS  # what a config's optimizer=dict(type=...) names, tested here against torch
STEPS = 30


def _cases():
    for info in common_optimizers.optim_db:
        name = info.optim_cls.__name__
        if name not in FACTORIES:
            continue
        for case in info.optim_inputs_func("cpu", torch.float64):
            yield pytest.param(name, case.kwargs, id=f"{name}-{case.desc}")


def test_every_torch_optimizer_that_takes_a_gradient_is_covered():
    in_db = {info.optim_cls.__name__ for info in common_optimizers.optim_db}
    assert in_db - set(FACTORIES) == {"LBFGS"}


@pytest.mark.parametrize("name, kwargs", list(_cases()))
def test_optimizer_matches_torch_optim_on_its_test_database(name, kwargs):
    torch.manual_seed(0)
    shapes = {"weight": (4, 3), "tall": (5, 2)} if name == "Muon" else {"weight": (4, 3), "bias": (4,), "scale": (1,)}
    start = {n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()}
    reference = {n: t.clone().requires_grad_(True) for n, t in start.items()}
    torch_kwargs = dict(kwargs)
    base_lr = float(kwargs["lr"]) if "lr" in kwargs else _default_lr(name)
    torch_opt = getattr(torch.optim, name)(list(reference.values()), **torch_kwargs)

    ours = {n: t.clone() for n, t in start.items()}
    our_kwargs = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    tx = inject_hyperparams(FACTORIES[name], ["lr"])(**{**our_kwargs, "lr": base_lr})
    state = tx.init(ours)

    # Muon and SparseAdam keep a float32 tensor lr as a tensor and compute lr * ratio in float32; funceng in float64
    tol = 1e-6 if name in ("Muon", "SparseAdam") and isinstance(kwargs.get("lr"), torch.Tensor) else 1e-12
    for step in range(STEPS):
        lr = base_lr * (0.9**step) * (1.5 if step % 3 == 0 else 1.0)  # changes at every step, not monotonic
        grads = {n: torch.randn(s, dtype=torch.float64) for n, s in shapes.items()}
        for group in torch_opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # a float32 tensor in the database: its rounded value
                group["lr"].fill_(lr)
                lr = group["lr"].item()
            else:
                group["lr"] = lr
        if name == "SparseAdam":  # rows 1 and 3 of the weight absent: a sparse gradient, zero rows for funceng
            grads["weight"][1::2] = 0.0
        for n, p in reference.items():
            p.grad = grads[n].to_sparse() if name == "SparseAdam" else grads[n].clone()
        torch_opt.step()

        state["hyperparams"]["lr"].fill_(lr)
        updates, state = tx.update({n: g.clone() for n, g in grads.items()}, state, ours)
        ours = optim.apply_updates(ours, updates)
        for n in shapes:
            torch.testing.assert_close(ours[n], reference[n].detach(), rtol=tol, atol=tol, msg=f"{n}, step {step}")


def _default_lr(name: str) -> float:
    import inspect

    return inspect.signature(getattr(torch.optim, name).__init__).parameters["lr"].default


@pytest.mark.parametrize("name", ["NAdam", "RAdam", "Rprop", "ASGD", "Adafactor", "SparseAdam", "Muon"])
def test_optimizer_compiles_into_one_graph_and_trains_as_it_does_eagerly(name, fresh_dynamo):
    from torch._dynamo.utils import counters

    from funceng import TrainState, make_train_step

    def run(compile):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 1, bias=False)
        )
        tx = inject_hyperparams(FACTORIES[name], ["lr"])(lr=0.01)
        state = TrainState.create(model, tx, seed=0)
        step = make_train_step(model, tx, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), compile=compile)
        data = torch.Generator().manual_seed(1)
        for i in range(6):
            state["opt_state"]["hyperparams"]["lr"].fill_(0.01 * 0.8**i)  # a schedule: no recompile
            batch = (torch.randn(16, 4, generator=data), torch.randn(16, 1, generator=data))
            state, _ = step(state, batch)
        return {k: v.clone() for k, v in state["params"].items()}

    eager, compiled = run(False), run(True)
    # Muon orthogonalises in bfloat16, where inductor keeps fused intermediates in float32: bf16-sized differences
    rtol, atol = (5e-2, 1e-3) if name == "Muon" else (1e-5, 1e-6)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=rtol, atol=atol)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
