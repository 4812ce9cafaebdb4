"""MMEngine's numbers, side by side: the same ``param_scheduler``, ``optim_wrapper`` (accumulation, paramwise
rules, every optimizer) and config go through MMEngine (a test dependency) and funceng, which must give the same
learning rate at every iteration and the same weights at the end."""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

import pytest
import torch
from torch import nn

from funceng.errors import ConfigError
from funceng.runner.param_scheduler import TrainLength, schedule_tables

from . import mmengine_tutorials as tutorials
from .test_mmengine_api import BOTH, assert_same, runner_class

mmengine_schedulers = pytest.importorskip("mmengine.registry").PARAM_SCHEDULERS

EPOCH_LENGTH, MAX_EPOCHS = 3, 5
SCHEDULER_CASES = {
    "constant, end defaults to max_epochs": [dict(type="ConstantLR")],
    "constant by iteration": [dict(type="ConstantLR", factor=0.5, by_epoch=False)],
    "linear, end defaults": [dict(type="LinearLR", start_factor=0.1)],
    "linear warmup then cosine": [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=5),
        dict(type="CosineAnnealingLR", eta_min=0.01, begin=1, convert_to_iter_based=True),
    ],
    "cosine, end defaults": [dict(type="CosineAnnealingLR", eta_min=0.01)],
    "cosine past T_max": [dict(type="CosineAnnealingLR", T_max=3, eta_min=0.01, by_epoch=False)],
    "cosine eta_min_ratio": [dict(type="CosineAnnealingLR", eta_min_ratio=0.1, by_epoch=False, end=10)],
    "poly decays over end-begin-1": [dict(type="PolyLR", eta_min=0.001, power=2.0)],
    "poly by iteration with begin": [dict(type="PolyLR", eta_min=0.001, by_epoch=False, begin=2, end=9)],
    "exponential converted keeps gamma": [dict(type="ExponentialLR", gamma=0.9, convert_to_iter_based=True)],
    "step": [dict(type="StepLR", step_size=2, gamma=0.5)],
    "multistep repeated milestone": [dict(type="MultiStepLR", milestones=[1, 3, 3], convert_to_iter_based=True)],
    "step and multistep chained": [
        dict(type="StepLR", step_size=2, gamma=0.5),
        dict(type="MultiStepLR", milestones=[1, 3], gamma=0.3),
    ],
    "cosine and linear overlap recursively": [
        dict(type="CosineAnnealingLR", eta_min=0.02, by_epoch=False),
        dict(type="LinearLR", start_factor=0.2, by_epoch=False, end=7),
    ],
    "one cycle sets the lr outright": [dict(type="OneCycleLR", eta_max=0.5, by_epoch=False)],
    "one cycle three phase linear": [
        dict(type="OneCycleLR", eta_max=0.5, three_phase=True, anneal_strategy="linear", convert_to_iter_based=True)
    ],
    "cosine restarts": [dict(type="CosineRestartLR", periods=[2, 3], restart_weights=[1, 0.5], eta_min=0.001)],
    "cosine restarts by iteration": [
        dict(type="CosineRestartLR", periods=[4, 7], restart_weights=[1, 0.5], eta_min_ratio=0.1, by_epoch=False)
    ],
    "constant with begin": [dict(type="ConstantLR", factor=0.2, begin=1, end=3)],
    "linear decaying to end_factor": [dict(type="LinearLR", start_factor=1.0, end_factor=0.1, by_epoch=False)],
    "poly square root": [dict(type="PolyLR", power=0.5, eta_min=0.01, by_epoch=False, end=12)],
    "multistep by iteration": [dict(type="MultiStepLR", milestones=[2, 5, 9], gamma=0.5, by_epoch=False)],
    "step converted": [dict(type="StepLR", step_size=1, gamma=0.7, convert_to_iter_based=True)],
    "exponential window": [dict(type="ExponentialLR", gamma=0.8, by_epoch=False, begin=3, end=8)],
    "cosine T_max beyond end": [dict(type="CosineAnnealingLR", T_max=20, by_epoch=False, end=10)],
    "cosine restarts past its periods": [dict(type="CosineRestartLR", periods=[3], eta_min=0.01, by_epoch=False)],
    "one cycle explicit total_steps": [dict(type="OneCycleLR", eta_max=0.3, total_steps=15, by_epoch=False)],
    "three chained: warmup, cosine, step": [
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, end=3),
        dict(type="CosineAnnealingLR", eta_min=0.001, by_epoch=False, begin=3),
        dict(type="StepLR", step_size=2, gamma=0.9),
    ],
    "last_step of a later scheduler": [
        dict(type="PolyLR", eta_min=0.001, by_epoch=False, begin=2, end=9),
        dict(type="StepLR", step_size=1, last_step=1),
    ],
}
PARAM_CASES = {
    "momentum cosine (SGD)": ("SGD", ("momentum", None), [dict(type="CosineAnnealingMomentum", eta_min=0.5)]),
    "momentum linear (Adam beta1)": (
        "Adam",
        ("betas", 0),
        [dict(type="LinearMomentum", start_factor=0.5, by_epoch=False, end=8)],
    ),
    "momentum step (RMSprop)": ("RMSprop", ("momentum", None), [dict(type="StepMomentum", step_size=2)]),
    "weight decay, generic": (
        "SGD",
        ("weight_decay", None),
        [dict(type="LinearParamScheduler", param_name="weight_decay", start_factor=0.2)],
    ),
    "lr, generic exponential": (
        "AdamW",
        ("lr", None),
        [dict(type="ExponentialParamScheduler", param_name="lr", gamma=0.8, by_epoch=False)],
    ),
}
OPTIMIZERS = {
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
    "Adam": dict(lr=0.1),
    "AdamW": dict(lr=0.1, weight_decay=0.05),
    "RMSprop": dict(lr=0.1, momentum=0.9),
}


