"""The front end's house rules: the loop stops on a non-finite loss whatever the hooks, no non-finite state is
saved, MMEngine arguments are applied, refused or logged once, config keys are checked, hooks see checkpoints,
and a Runner closes what it opened."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from funceng import optim
from funceng.checkpoint import load_state, read_meta
from funceng.errors import ConfigError
from funceng.model import BaseModel
from funceng.registry import Registry
from funceng.runner import Hook, Runner
from funceng.runner.finite_check import NonFiniteCheck

from .runner_fixtures import TinyNet, dataset, runner_kwargs

ROOT = Path(__file__).resolve().parents[1]


def nan_in_third_batch() -> DataLoader:
    """160 samples in batches of 16, in order; one sample of the third batch is NaN."""
    data = dataset(160)
    data.tensors[0][40, 0] = float("nan")
    return DataLoader(data, batch_size=16, shuffle=False)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_non_finite_loss_stops_the_run_without_any_logger_hook(tmp_path, compile):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_dataloader=nan_in_third_batch(),
            compile=compile,
            default_hooks=dict(logger=None, checkpoint=None),
        )
    )
    with pytest.raises(
        FloatingPointError,
        match=r"the loss became nan at iteration 3 \(epoch 1, batch 3\); "
        r"training stopped",
    ):
        runner.train()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_lagged_loss_check_still_never_saves_a_non_finite_state(tmp_path, compile):
    """On CUDA the check trails the step by two iterations; the checkpointer reads the pending losses first."""
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_dataloader=nan_in_third_batch(),
            compile=compile,
            default_hooks=dict(checkpoint=dict(interval=1, by_epoch=False)),
        )
    )
    runner.train_loop.nonfinite_lag = 2
    with pytest.raises(FloatingPointError, match=r"the loss became nan at iteration 3 \(epoch 1, batch 3\)"):
        runner.train()
    assert sorted(p.name for p in (tmp_path / "work").glob("iter_*")) == ["iter_1", "iter_2"]
    assert Path((tmp_path / "work" / "last_checkpoint").read_text()).name == "iter_2"


def test_the_lagged_check_names_the_first_non_finite_iteration():
    check = NonFiniteCheck(lambda i: f"step {i}", lag=2)
    check.record(1, torch.tensor(1.0))
    check.record(2, torch.tensor(float("inf")))
    check.record(3, torch.tensor(float("nan")))  # iteration 1 is read now, and is fine
    with pytest.raises(FloatingPointError, match=r"the loss became inf at iteration 2 \(step 2\)"):
        check.check()
    assert not check.pending


def test_mmengine_compatibility_arguments_are_logged_once_per_process(tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests.runner_fixtures import runner_kwargs
from funceng.runner import Runner
from pathlib import Path
for i in range(2):
    Runner(**runner_kwargs(Path({str(tmp_path)!r}) / str(i), experiment_name="exp", default_scope="mmdet",
                           default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(log_metric_by_epoch=False)),
                           visualizer=dict(type="Visualizer", name="vis"))).close()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    for argument in (
        "Runner(default_scope)",
        "default_hooks.timer",
        "LoggerHook(log_metric_by_epoch)",
        "visualizer.type",
        "visualizer.name",
    ):
        assert out.count(f"WARNING - {argument} is accepted for MMEngine compatibility and ignored: ") == 1, argument


def test_config_typos_inside_components_name_the_key_and_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match=r"default_hooks.checkpoint: unknown key 'intervl' \(did you mean 'interval'"):
        Runner(**runner_kwargs(tmp_path, default_hooks=dict(checkpoint=dict(intervl=2))))
    with pytest.raises(ConfigError, match=r"val_cfg: unknown key 'fp61' \(did you mean 'fp16'\?\)"):
        Runner(**runner_kwargs(tmp_path, val_cfg=dict(fp61=True)))
    with pytest.raises(ConfigError, match=r"param_scheduler\[0\] \(StepLR\): .*missing 1 required .*'step_size'"):
        Runner(**runner_kwargs(tmp_path, param_scheduler=dict(type="StepLR"))).train()
    with pytest.raises(ConfigError, match=r"train_dataloader.collate_fn.type: unknown collate function 'stack'"):
        Runner(
            **runner_kwargs(
                tmp_path,
                train_dataloader=dict(dataset=[(torch.zeros(8), 0)], batch_size=1, collate_fn=dict(type="stack")),
            )
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            dict(train_cfg=dict(type="IterBasedTrainLoop", by_epoch=True, max_epochs=1)),
            r"type=IterBasedTrainLoop contradicts by_epoch=True",
        ),
        (dict(train_cfg=dict(type="ValLoop", max_epochs=1)), r"train_cfg.type: ValLoop is not a train loop"),
        (dict(train_cfg=dict(by_epoch=True, max_epochs=1, max_iters=5)), r"counts 'max_epochs'; remove 'max_iters'"),
        (
            dict(
                optim_wrapper=dict(
                    type="AmpOptimWrapper", loss_scale=dict(enabled=False), optimizer=dict(type="SGD", lr=0.1)
                )
            ),
            r"loss_scale.enabled=False: float16 without loss scaling underflows",
        ),
        (
            dict(optim_wrapper=dict(dtype="float16", optimizer=dict(type="SGD", lr=0.1))),
            r"'dtype' and 'loss_scale' need type='AmpOptimWrapper'",
        ),
        (
            dict(
                optim_wrapper=dict(
                    optimizer=dict(type="SGD", lr=0.1), clip_grad=dict(max_norm=1.0, error_if_nonfinite=True)
                )
            ),
            r"error_if_nonfinite=True is not supported",
        ),
        (dict(param_scheduler=dict(type="StepLR", step_size=1, last_step=3)), r"StepLR\): last_step=3: .*initial_lr"),
    ],
)
def test_options_funceng_cannot_honour_are_refused_not_ignored(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        Runner(**runner_kwargs(tmp_path, **overrides)).train()


def test_a_registry_refuses_a_second_object_under_a_taken_name():
    things = Registry("thing")

    @things.register(name="double")
    def double(x):
        return 2 * x

    things.register(double, name="double")  # the same object again is fine
    with pytest.raises(ConfigError, match=r"thing name 'double' is already registered for .*double"):
        things.register(lambda x: x + x, name="double")
    with pytest.raises(ConfigError, match=r"where: unknown thing 'doubel' \(did you mean 'double'\?\)"):
        things.get("doubel", "where")
    assert things.build({"type": "double", "x": 4}, "cfg") == 8


class Remembers(Hook):
    """Adds a note to every checkpoint's metadata and reads it back after a resume."""

    def __init__(self):
        self.loaded_note = None

    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint["note"] = f"saved at iteration {runner.iter}"

    def after_load_checkpoint(self, runner, checkpoint):
        self.loaded_note = checkpoint["note"]


