"""Runner: MMEngine's arguments and behaviour over funceng's pure steps."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from funceng.evaluator import BaseMetric, Evaluator
from funceng.runner import ConfigError, EarlyStoppingHook, EMAHook, Hook, Runner

from .runner_fixtures import Accuracy, TinyNet, dataset, loaders, runner_kwargs


def test_runner_ends_with_the_weights_of_a_hand_written_torch_loop(tmp_path):
    """Same init, same data order, same optimizer and schedule: the same final weights (Lightning-style parity)."""
    model = TinyNet()
    reference = copy.deepcopy(model)
    order = torch.Generator().manual_seed(3)
    train = DataLoader(dataset(96), batch_size=16, shuffle=True, generator=order)
    runner = Runner(
        model=model,
        work_dir=tmp_path,
        train_dataloader=train,
        train_cfg=dict(by_epoch=True, max_epochs=3),
        optim_wrapper=dict(optimizer=dict(type=torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)),
        param_scheduler=dict(type="MultiStepLR", milestones=[2], gamma=0.1),
        randomness=dict(seed=0),
        default_hooks=dict(checkpoint=None),
    )
    runner.train()

    order.manual_seed(3)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    reference.train()
    for _ in range(3):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(reference.net(x), y).backward()
            opt.step()
        sched.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(runner.model.get_parameter(name).detach(), p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runner.state["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(runner.state["buffers"][name], b, rtol=1e-5, atol=1e-6)
    assert runner.state["step"].item() == 18 and runner.iter == 18 and runner.epoch == 3


def test_iteration_based_run_logs_iter_lines_and_saves_iter_checkpoints(tmp_path, capsys):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_cfg=dict(by_epoch=False, max_iters=25, val_interval=20),
            default_hooks=dict(logger=dict(interval=5), checkpoint=dict(interval=10, by_epoch=False)),
        )
    )
    runner.train()
    out = capsys.readouterr().out
    assert re.findall(r"Iter\(train\) \[(\s*\d+)/25\]  lr: 1\.0000e-01  eta: ", out) == [" 5", "10", "15", "20", "25"]
    assert "Saving checkpoint at 10 iterations" in out and "Saving checkpoint at 20 iterations" in out
    assert re.search(r"Iter\(val\) \[3/3\]    accuracy: \d+\.\d{4}", out)
    names = {p.name for p in (tmp_path / "work").iterdir()}
    assert {"iter_10", "iter_20", "iter_25", "last_checkpoint"} <= names
    assert runner.iter == 25


def test_epoch_lines_right_align_like_mmengine(tmp_path, capsys):
    train, val = loaders(n_train=16 * 12)
    Runner(
        **runner_kwargs(
            tmp_path,
            train_dataloader=train,
            train_cfg=dict(by_epoch=True, max_epochs=10),
            default_hooks=dict(checkpoint=None),
        )
    ).train()
    out = capsys.readouterr().out
    assert "Epoch(train)  [1][10/12]  lr: 1.0000e-01  eta: " in out
    assert "Epoch(train) [10][10/12]  lr: " in out
    assert "Epoch(val)  [1][3/3]    accuracy: " in out


def test_scheduler_lr_follows_mmengine_warmup_then_cosine(tmp_path):
    train, _ = loaders(n_train=16 * 10)
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_dataloader=train,
            val_dataloader=None,
            val_evaluator=None,
            train_cfg=dict(by_epoch=True, max_epochs=4),
            param_scheduler=[
                dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=5),
                dict(type="CosineAnnealingLR", by_epoch=True, begin=0, end=4, eta_min=0.01),
            ],
            default_hooks=dict(logger=dict(interval=1), checkpoint=None),
        )
    )
    runner.train()
    (log_dir,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir()]
    lrs = [json.loads(line)["lr"] for line in (log_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    assert len(lrs) == 40
    warm = [0.1 * (0.1 + 0.9 * min(i, 4) / 4) for i in range(5)]
    assert lrs[:5] == pytest.approx(warm)  # epoch 0: cosine factor 1
    for epoch in range(1, 4):
        cosine = 0.01 + (0.1 - 0.01) * (1 + torch.cos(torch.tensor(torch.pi * epoch / 4)).item()) / 2
        assert lrs[epoch * 10 : epoch * 10 + 10] == pytest.approx([cosine] * 10)


def test_paramwise_cfg_gives_biases_and_norms_their_own_decay_and_lr(tmp_path):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            optim_wrapper=dict(
                optimizer=dict(type="SGD", lr=0.1, weight_decay=0.5),
                paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.0, custom_keys={"net.4": dict(lr_mult=0.0)}),
            ),
            train_cfg=dict(by_epoch=True, max_epochs=1),
            val_dataloader=None,
            val_evaluator=None,
            default_hooks=dict(checkpoint=None),
        )
    )
    before = runner.model.net[4].weight.detach().clone()
    runner.train()
    groups = runner.state["opt_state"].keys()
    assert {"lr_mult=1.0,decay_mult=1.0", "lr_mult=1.0,decay_mult=0.0", "frozen"} == set(groups)
    assert torch.equal(runner.state["params"]["net.4.weight"], before)  # lr_mult 0 freezes the head


def test_amp_accumulation_and_clipping_options_run_and_log_grad_norm(tmp_path, capsys):
    Runner(
        **runner_kwargs(
            tmp_path,
            optim_wrapper=dict(
                type="AmpOptimWrapper",
                dtype="bfloat16",
                accumulative_counts=2,
                clip_grad=dict(max_norm=1.0),
                optimizer=dict(type="AdamW", lr=1e-3),
            ),
            default_hooks=dict(checkpoint=None),
        )
    ).train()
    out = capsys.readouterr().out
    assert re.search(r"Epoch\(train\) \[1\]\[10/10\]  lr: 1\.0000e-03 .* loss: \d+\.\d{4}  grad_norm: \d+\.\d{4}", out)


class RecordingHook(Hook):
    def __init__(self):
        self.calls = []

    def before_train(self, runner):
        self.calls.append("before_train")

    def before_train_epoch(self, runner):
        self.calls.append(f"before_train_epoch {runner.epoch}")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        assert set(outputs) >= {"loss", "lr"} and len(data_batch) == 2
        self.calls.append("iter")

    def after_val_epoch(self, runner, metrics=None):
        self.calls.append(f"after_val_epoch {sorted(metrics)}")

    def after_train(self, runner):
        self.calls.append("after_train")


def test_custom_hooks_see_every_stage_in_order(tmp_path):
    hook = RecordingHook()
    Runner(**runner_kwargs(tmp_path, custom_hooks=[hook], default_hooks=dict(checkpoint=None))).train()
    assert hook.calls == (
        ["before_train", "before_train_epoch 0"]
        + ["iter"] * 10
        + ["after_val_epoch ['accuracy']"]
        + ["before_train_epoch 1"]
        + ["iter"] * 10
        + ["after_val_epoch ['accuracy']", "after_train"]
    )


def test_ema_hook_keeps_the_average_in_the_state_and_validates_with_it(tmp_path):
    runner = Runner(
        **runner_kwargs(
            tmp_path, custom_hooks=[dict(type="EMAHook", momentum=0.5)], default_hooks=dict(checkpoint=None)
        )
    )
    runner.train()
    assert "ema" in runner.state.keys()
    ema, params = runner.state["ema"]["net.0.weight"], runner.state["params"]["net.0.weight"]
    assert not torch.equal(ema, params)
    runner.eval_params_key = "ema"
    with_ema = runner.val()["accuracy"]
    hook = next(h for h in runner.hooks if isinstance(h, EMAHook))
    hook.momentum = 1.0  # sanity: the EMA tracks the params exactly when momentum is 1
    hook.after_train_iter(runner, 0)
    assert torch.equal(runner.state["ema"]["net.0.weight"], params)
    assert 0.0 <= with_ema <= 100.0


def test_early_stopping_hook_stops_when_the_metric_stalls(tmp_path, capsys):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_cfg=dict(by_epoch=True, max_epochs=20),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.0)),  # nothing improves
            custom_hooks=[EarlyStoppingHook(monitor="accuracy", patience=2)],
            default_hooks=dict(checkpoint=None),
        )
    )
    runner.train()
    assert runner.epoch == 3
    assert "Early stopping: accuracy did not improve by 0.1 for 2 validations" in capsys.readouterr().out


def test_max_keep_ckpts_and_save_best(tmp_path):
    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_cfg=dict(by_epoch=True, max_epochs=3),
            default_hooks=dict(checkpoint=dict(interval=1, max_keep_ckpts=2, save_best="accuracy")),
        )
    )
    runner.train()
    names = {p.name for p in (tmp_path / "work").iterdir() if not p.name[0].isdigit()}
    best = [n for n in names if n.startswith("best_accuracy_epoch_")]
    assert {"epoch_2", "epoch_3", "last_checkpoint"} <= names and "epoch_1" not in names
    assert len(best) == 1


def test_load_from_loads_weights_and_resume_continues_counting(tmp_path):
    first = Runner(**runner_kwargs(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1)))
    first.train()
    trained = first.state["params"]["net.0.weight"].clone()
    loaded = Runner(**runner_kwargs(tmp_path, load_from=str(tmp_path / "work" / "epoch_1")))
    metrics = loaded.val()
    assert torch.equal(loaded.state["params"]["net.0.weight"], trained) and "accuracy" in metrics
    resumed = Runner(**runner_kwargs(tmp_path, resume=True, train_cfg=dict(by_epoch=True, max_epochs=2)))
    resumed.train()
    assert resumed.epoch == 2 and resumed.iter == 20 and resumed.state["step"].item() == 20


class NotADict(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.append(1)

    def compute_metrics(self, results):
        return 42.0


class WrongReturn(TinyNet):
    def forward(self, x, y, mode="tensor"):
        return self.net(x) if mode == "loss" else super().forward(x, y, mode)


class Exploding(TinyNet):
    def forward(self, x, y, mode="tensor"):
        out = super().forward(x, y, mode)
        return {"loss": out["loss"] * float("nan")} if mode == "loss" else out


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (
            dict(optim_wrapper=dict(optimizer=dict(type="SDG", lr=0.1))),
            ConfigError,
            r"optim_wrapper.optimizer.type: unknown optimizer 'SDG' \(did you mean 'SGD'\?\)",
        ),
        (
            dict(optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentun=0.9))),
            ConfigError,
            r"optim_wrapper.optimizer \(SGD\): unknown key 'momentun' \(did you mean 'momentum'\?\)",
        ),
        (dict(param_scheduler=dict(type="CosineLR")), ConfigError, r"param_scheduler\[0\].type: unknown scheduler"),
        (dict(train_cfg=dict(by_epoch=True)), ConfigError, r"train_cfg: by_epoch=True needs 'max_epochs'"),
        (dict(train_cfg=dict(by_epoch=False, max_epochs=2)), ConfigError, r"by_epoch=False needs 'max_iters'"),
        (
            dict(train_cfg=dict(max_epochs=2, val_intervel=1)),
            ConfigError,
            r"train_cfg: unknown key 'val_intervel' \(did you mean 'val_interval'\?\)",
        ),
        (dict(val_evaluator=None), ConfigError, r"val_dataloader is set but val_evaluator is missing"),
        (dict(default_hooks=dict(loger=dict(interval=5))), ConfigError, r"default_hooks: unknown key 'loger'"),
    ],
)
def test_bad_config_is_an_error_naming_the_key(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        Runner(**runner_kwargs(tmp_path, **overrides)).train()


def test_model_not_returning_a_loss_dict_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="scalar tensor, got shape"):
        Runner(**runner_kwargs(tmp_path, model=WrongReturn())).train()


def test_compute_metrics_not_returning_a_dict_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="NotADict.compute_metrics must return a dict"):
        Runner(**runner_kwargs(tmp_path, val_evaluator=dict(type=NotADict))).train()


def test_empty_train_dataloader_is_a_clear_error(tmp_path):
    empty = DataLoader(dataset(8), batch_size=16, drop_last=True)
    with pytest.raises(ConfigError, match="train_dataloader is empty"):
        Runner(**runner_kwargs(tmp_path, train_dataloader=empty)).train()


def test_non_finite_loss_stops_training_naming_the_iteration(tmp_path):
    with pytest.raises(FloatingPointError, match=r"the loss became nan at iteration 1 \(epoch 1, batch 1\)"):
        Runner(**runner_kwargs(tmp_path, model=Exploding())).train()


def test_work_dir_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is a file"):
        Runner(**runner_kwargs(tmp_path, work_dir=tmp_path / "file"))


class RunnerTestTopOne(Accuracy):
    """A metric whose class name no other module uses, so configs may name it as a string."""


def test_evaluator_rejects_duplicate_metric_names():
    evaluator = Evaluator([dict(type=RunnerTestTopOne), dict(type="RunnerTestTopOne")])
    evaluator.process(data_samples=(torch.eye(3), torch.arange(3)))
    with pytest.raises(ValueError, match="metric name 'accuracy' is produced by more than one metric"):
        evaluator.evaluate(3)
    prefixed = Evaluator([dict(type=Accuracy), dict(type=RunnerTestTopOne, prefix="other")])
    prefixed.process(data_samples=(torch.eye(3), torch.arange(3)))
    assert prefixed.evaluate(3) == {"accuracy": 100.0, "other/accuracy": 100.0}


def test_a_metric_name_defined_in_two_modules_is_ambiguous_not_picked():
    namespace = {"__name__": "another_module"}
    exec(
        "from funceng.evaluator import BaseMetric\n"
        "class RunnerTestTopOne(BaseMetric):\n"
        "    def process(self, data_batch, data_samples): pass\n"
        "    def compute_metrics(self, results): return {}\n",
        namespace,
    )
    with pytest.raises(
        ConfigError,
        match=r"metric name 'RunnerTestTopOne' is ambiguous: it names "
        r"tests.test_runner.RunnerTestTopOne, another_module.RunnerTestTopOne",
    ):
        Evaluator([dict(type="RunnerTestTopOne")])
    assert isinstance(Evaluator([dict(type=RunnerTestTopOne)]).metrics[0], RunnerTestTopOne)  # the class still works


def test_batches_of_every_shape_reach_the_device():
    from collections import namedtuple

    from funceng.runner.data import to_device

    Pair = namedtuple("Pair", "x y")
    meta = torch.device("meta")
    moved = to_device({"a": [torch.ones(1), (torch.ones(2), "tag")], "b": Pair(torch.ones(3), 4)}, meta)
    assert moved["a"][0].device == meta and moved["a"][1][0].device == meta and moved["a"][1][1] == "tag"
    assert isinstance(moved["b"], Pair) and moved["b"].x.device == meta and moved["b"].y == 4