def mmengine_values(cfgs, optimizer: str, key, groups: int = 1, epoch_loop: bool = True) -> list[list[float]]:
    """MMEngine's value of ``key`` in each param group at each iteration, stepping the schedulers as its
    ParamSchedulerHook does (iteration-based ones after every iteration, epoch-based ones after every epoch)."""
    from mmengine.optim import OptimWrapper

    params = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 0.1 * (i + 1)} for i in range(groups)]
    opt = getattr(torch.optim, optimizer)(params, **OPTIMIZERS[optimizer])
    wrapper = OptimWrapper(opt)
    schedulers = []
    for cfg in cfgs:
        cfg = dict(cfg)
        max_epochs = MAX_EPOCHS if epoch_loop else 1  # MMEngine's IterBasedTrainLoop says 1
        default_end = max_epochs if cfg.get("by_epoch", True) else MAX_EPOCHS * EPOCH_LENGTH
        cfg.setdefault("end", default_end)  # as Runner.build_param_scheduler
        schedulers.append(
            mmengine_schedulers.build(cfg, default_args=dict(optimizer=wrapper, epoch_length=EPOCH_LENGTH))
        )
    values = [[] for _ in range(groups)]
    for iteration in range(MAX_EPOCHS * EPOCH_LENGTH):
        for column, group in zip(values, opt.param_groups):
            column.append(group[key[0]] if key[1] is None else group[key[0]][key[1]])
        for scheduler in schedulers:
            if not scheduler.by_epoch:
                scheduler.step()
        if epoch_loop and (iteration + 1) % EPOCH_LENGTH == 0:  # an iteration-based loop has no epoch ends
            for scheduler in schedulers:
                if scheduler.by_epoch:
                    scheduler.step()
    return values