def test_hooks_write_checkpoint_metadata_and_read_it_back_on_resume(tmp_path):
    Runner(**runner_kwargs(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1), custom_hooks=[Remembers()])).train()
    assert read_meta(tmp_path / "work" / "epoch_1")["extra"]["note"] == "saved at iteration 10"
    hook = Remembers()
    resumed = Runner(**runner_kwargs(tmp_path, resume=True, custom_hooks=[hook]))
    resumed.train()
    assert hook.loaded_note == "saved at iteration 10" and resumed.iter == 20


def test_checkpoint_out_dir_holds_the_checkpoints_and_resume_finds_them(tmp_path):
    out_dir = tmp_path / "elsewhere"
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_cfg=dict(by_epoch=True, max_epochs=1),
            default_hooks=dict(checkpoint=dict(interval=1, out_dir=str(out_dir))),
        )
    )
    runner.train()
    assert (out_dir / "work" / "epoch_1" / "manifest.json").exists()
    assert not (tmp_path / "work" / "epoch_1").exists()
    assert Path((tmp_path / "work" / "last_checkpoint").read_text()) == out_dir / "work" / "epoch_1"
    (tmp_path / "work" / "last_checkpoint").unlink()  # the fallback scan must look in out_dir too
    resumed = Runner(
        **runner_kwargs(tmp_path, resume=True, default_hooks=dict(checkpoint=dict(interval=1, out_dir=str(out_dir))))
    )
    resumed.train()
    assert resumed.iter == 20 and (out_dir / "work" / "epoch_2").exists()