def funceng_values(cfgs, optimizer: str, key, groups: int = 1, epoch_loop: bool = True) -> list[list[float]]:
    import inspect

    defaults = {
        k: p.default
        for k, p in inspect.signature(getattr(torch.optim, optimizer).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    hyper = [{**defaults, **OPTIMIZERS[optimizer], "lr": 0.1 * (i + 1)} for i in range(groups)]
    length = TrainLength(EPOCH_LENGTH, EPOCH_LENGTH * MAX_EPOCHS, MAX_EPOCHS if epoch_loop else 1, epoch_loop)
    tables = schedule_tables(cfgs, hyper, length)
    return [[tables.value(key, g, i) for i in range(length.max_iters)] for g in range(groups)]


@pytest.mark.parametrize("cfgs", list(SCHEDULER_CASES.values()), ids=list(SCHEDULER_CASES))
def test_lr_schedulers_give_mmengines_values_bit_for_bit(cfgs):
    for groups in (1, 2):  # a second group with another base lr: eta_min stays absolute
        assert funceng_values(cfgs, "SGD", ("lr", None), groups) == mmengine_values(cfgs, "SGD", ("lr", None), groups)


ITERATION_LOOP_CASES = {  # an IterBasedTrainLoop: iteration-based or converted schedulers
    name: cfgs
    for name, cfgs in SCHEDULER_CASES.items()
    if all(not c.get("by_epoch", True) or c.get("convert_to_iter_based") for c in cfgs)
}


@pytest.mark.parametrize("cfgs", list(ITERATION_LOOP_CASES.values()), ids=list(ITERATION_LOOP_CASES))
def test_lr_schedulers_in_an_iteration_based_loop_give_mmengines_values(cfgs):
    key = ("lr", None)
    try:
        expected = mmengine_values(cfgs, "SGD", key, epoch_loop=False)
    except ValueError as exc:  # e.g. end defaults to max_epochs = 1 epoch, before begin: MMEngine refuses too
        with pytest.raises(ConfigError, match="must be greater than begin"):
            funceng_values(cfgs, "SGD", key, epoch_loop=False)
        assert "end should be larger than begin" in str(exc)
        return
    assert funceng_values(cfgs, "SGD", key, epoch_loop=False) == expected


@pytest.mark.parametrize("optimizer, key, cfgs", list(PARAM_CASES.values()), ids=list(PARAM_CASES))
def test_momentum_and_generic_schedulers_give_mmengines_values_bit_for_bit(optimizer, key, cfgs):
    assert funceng_values(cfgs, optimizer, key) == mmengine_values(cfgs, optimizer, key)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(type="CosineAnnealingLR", by_epoch=True), "by_epoch=True in an iteration-based loop never steps"),
        (dict(type="LinearLR", by_epoch=False, convert_to_iter_based=True), "convert_to_iter_based needs by_epoch"),
        (dict(type="OneCycleLR", eta_max=1.0, total_steps=3, by_epoch=False), "total_steps is 3"),
        (dict(type="LinearMomentum", by_epoch=False), "needs an optimizer with 'momentum' or 'betas'"),
        (dict(type="StepParamScheduler", param_name="rho", step_size=1, by_epoch=False), "no hyperparameter 'rho'"),
        (dict(type="CosineAnnealingLR", by_epoch=False, T_maxx=3), "did you mean 'T_max'"),
    ],
)
def test_scheduler_configs_mmengine_cannot_run_are_refused_by_name(cfg, message):
    length = TrainLength(3, 12, 1, by_epoch=False)
    with pytest.raises(ConfigError, match=message):
        schedule_tables([cfg], [dict(lr=0.1, eps=1e-8)], length)


def _logged(work_dir: Path, key: str) -> list[float]:
    scalars = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    rows = [json.loads(line) for line in scalars.read_text().splitlines()]
    return [row[key] for row in rows if key in row and "loss" in row]


def _side_by_side(tmp_path, compile=False, n=12, **overrides):
    """The same regression run through both Runners: the lr logged at every iteration and the final weights."""
    results = {}
    for pkg in BOTH:
        work_dir = tmp_path / pkg
        kwargs = tutorials.regression_runner_kwargs(
            pkg, work_dir, val_dataloader=None, val_evaluator=None, val_cfg=None
        )
        kwargs["train_dataloader"] = dict(kwargs["train_dataloader"], dataset=tutorials.TensorData(n, 0))
        kwargs.update(overrides)
        if pkg == "funceng":
            kwargs["compile"] = compile
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        results[pkg] = {"weights": tutorials.weights(runner.model), "lr": _logged(work_dir, "lr")}
    return results["mmengine"], results["funceng"]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_runner_with_warmup_cosine_and_momentum_schedules_trains_like_mmengine(tmp_path, compile, fresh_dynamo):
    schedulers = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=4),
        dict(type="CosineAnnealingLR", eta_min=0.01, begin=1),  # end: max_epochs
        dict(type="CosineAnnealingMomentum", eta_min=0.5, by_epoch=False),
        dict(type="LinearParamScheduler", param_name="weight_decay", start_factor=0.5, by_epoch=False),
    ]
    optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=0.01))
    train_cfg = dict(by_epoch=True, max_epochs=3)
    mm, fe = _side_by_side(
        tmp_path, compile, param_scheduler=schedulers, optim_wrapper=optim_wrapper, train_cfg=train_cfg
    )
    assert len(fe["lr"]) == 9 and fe["lr"] == pytest.approx(mm["lr"], rel=1e-6)  # logged in float32
    assert_same(mm["weights"], fe["weights"])


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "NAdam", "RAdam", "Adamax"])
def test_adam_family_beta1_follows_a_momentum_scheduler_like_mmengine(tmp_path, optimizer):
    schedulers = [dict(type="LinearMomentum", start_factor=0.5, by_epoch=False), dict(type="PolyLR", eta_min=1e-3)]
    optim_wrapper = dict(optimizer=dict(type=optimizer, lr=0.01))
    mm, fe = _side_by_side(tmp_path, param_scheduler=schedulers, optim_wrapper=optim_wrapper)
    assert fe["lr"] == pytest.approx(mm["lr"], rel=1e-6)
    assert_same(mm["weights"], fe["weights"])


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_accumulation_applies_the_last_incomplete_window_and_logs_the_scheduled_lr_like_mmengine(
    tmp_path, compile, fresh_dynamo
):
    # 5 iterations per epoch, 2 epochs = 10 iterations; windows of 3: 3 + 3 + 3 and a last one of 1
    optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9), accumulative_counts=3)
    schedulers = [dict(type="LinearLR", start_factor=0.2, by_epoch=False)]
    mm, fe = _side_by_side(
        tmp_path,
        compile,
        n=20,
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        train_cfg=dict(by_epoch=True, max_epochs=2),
    )
    assert len(fe["lr"]) == 10 and fe["lr"] == pytest.approx(mm["lr"], rel=1e-6)  # every iteration's own lr
    assert_same(mm["weights"], fe["weights"])


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam"])
def test_every_torch_optimizer_in_a_config_trains_like_mmengine(tmp_path, optimizer):
    kwargs = {"Adagrad": dict(lr_decay=0.01), "RMSprop": dict(centered=True), "NAdam": dict(momentum_decay=0.01)}
    optim_wrapper = dict(optimizer=dict(type=optimizer, lr=0.01, **kwargs.get(optimizer, {})))
    mm, fe = _side_by_side(tmp_path, optim_wrapper=optim_wrapper)
    assert_same(mm["weights"], fe["weights"])


# MMEngine 0.10 registers no Adafactor or Muon, and torch's SparseAdam refuses a dense model's gradients
@pytest.mark.parametrize("optimizer", ["RAdam", "Rprop", "ASGD"])
def test_the_remaining_torch_optimizers_in_a_config_train_like_mmengine(tmp_path, optimizer):
    kwargs = {"RAdam": dict(decoupled_weight_decay=True, weight_decay=0.1), "ASGD": dict(t0=2)}
    optim_wrapper = dict(optimizer=dict(type=optimizer, lr=0.01, **kwargs.get(optimizer, {})))
    mm, fe = _side_by_side(tmp_path, optim_wrapper=optim_wrapper)
    assert_same(mm["weights"], fe["weights"])


def test_lbfgs_is_refused_naming_an_alternative(tmp_path):
    for optimizer, alternative in (("LBFGS", "closure.*use Adam or SGD"),):
        kwargs = tutorials.regression_runner_kwargs(
            "funceng", tmp_path / optimizer, optim_wrapper=dict(optimizer=dict(type=optimizer, lr=0.1))
        )
        with pytest.raises(ConfigError, match=alternative):
            runner_class("funceng")(**kwargs).train()