class Scale(nn.Module):
    """A data preprocessor: multiplies the inputs by a buffer and records whether it ran in training mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("factor", torch.tensor(2.0))
        self.modes = []

    def forward(self, batch, training):
        self.modes.append(training)
        x, y = batch
        return x * self.factor, y


class Linear(BaseModel):
    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, y, mode="tensor"):
        out = self.fc(x)
        return {"loss": F.cross_entropy(out, y)} if mode == "loss" else (out, y)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_data_preprocessor_runs_on_every_batch_before_forward(compile):
    import funceng

    torch.manual_seed(0)
    with_pre, plain = Linear(Scale()), Linear()
    plain.load_state_dict(with_pre.state_dict(), strict=False)
    tx = optim.sgd(0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    state, reference = funceng.TrainState.create(with_pre, tx), funceng.TrainState.create(plain, tx)
    state, metrics = funceng.make_train_step(with_pre, tx, compile=compile)(state, (x, y))
    reference, expected = funceng.make_train_step(plain, tx, compile=False)(reference, (2 * x, y))
    torch.testing.assert_close(metrics["loss"], expected["loss"])
    torch.testing.assert_close(state["params"]["fc.weight"], reference["params"]["fc.weight"])
    outputs, _ = funceng.make_eval_step(with_pre, compile=compile)(state, (x, y))
    torch.testing.assert_close(outputs, 2 * x @ state["params"]["fc.weight"].T + state["params"]["fc.bias"])
    if not compile:  # traced once when compiled; eagerly, every call is seen
        assert with_pre.data_preprocessor.modes == [True, False]
    from funceng.model import ImgDataPreprocessor

    assert isinstance(Linear(data_preprocessor=dict(type="ImgDataPreprocessor")).data_preprocessor, ImgDataPreprocessor)
    with pytest.raises(ConfigError, match="data_preprocessor: expected an nn.Module .* or a config dict, got int"):
        Linear(data_preprocessor=42)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_val_cfg_fp16_evaluates_under_float16_autocast(tmp_path, compile):
    from .runner_fixtures import Accuracy

    class OutputDtype(Accuracy):
        def process(self, data_batch, data_samples):
            self.results.append({"n": 1, "correct": int(data_samples[0].dtype == torch.float16)})

    runner = Runner(
        **runner_kwargs(tmp_path, val_cfg=dict(fp16=True), val_evaluator=dict(type=OutputDtype), compile=compile)
    )
    assert runner.val() == {"accuracy": 100.0}  # every batch's scores came out in float16
    plain = Runner(**runner_kwargs(tmp_path, val_evaluator=dict(type=OutputDtype), compile=compile))
    assert plain.val() == {"accuracy": 0.0}


def test_a_runner_used_as_a_context_manager_closes_its_log_and_scalars(tmp_path):
    with Runner(**runner_kwargs(tmp_path, default_hooks=dict(checkpoint=None))) as runner:
        runner.train()
        assert runner.logger.handlers
    assert runner.logger.handlers == []
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert "Epoch(val) [2][3/3]" in log
    lines = (runner.log_dir / "vis_data" / "scalars.json").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines][-1] == 2


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_an_fp16_step_skipped_for_a_non_finite_loss_is_logged_with_the_loss_scale_not_an_error(
    tmp_path, compile, capsys
):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_dataloader=nan_in_third_batch(),
            compile=compile,
            optim_wrapper=dict(type="AmpOptimWrapper", dtype="float16", optimizer=dict(type="SGD", lr=0.1)),
            train_cfg=dict(by_epoch=True, max_epochs=1),
            default_hooks=dict(checkpoint=dict(interval=1, by_epoch=False)),
        )
    )
    runner.train()
    out = capsys.readouterr().out
    assert "The loss was nan at iteration 3 (epoch 1, batch 3) under fp16: the optimizer step was skipped" in out
    assert "the loss scale is now 32768" in out
    third = load_state(tmp_path / "work" / "iter_3")[0]
    second = load_state(tmp_path / "work" / "iter_2")[0]
    assert (third["params"] == second["params"]).all()  # the skipped step left the weights as they were
    assert all(torch.isfinite(p).all() for p in third["params"].values())
    assert runner.iter == 10


class SpareParameterNet(TinyNet):
    """TinyNet with a parameter its loss does not use: only the parameter check can see it go bad."""

    def __init__(self):
        super().__init__()
        self.spare = torch.nn.Parameter(torch.zeros(2))


class CorruptSpareAfter(Hook):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            runner.state["params"]["spare"].fill_(float("inf"))


@pytest.mark.parametrize("checked", [False, True], ids=["save-check", "check_finite_params"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_non_finite_parameter_is_never_saved_and_the_error_names_the_iteration_and_tensor(tmp_path, compile, checked):
    torch.manual_seed(0)
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            model=SpareParameterNet(),
            compile=compile,
            checkpoint=dict(check_finite_params=checked),
            custom_hooks=[CorruptSpareAfter(3)],
            default_hooks=dict(checkpoint=dict(interval=1, by_epoch=False)),
        )
    )
    message = r"params/spare holds NaN or infinite values after iteration 3 \(epoch 1, batch 3\): checkpoint iter_3"
    with pytest.raises(FloatingPointError, match=message):
        runner.train()
    assert sorted(p.name for p in (tmp_path / "work").glob("iter_*")) == ["iter_1", "iter_2"]
    assert Path((tmp_path / "work" / "last_checkpoint").read_text()).name == "iter_2"


def test_check_finite_params_names_the_iteration_a_parameter_went_bad_without_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            model=SpareParameterNet(),
            checkpoint=dict(check_finite_params=True),
            custom_hooks=[CorruptSpareAfter(3)],
            default_hooks=dict(checkpoint=None),
        )
    )
    with pytest.raises(
        FloatingPointError, match=r"a parameter became NaN or infinite at iteration 4 \(epoch 1, batch 4\)"
    ):
        runner.train()
    torch.manual_seed(0)
    unchecked = Runner(
        **runner_kwargs(
            tmp_path / "b",
            model=SpareParameterNet(),
            custom_hooks=[CorruptSpareAfter(3)],
            default_hooks=dict(checkpoint=None),
        )
    )
    unchecked.train()  # the loss never sees the spare parameter: without the check, nothing stops
    assert torch.isinf(unchecked.state["params"]["spare"]).all()