class ConvNet(nn.Module):
    """Every kind of parameter paramwise_cfg tells apart: conv, depth-wise conv (with bias), batch norm, layer norm,
    linears and a 1-D free parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        self.ln = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(3))
        self.backbone = nn.Sequential(nn.Linear(3, 3))

    def forward(self, x):
        return self.backbone(self.ln(self.head(self.bn(self.dw(self.conv(x))))) * self.scale)


PARAMWISE_CASES = {
    "bias lr and decay, norm decay": dict(bias_lr_mult=2.0, bias_decay_mult=0.5, norm_decay_mult=0.0),
    "depth-wise conv decay covers its bias": dict(dwconv_decay_mult=0.1),
    "flat decay covers norm weights and biases": dict(flat_decay_mult=0.3),
    "bias rule wins over flat and dwconv": dict(bias_decay_mult=0.0, dwconv_decay_mult=0.1, flat_decay_mult=0.3),
    "custom keys win, longest first": dict(
        custom_keys={"backbone": dict(lr_mult=0.1), "backbone.0": dict(decay_mult=0.0, lr_mult=0.5)},
        norm_decay_mult=0.0,
    ),
    "custom key extra hyperparameter": dict(custom_keys={"head": dict(momentum=0.5)}),
}


@pytest.mark.parametrize("paramwise", list(PARAMWISE_CASES.values()), ids=list(PARAMWISE_CASES))
def test_paramwise_rules_give_each_parameter_mmengines_lr_decay_and_options(paramwise):
    from mmengine.optim import DefaultOptimWrapperConstructor as MMConstructor

    from funceng.optim import DefaultOptimWrapperConstructor

    model = ConvNet()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for pkg, constructor in (("mmengine", MMConstructor), ("funceng", DefaultOptimWrapperConstructor)):
        cfg = dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-2))
        wrapper = constructor(cfg, paramwise)(model)
        seen[pkg] = {
            names[id(p)]: (g["lr"], g["weight_decay"], g["momentum"])
            for g in wrapper.optimizer.param_groups
            for p in g["params"]
        }
    assert seen["funceng"] == seen["mmengine"]


def test_a_parameter_shared_by_two_modules_needs_bypass_duplicate_like_mmengine():
    from mmengine.optim import DefaultOptimWrapperConstructor as MMConstructor

    from funceng.optim import DefaultOptimWrapperConstructor

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
            self.decoder = nn.Sequential(nn.LayerNorm(3), self.encoder[0])  # the same Linear, second place

    cfg = dict(optimizer=dict(type="SGD", lr=0.1, weight_decay=1e-2))
    paramwise = dict(norm_decay_mult=0.0, bias_lr_mult=2.0, custom_keys={"decoder": dict(lr_mult=0.5)})
    with pytest.raises(ValueError, match="appear in more than one parameter group"):
        MMConstructor(cfg, paramwise)(Tied())
    with pytest.raises(ConfigError, match="'encoder.0.weight' is shared with 'decoder.1.weight'.*bypass_duplicate"):
        DefaultOptimWrapperConstructor(cfg, paramwise)(Tied())
    model = Tied()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for pkg, constructor in (("mmengine", MMConstructor), ("funceng", DefaultOptimWrapperConstructor)):
        wrapper = constructor(cfg, {**paramwise, "bypass_duplicate": True})(model)
        seen[pkg] = {
            names[id(p)]: (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]
        }
    assert seen["funceng"] == seen["mmengine"]
    assert seen["funceng"]["encoder.0.weight"] == (0.1, 1e-2)  # the first module's rule, not the decoder's


def test_paramwise_decay_rules_without_an_explicit_weight_decay_are_refused_like_mmengine():
    from mmengine.optim import DefaultOptimWrapperConstructor as MMConstructor

    from funceng.optim import DefaultOptimWrapperConstructor

    cfg = dict(optimizer=dict(type="AdamW", lr=0.1))
    with pytest.raises(ValueError, match="base_wd should not be None"):
        MMConstructor(cfg, dict(norm_decay_mult=0.0))(ConvNet())
    with pytest.raises(ConfigError, match="norm_decay_mult needs the optimizer's weight_decay"):
        DefaultOptimWrapperConstructor(cfg, dict(norm_decay_mult=0.0))(ConvNet())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_paramwise_runner_with_cosine_eta_min_trains_every_group_like_mmengine(tmp_path, compile, fresh_dynamo):
    custom_keys = {"net.0": dict(lr_mult=0.5)}
    optim_wrapper = dict(
        optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=0.01),
        paramwise_cfg=dict(bias_lr_mult=2.0, bias_decay_mult=0.0, custom_keys=custom_keys),
    )
    schedulers = [dict(type="CosineAnnealingLR", eta_min=0.01, by_epoch=False)]  # absolute for every group
    mm, fe = _side_by_side(tmp_path, compile, optim_wrapper=optim_wrapper, param_scheduler=schedulers)
    assert_same(mm["weights"], fe["weights"])
    assert fe["lr"] == pytest.approx(mm["lr"], rel=1e-6)  # the first parameter's group, as MMEngine logs


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_reduce_on_plateau_lowers_the_lr_after_validation_like_mmengine(tmp_path, compile, fresh_dynamo):
    schedulers = [dict(type="ReduceOnPlateauLR", monitor="mse", patience=0, factor=0.5, rule="less")]
    results = {}
    for pkg in BOTH:
        work_dir = tmp_path / pkg
        kwargs = tutorials.regression_runner_kwargs(
            pkg,
            work_dir,
            param_scheduler=schedulers,
            train_cfg=dict(by_epoch=True, max_epochs=4, val_interval=1),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=2.0)),  # diverges: the metric gets worse
            **({"compile": compile} if pkg == "funceng" else {}),
        )
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        results[pkg] = {"weights": tutorials.weights(runner.model), "lr": _logged(work_dir, "lr")}
    assert results["funceng"]["lr"] == pytest.approx(results["mmengine"]["lr"], rel=1e-6)
    assert len(set(results["funceng"]["lr"])) > 1  # it did reduce
    # the run diverges on purpose (every validation is worse), which magnifies compiled rounding differences
    tolerance = 1e-3 if compile else 1e-5
    assert_same(results["mmengine"]["weights"], results["funceng"]["weights"], rtol=tolerance, atol=tolerance)


def test_a_schedule_written_into_the_state_never_recompiles_the_step(tmp_path, fresh_dynamo):
    from torch._dynamo.utils import counters

    schedulers = [dict(type="OneCycleLR", eta_max=0.2, by_epoch=False), dict(type="StepMomentum", step_size=2)]
    optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9))
    kwargs = tutorials.regression_runner_kwargs(
        "funceng", tmp_path, compile=True, param_scheduler=schedulers, optim_wrapper=optim_wrapper
    )
    kwargs.update(val_dataloader=None, val_evaluator=None, val_cfg=None)
    import_module("funceng.runner").Runner(**kwargs).train()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def _stop_after(epoch: int | None):
    """A hook that stops training after ``epoch`` epochs (never with ``None``), as a scheduler's job would."""
    from funceng.hooks import Hook

    class StopAfter(Hook):
        def after_train_epoch(self, runner):
            if epoch is not None and runner.epoch + 1 == epoch:
                runner.stop_training = True

    return StopAfter()


def _scheduled_accumulating_run(work_dir, stop_after_epoch=None, resume=False, compile=False):
    """4 epochs of 5 iterations, windows of 3 (the last one of 2), with lr, momentum and weight decay schedules."""
    kwargs = tutorials.regression_runner_kwargs(
        "funceng",
        work_dir,
        compile=compile,
        resume=resume,
        custom_hooks=[_stop_after(stop_after_epoch)],
        train_cfg=dict(by_epoch=True, max_epochs=4, val_interval=1),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9, weight_decay=0.01), accumulative_counts=3),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, end=6),
            dict(type="CosineAnnealingLR", eta_min=0.001, begin=1),
            dict(type="CosineAnnealingMomentum", eta_min=0.5, by_epoch=False),
            dict(type="StepParamScheduler", param_name="weight_decay", step_size=2, gamma=0.5),
        ],
    )
    kwargs["train_dataloader"] = dict(kwargs["train_dataloader"], dataset=tutorials.TensorData(20, 0))
    runner = runner_class("funceng")(**kwargs)
    runner.train()
    return tutorials.weights(runner.model)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_run_with_schedules_and_accumulation_stopped_and_resumed_ends_bitwise_equal(tmp_path, compile, fresh_dynamo):
    whole = _scheduled_accumulating_run(tmp_path / "whole", compile=compile)
    halfway = _scheduled_accumulating_run(tmp_path / "stopped", stop_after_epoch=2, compile=compile)  # 10 = 3*3+1
    assert len(_logged(tmp_path / "stopped", "lr")) == 10
    resumed = _scheduled_accumulating_run(tmp_path / "stopped", resume=True, compile=compile)
    assert len(_logged(tmp_path / "stopped", "lr")) == 10  # the resumed run trained epochs 3 and 4 only
    assert not torch.equal(halfway["net.0.weight"], resumed["net.0.weight"])
    assert_same(whole, resumed, rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_hooks_read_the_scheduled_lr_and_momentum_like_mmengine(tmp_path, optimizer):
    seen = {}
    for pkg in BOTH:
        Hook = import_module(f"{pkg}.hooks").Hook

        class Reader(Hook):
            calls: list = []  # noqa: RUF012 (a class attribute: hooks given as objects may be copied)

            def record(self, runner):
                wrapper = runner.optim_wrapper
                self.calls.append((wrapper.get_lr()["lr"][0], wrapper.get_momentum()["momentum"][0]))

            def before_train_iter(self, runner, batch_idx, data_batch=None):
                self.record(runner)

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                self.record(runner)

        kwargs = tutorials.regression_runner_kwargs(
            pkg,
            tmp_path / pkg,
            custom_hooks=[Reader()],
            optim_wrapper=dict(
                optimizer=dict(type=optimizer, lr=0.05, **({"momentum": 0.9} if optimizer == "SGD" else {}))
            ),
            param_scheduler=[
                dict(type="CosineAnnealingMomentum", eta_min=0.5, by_epoch=False),
                dict(type="LinearLR", start_factor=0.25, by_epoch=False, end=4),
            ],
        )
        runner_class(pkg)(**kwargs).train()
        seen[pkg] = Reader.calls
    assert len(seen["funceng"]) == 12
    assert seen["funceng"] == seen["mmengine"]  # the same floats: tables of MMEngine's own arithmetic


def test_optimizer_wrapper_objects_follow_schedules_like_mmengine(tmp_path):
    trained = {}
    for pkg in BOTH:
        torch.manual_seed(0)
        model = tutorials.regression_model(pkg)()
        sgd = torch.optim.SGD(
            [{"params": model.net[0].parameters()}, {"params": model.net[2].parameters(), "lr": 0.02}],
            lr=0.05,
            momentum=0.9,
            weight_decay=0.01,
        )
        wrapper = import_module(f"{pkg}.optim").OptimWrapper(optimizer=sgd, accumulative_counts=2)
        kwargs = tutorials.regression_runner_kwargs(
            pkg,
            tmp_path / pkg,
            model=model,
            optim_wrapper=wrapper,
            param_scheduler=[
                dict(type="CosineAnnealingLR", eta_min=0.005, by_epoch=False),
                dict(type="StepMomentum", step_size=1, gamma=0.9),
            ],
            train_cfg=dict(by_epoch=True, max_epochs=3, val_interval=1),  # 9 iterations: a last window of 1
        )
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        trained[pkg] = tutorials.weights(runner.model)
    assert_same(trained["mmengine"], trained["funceng"])


def _plateau_run(work_dir, stop_after_epoch=None, resume=False):
    kwargs = tutorials.regression_runner_kwargs(
        "funceng",
        work_dir,
        resume=resume,
        custom_hooks=[_stop_after(stop_after_epoch)],
        param_scheduler=[dict(type="ReduceOnPlateauLR", monitor="mse", patience=0, factor=0.5)],
        train_cfg=dict(by_epoch=True, max_epochs=4, val_interval=1),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=2.0)),  # diverges: every validation lowers the lr
    )
    runner = runner_class("funceng")(**kwargs)
    runner.train()
    return tutorials.weights(runner.model), runner


def test_a_resumed_run_runs_the_validation_its_checkpoint_preceded_so_plateau_state_continues_exactly(tmp_path):
    whole, _ = _plateau_run(tmp_path / "whole")
    _plateau_run(tmp_path / "stopped", stop_after_epoch=2)  # epoch_2 is written before epoch 2's validation
    resumed, runner = _plateau_run(tmp_path / "stopped", resume=True)
    assert_same(whole, resumed, rtol=0, atol=0)
    log = next(runner.log_dir.glob("*.log")).read_text()
    assert "Resumed at epoch 2: ran its validation, which the checkpoint preceded" in log


def test_an_iteration_based_runner_with_converted_and_iteration_schedules_trains_like_mmengine(tmp_path):
    schedulers = [
        dict(type="LinearLR", start_factor=0.2, by_epoch=False, end=3),
        dict(type="CosineAnnealingLR", eta_min=0.01, by_epoch=False, begin=3),  # end: max_iters
        dict(type="StepLR", step_size=1, gamma=0.8, convert_to_iter_based=True, end=2),  # epochs of 3 iterations
    ]
    mm, fe = _side_by_side(
        tmp_path,
        param_scheduler=schedulers,
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=10, val_interval=100),
        default_hooks=dict(
            logger=dict(type="LoggerHook", interval=1),
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=5),
        ),
        log_processor=dict(by_epoch=False),
    )
    assert len(fe["lr"]) == 10 and fe["lr"] == pytest.approx(mm["lr"], rel=1e-6)
    assert_same(mm["weights"], fe["weights"])


def _composed_run(work_dir, compile):
    kwargs = tutorials.regression_runner_kwargs(
        "funceng",
        work_dir,
        compile=compile,
        optim_wrapper=dict(
            type="AmpOptimWrapper",
            dtype="bfloat16",
            optimizer=dict(type="AdamW", lr=0.01, weight_decay=0.05),
            accumulative_counts=3,
            paramwise_cfg=dict(custom_keys={"net.0": dict(lr_mult=0.0)}, norm_decay_mult=0.0),
        ),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, end=4),
            dict(type="CosineAnnealingMomentum", eta_min=0.8, by_epoch=False),
            dict(type="ReduceOnPlateauParamScheduler", param_name="weight_decay", monitor="mse", patience=0),
        ],
        train_cfg=dict(by_epoch=True, max_epochs=3, val_interval=1),  # 9 iterations: windows 3, 3, 3
    )
    kwargs["train_dataloader"] = dict(kwargs["train_dataloader"], dataset=tutorials.TensorData(16, 0))  # 4 a pass
    runner = runner_class("funceng")(**kwargs)
    initial = tutorials.weights(runner.model)
    runner.train()
    return initial, tutorials.weights(runner.model), _logged(work_dir, "lr")


def test_schedules_compose_with_bf16_accumulation_freezing_and_a_plateau_eager_and_compiled(tmp_path, fresh_dynamo):
    initial, eager, eager_lr = _composed_run(tmp_path / "eager", compile=False)
    _, compiled, compiled_lr = _composed_run(tmp_path / "compiled", compile=True)
    for name in ("net.0.weight", "net.0.bias"):  # frozen by lr_mult=0: bit for bit, with AdamW's decay too
        assert torch.equal(eager[name], initial[name]) and torch.equal(compiled[name], initial[name])
    assert not torch.equal(eager["net.2.weight"], initial["net.2.weight"])
    assert len(eager_lr) == 12 and eager_lr == compiled_lr  # 12 iterations (4 a pass, 3 epochs), last window of 3
    assert_same(eager, compiled, rtol=1e-3, atol=1e-4)  # bfloat16 forward passes: compiled fuses differently


@pytest.mark.parametrize(
    "loss_scale, expected",
    [
        (512.0, [512.0] * 6),  # static: MMEngine resets GradScaler to it after every step
        (dict(init_scale=1024.0, growth_interval=2), [1024.0, 2048.0, 2048.0, 4096.0, 4096.0, 8192.0]),
    ],
)
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_amp_optim_wrapper_loss_scale_static_or_dict_is_applied(tmp_path, loss_scale, expected, compile, fresh_dynamo):
    kwargs = tutorials.regression_runner_kwargs(
        "funceng",
        tmp_path,
        compile=compile,
        val_dataloader=None,
        val_evaluator=None,
        val_cfg=None,
        optim_wrapper=dict(
            type="AmpOptimWrapper", dtype="float16", loss_scale=loss_scale, optimizer=dict(type="SGD", lr=0.01)
        ),
        log_processor=dict(window_size=1),  # each iteration's own value, not a window's mean
    )
    runner = runner_class("funceng")(**kwargs)
    runner.train()
    assert _logged(tmp_path, "loss_scale") == expected  # the scale after each iteration's update


def test_dynamic_intervals_change_when_validation_runs_like_mmengine(tmp_path):
    seen = {}
    for pkg in BOTH:
        Hook = import_module(f"{pkg}.hooks").Hook

        class ValCounter(Hook):
            epochs: list = []  # noqa: RUF012 (a class attribute: hooks given as objects may be copied)

            def after_val_epoch(self, runner, metrics=None):
                self.epochs.append(runner.epoch)

        kwargs = tutorials.regression_runner_kwargs(
            pkg,
            tmp_path / pkg,
            custom_hooks=[ValCounter()],
            train_cfg=dict(
                type="EpochBasedTrainLoop", max_epochs=9, val_interval=3, dynamic_intervals=[(4, 2), (7, 1)]
            ),
        )
        runner_class(pkg)(**kwargs).train()
        seen[pkg] = ValCounter.epochs
    # MMEngine switches interval when epochs done + 1 reaches a milestone: every 2 from epoch 3, every 1 from 6
    assert seen["mmengine"] == [4, 6, 7, 8, 9]
    assert seen["funceng"] == seen["mmengine"]


def test_a_batch_sampler_is_refused_by_name(tmp_path):
    kwargs = tutorials.regression_runner_kwargs("funceng", tmp_path)
    kwargs["train_dataloader"] = dict(kwargs["train_dataloader"], batch_sampler=dict(type="AspectRatioBatchSampler"))
    with pytest.raises(ConfigError, match="train_dataloader.batch_sampler is not supported: .*use sampler"):
        runner_class("funceng")(**kwargs)
