"""MMEngine's documented API on funceng: each tutorial (tests/mmengine_tutorials.py) runs through MMEngine and
through funceng, with only the package name changed, and gives the same results."""

from __future__ import annotations

import json
import logging
import os
from importlib import import_module
from pathlib import Path

import pytest
import torch

from funceng.errors import CheckpointError, ConfigError

from . import mmengine_tutorials as tutorials

pytest.importorskip("mmengine", reason="mmengine is a test dependency (pip install -e '.[dev]')")

BOTH = ("mmengine", "funceng")


def assert_same(a, b, path="", rtol=1e-6, atol=1e-6):
    """Equal structures; tensors and floats to a tolerance."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        torch.testing.assert_close(torch.as_tensor(b).to(torch.as_tensor(a).dtype), a, rtol=rtol, atol=atol, msg=path)
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=rtol, abs=atol), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", rtol, atol)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def runner_class(pkg):
    return import_module(f"{pkg}.runner").Runner


def last_val(work_dir: Path, key: str) -> float:
    scalars = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))[-1]
    return [json.loads(line)[key] for line in scalars.read_text().splitlines() if key in json.loads(line)][-1]


def test_registry_tutorial_builds_the_same_objects():
    mm, fe = (tutorials.registry_tutorial(pkg) for pkg in BOTH)
    assert (
        fe
        == mm
        == {
            "built": ("ReLU6", True, 3.0),
            "forced": "Sigmoid",
            "from_parent": "Sigmoid",
            "contains": True,
            "get_is_class": True,
        }
    )


def test_config_tutorial_inherits_merges_and_dumps_like_mmengine(tmp_path):
    mm, fe = (tutorials.config_tutorial(pkg, tmp_path / pkg) for pkg in BOTH)
    assert_same(mm, fe)
    assert fe["read"] == {"lr": 0.01, "momentum": 0.9, "norm": {"type": "GN", "num_groups": 4}}
    assert fe["merged"]["pipeline"][1] == {"type": "Resize", "scale": 64}
    assert fe["read"]["norm"] == {"type": "GN", "num_groups": 4}
    assert fe["merged"]["head"] == {"type": "Head", "norm": {"type": "BN", "eps": 1e-5}, "lr": 0.1}  # the base's
    assert fe["merged"]["work_dir"] == "./work_dirs/child"


def test_runner_tutorial_trains_logs_calls_hooks_and_validates_like_mmengine(tmp_path):
    schedulers = [
        dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=4),
        dict(type="MultiStepLR", milestones=[1], by_epoch=True),
    ]
    results = {}
    for pkg in BOTH:
        recorder = tutorials.hook_recorder(pkg)()
        work_dir = tmp_path / pkg
        kwargs = tutorials.regression_runner_kwargs(pkg, work_dir, custom_hooks=[recorder], param_scheduler=schedulers)
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        results[pkg] = {
            "weights": tutorials.weights(runner.model),
            "losses": tutorials.logged_losses(work_dir),  # each the mean of log_processor's window (10)
            "calls": recorder.calls,
            "val": runner.val(),
            "files": sorted(p.name for p in work_dir.iterdir() if p.is_file() and p.suffix != ".pth"),
        }
    mm, fe = results["mmengine"], results["funceng"]
    assert_same(mm["weights"], fe["weights"])
    assert_same(mm["losses"], fe["losses"])
    assert_same(mm["calls"], fe["calls"])  # mount points in order, with runner.epoch, runner.iter and get_lr()
    assert ("after_train_iter", 0, 2, pytest.approx(0.05 * 2.5 / 3)) in fe["calls"]
    assert_same(mm["val"], fe["val"])
    assert len(fe["files"]) == len(mm["files"]) == 2  # last_checkpoint and the dumped <timestamp>.py config
    assert fe["files"][1] == "last_checkpoint" and fe["files"][0].endswith(".py")


def test_runner_from_cfg_runs_a_config_file_like_mmengine(tmp_path):
    trained = {}
    for pkg in BOTH:
        registry = import_module(f"{pkg}.registry")
        registry.DATASETS.register_module(module=tutorials.TensorData, force=True)
        registry.MODELS.register_module(name="Regressor", module=tutorials.regression_model(pkg), force=True)
        path = tmp_path / pkg / "configs" / "regression_cfg.py"
        path.parent.mkdir(parents=True)
        path.write_text(
            "train_dataloader = dict(batch_size=4, dataset=dict(type='TensorData', n=12, seed=0),\n"
            "                        sampler=dict(type='DefaultSampler', shuffle=False))\n"
            "train_cfg = dict(by_epoch=True, max_epochs=2)\n"
            "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))\n"
            f"work_dir = {str(tmp_path / pkg)!r}\n"
            "randomness = dict(seed=0)\n"
            "model = dict(type='Regressor')\n"
        )
        cfg = import_module(f"{pkg}.config").Config.fromfile(path)
        cfg.experiment_name = f"{pkg}_from_cfg_{abs(hash(str(tmp_path)))}"
        torch.manual_seed(0)  # the model is built from the config before the Runner seeds
        runner = runner_class(pkg).from_cfg(cfg)
        runner.train()
        trained[pkg] = tutorials.weights(runner.model)
        assert (tmp_path / pkg / path.name).is_file()  # the config, dumped beside the runs
    assert_same(trained["mmengine"], trained["funceng"])


def test_optim_wrapper_tutorial_accumulates_clips_and_steps_like_mmengine():
    mm, fe = (tutorials.optim_wrapper_tutorial(pkg) for pkg in BOTH)
    assert_same(mm, fe, rtol=0, atol=0)


def test_gan_example_trains_like_mmengine(tmp_path):
    mm, fe = (tutorials.gan_example(pkg, tmp_path / pkg) for pkg in BOTH)
    assert_same(mm["losses"], fe["losses"])
    # a bias before BatchNorm has a true gradient of 0: Adam turns either implementation's rounding noise into steps
    # of about lr, and the running mean of the BatchNorm after it follows
    noisy = {"generator.model.0.bias", "generator.model.1.running_mean"}
    assert_same(*({k: v for k, v in run["weights"].items() if k not in noisy} for run in (mm, fe)))
    for key in noisy:
        torch.testing.assert_close(fe["weights"][key], mm["weights"][key], atol=1e-2, rtol=0)


def test_gan_example_resumed_after_an_epoch_ends_bitwise_equal(tmp_path):
    straight = tutorials.gan_example("funceng", tmp_path / "straight")
    tutorials.gan_example("funceng", tmp_path / "stopped", max_epochs=1)
    resumed = tutorials.gan_example("funceng", tmp_path / "stopped", max_epochs=2, resume=True)
    assert_same(straight["weights"], resumed["weights"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "ema",
    [
        dict(ema_type="ExponentialMovingAverage", momentum=0.3, begin_iter=2),
        dict(ema_type="MomentumAnnealingEMA", momentum=0.01, gamma=3, interval=2),
        dict(ema_type="StochasticWeightAverage", interval=2, begin_epoch=1),
    ],
    ids=lambda ema: ema["ema_type"],
)
def test_ema_hook_averages_and_validates_like_mmengine(tmp_path, ema):
    averaged, validated = {}, {}
    for pkg in BOTH:
        kwargs = tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, custom_hooks=[dict(type="EMAHook", **ema)])
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        validated[pkg] = last_val(tmp_path / pkg, "mse")  # validated during training, with the EMA weights
        if pkg == "mmengine":
            hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
            averaged[pkg] = {k: v.clone() for k, v in hook.ema_model.module.state_dict().items()}
        else:
            averaged[pkg] = {k: v.clone() for k, v in runner.state["ema"].items()}
            raw = runner.state["params"]["net.2.weight"]
    assert_same(averaged["mmengine"], averaged["funceng"])
    assert not torch.equal(averaged["funceng"]["net.2.weight"], raw)
    assert validated["funceng"] == pytest.approx(validated["mmengine"], rel=1e-6)


def test_mmengine_pth_checkpoints_load_without_running_code_and_convert_back(tmp_path):
    mm_runner = runner_class("mmengine")(**tutorials.regression_runner_kwargs("mmengine", tmp_path / "mm"))
    mm_runner.train()
    expected = mm_runner.val()
    kwargs = tutorials.regression_runner_kwargs(
        "funceng", tmp_path / "fe", load_from=str(tmp_path / "mm" / "epoch_2.pth")
    )
    kwargs.update(train_dataloader=None, train_cfg=None, optim_wrapper=None)
    runner = runner_class("funceng")(**kwargs)
    assert_same(expected, runner.val())
    log = (sorted((tmp_path / "fe").glob("*/*.log"))[-1]).read_text()
    assert "read the weights only; objects of" in log and "HistoryBuffer" in log  # what was not built, named

    from mmengine.runner import load_checkpoint

    from funceng.cli import main

    runner.save_checkpoint("weights")
    assert main(["convert", str(tmp_path / "fe" / "weights"), str(tmp_path / "converted.pth")]) == 0
    model = tutorials.regression_model("mmengine")()
    load_checkpoint(model, str(tmp_path / "converted.pth"))
    assert_same(tutorials.weights(mm_runner.model), tutorials.weights(model), rtol=0, atol=0)


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PLANTED_MARK'])}",))


def test_a_pth_file_with_a_planted_object_loads_its_weights_and_never_runs_it(tmp_path, monkeypatch):
    from funceng.mmengine_format import read_weights

    mark = tmp_path / "ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "meta": Planted()}, tmp_path / "planted.pth")
    skipped: list[str] = []
    weights = read_weights(tmp_path / "planted.pth", skipped)
    assert list(weights) == ["w"] and torch.equal(weights["w"], torch.ones(2))
    assert skipped == ["posix.system"] and not mark.exists()
    torch.save({"state_dict": {"w": Planted()}}, tmp_path / "no_weights.pth")
    with pytest.raises(CheckpointError, match="expected MMEngine's layout"):
        read_weights(tmp_path / "no_weights.pth")
    assert not mark.exists()


def test_checkpoint_hook_publishes_the_last_checkpoint_as_an_mmengine_pth(tmp_path):
    hooks = dict(checkpoint=dict(type="CheckpointHook", published_keys=["meta", "state_dict"], save_begin=2))
    runner = runner_class("funceng")(**tutorials.regression_runner_kwargs("funceng", tmp_path, default_hooks=hooks))
    runner.train()
    assert not (tmp_path / "epoch_1").exists() and (tmp_path / "epoch_2").is_dir()  # save_begin=2
    (published,) = tmp_path.glob("epoch_2-*.pth")
    content = torch.load(published, weights_only=True)
    assert sorted(content) == ["meta", "state_dict"] and content["meta"]["epoch"] == 2
    assert_same(tutorials.weights(runner.model), dict(content["state_dict"]), rtol=0, atol=0)


def test_offline_evaluate_gives_mmengine_metrics():
    mm, fe = (tutorials.offline_evaluation(pkg) for pkg in BOTH)
    assert_same(mm, fe)
    assert fe == {"mse": pytest.approx(sum((i - i % 3) ** 2 for i in range(7)) / 7)}


def test_dataset_collate_and_data_preprocessor_tutorials_give_mmengine_batches():
    mm, fe = (tutorials.data_tutorial(pkg) for pkg in BOTH)
    assert_same(mm, fe, rtol=0, atol=0)
    assert fe["metainfo"] == {"classes": ("cat", "dog"), "task": "renamed"} and fe["length"] == 4
    assert fe["inputs"].shape == (3, 3, 8, 8)  # stacked, padded to a multiple of 4


def test_base_dataset_reads_openmmlab_annotation_files_like_mmengine(tmp_path):
    mm, fe = (tutorials.annotation_file_tutorial(pkg, tmp_path / pkg) for pkg in BOTH)
    assert_same(
        {**mm, "items": [{k: v for k, v in i.items() if k != "img_path"} for i in mm["items"]]},
        {**fe, "items": [{k: v for k, v in i.items() if k != "img_path"} for i in fe["items"]]},
    )
    assert [Path(i["img_path"]).relative_to(tmp_path / "funceng") for i in fe["items"]][:2] == [
        Path("images/0.jpg"),
        Path("images/1.jpg"),
    ]
    assert fe["metainfo"] == {"classes": ["cat", "dog"], "version": "2.0"}
    assert fe["items"][3]["label"] == 10 and fe["items"][3]["sample_idx"] == 3


def test_scalars_added_to_the_message_hub_are_logged_like_mmengine(tmp_path):
    logged, info = {}, {}
    for pkg in BOTH:
        hook = tutorials.scalar_logger(pkg)()
        runner_class(pkg)(**tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, custom_hooks=[hook])).train()
        scalars = sorted((tmp_path / pkg).glob("*/vis_data/scalars.json"))[-1].read_text().splitlines()
        rows = [json.loads(line) for line in scalars if "double_loss" in line]
        logged[pkg] = [(row["double_loss"], row["iteration_seen"]) for row in rows]
        info[pkg] = hook.info
    assert_same(logged["mmengine"], logged["funceng"])
    assert [seen for _, seen in logged["funceng"]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the latest, not a mean
    assert info["funceng"] == info["mmengine"] == (5, 6)


def test_print_log_and_mmlogger_write_to_the_current_run_log(tmp_path):
    from funceng.logging import MMLogger, print_log

    runner = runner_class("funceng")(**tutorials.regression_runner_kwargs("funceng", tmp_path))
    print_log("a line from a script", logger="current")
    MMLogger.get_current_instance().warning("a warning from a hook")
    runner.close()
    log = sorted(tmp_path.glob("*/*.log"))[-1].read_text()
    assert "INFO - a line from a script" in log and "WARNING - a warning from a hook" in log
    own = MMLogger.get_instance("my_tool", log_file=str(tmp_path / "tool.log"), log_level="WARNING")
    print_log("not written", logger="my_tool")
    print_log("written", logger=own, level=logging.WARNING)
    assert (tmp_path / "tool.log").read_text() == "written\n"
    with pytest.raises(TypeError, match="distributed"):
        MMLogger.get_instance("my_tool", distributed=True)


def test_mmengine_options_funceng_does_not_apply_are_refused_not_ignored(tmp_path):
    from funceng.config import Config
    from funceng.runner import Runner

    (tmp_path / "cfg.py").write_text("a = 1\n")
    assert Config.fromfile(tmp_path / "cfg.py", lazy_import=False).a == 1
    for option in ("use_predefined_variables", "import_custom_modules", "use_environment_variables"):
        with pytest.raises(ConfigError, match=f"{option}=False"):
            Config.fromfile(tmp_path / "cfg.py", **{option: False})
    with pytest.raises(ConfigError, match="lazy_import=True"):
        Config.fromfile(tmp_path / "cfg.py", lazy_import=True)
    with pytest.raises(ConfigError, match="diff_rank_seed=True"):
        Runner.build_dataloader(dict(dataset=[1, 2], batch_size=1), diff_rank_seed=True)
    from funceng.logging import MessageHub

    with pytest.raises(TypeError, match="resumed_keys"):
        MessageHub.get_instance("hub", resumed_keys={})
    torch.manual_seed(0)
    model = tutorials.regression_model("funceng")()
    wrapper = import_module("funceng.optim").OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    runner = Runner(**tutorials.regression_runner_kwargs("funceng", tmp_path, model=model, optim_wrapper=wrapper))
    runner.train()
    with pytest.raises(TypeError, match=r"step\(closure=...\)"):
        runner.optim_wrapper.step(closure=lambda: None)


def test_hooks_run_in_mmengine_priority_order(tmp_path):
    orders = {}
    for pkg in BOTH:
        hooks = import_module(f"{pkg}.hooks")

        def named(name, priority, base=hooks.Hook):
            return type(name, (base,), {"priority": priority})()

        custom = [named("Low", "LOW"), named("Five", 5), named("High", "HIGH"), dict(type="EmptyCacheHook")]
        custom.append(dict(type="EMAHook", priority="VERY_HIGH"))
        runner = runner_class(pkg)(**tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, custom_hooks=custom))
        mine = {"Low", "Five", "High", "EmptyCacheHook", "EMAHook"}
        orders[pkg] = [type(h).__name__ for h in runner.hooks if type(h).__name__ in mine]
    assert orders["funceng"] == orders["mmengine"] == ["Five", "EMAHook", "High", "EmptyCacheHook", "Low"]


def test_a_save_best_metric_whose_name_does_not_tell_the_rule_needs_one_as_in_mmengine(tmp_path):
    for pkg in BOTH:
        hooks = dict(checkpoint=dict(type="CheckpointHook", interval=1, save_best="mse"))
        with pytest.raises((ConfigError, ValueError), match="rule"):
            runner_class(pkg)(**tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, default_hooks=hooks)).train()


def test_what_funceng_refuses_names_what_to_use_instead(tmp_path):
    from funceng.runner import FlexibleRunner, Runner

    with pytest.raises(ConfigError, match="use funceng.runner.Runner; for sharded training"):
        FlexibleRunner(model=None, work_dir=str(tmp_path))
    kwargs = tutorials.regression_runner_kwargs(
        "funceng", tmp_path, log_processor=dict(custom_cfg=[dict(data_src="loss")])
    )
    with pytest.raises(ConfigError, match="log_processor.custom_cfg=.* is not supported"):
        Runner(**kwargs)
    with pytest.raises(
        ConfigError, match="'param_schedular' is not a Runner argument .*did you mean 'param_scheduler'"
    ):
        Runner.from_cfg({**tutorials.regression_runner_kwargs("funceng", tmp_path / "c"), "param_schedular": []})
    own_variables = dict(train_pipeline=[], test_pipeline=[], data_root="data", dataset_type="X", val_pipeline=[])
    Runner.from_cfg({**tutorials.regression_runner_kwargs("funceng", tmp_path / "d"), **own_variables}).close()


def test_an_overridden_train_step_with_float16_loss_scaling_outside_the_state_is_refused(tmp_path):
    from funceng.optim import AmpOptimWrapper, OptimWrapper

    torch.manual_seed(0)
    model = tutorials.regression_model("funceng")()
    wrapper = AmpOptimWrapper(dtype="float16", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    runner = runner_class("funceng")(
        **tutorials.regression_runner_kwargs("funceng", tmp_path, model=model, optim_wrapper=wrapper)
    )
    with pytest.raises(ConfigError, match="AmpOptimWrapper\\(dtype='float16'\\) cannot train a funceng state"):
        runner.train()
    assert isinstance(wrapper, OptimWrapper)


def test_optimizer_wrapper_objects_train_eagerly_and_say_so_when_compile_is_asked(tmp_path):
    results = {}
    for pkg in BOTH:
        torch.manual_seed(0)
        model = tutorials.regression_model(pkg)()
        wrapper = import_module(f"{pkg}.optim").OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        extra = dict(compile=True) if pkg == "funceng" else {}
        kwargs = tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, model=model, optim_wrapper=wrapper, **extra)
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        results[pkg] = tutorials.weights(runner.model)
        if pkg == "funceng":
            assert runner.optim_wrapper.get_lr() == {"lr": [0.05]}
            with pytest.raises(TypeError, match="cannot be set on a funceng optimizer"):
                runner.optim_wrapper.param_groups[0]["lr"] = 1.0
            log = sorted((tmp_path / pkg).glob("*/*.log"))[-1].read_text()
            assert "train_step runs eagerly, as in MMEngine, because optim_wrapper is an object" in log
    assert_same(results["mmengine"], results["funceng"])


def test_a_custom_train_loop_from_the_loops_registry_runs(tmp_path):
    from funceng.registry import LOOPS
    from funceng.runner import EpochBasedTrainLoop, Runner

    @LOOPS.register_module(force=True)
    class CountingLoop(EpochBasedTrainLoop):
        epochs_seen: list = []

        def run_loop(self):
            super().run_loop()
            CountingLoop.epochs_seen.append(self.epoch)

    train_cfg = dict(type="CountingLoop", max_epochs=2)
    runner = Runner(**tutorials.regression_runner_kwargs("funceng", tmp_path, train_cfg=train_cfg))
    runner.train()
    assert type(runner.train_loop) is CountingLoop and CountingLoop.epochs_seen == [2]
    assert runner.state["step"].item() == 6
    with pytest.raises(ConfigError, match="train_cfg.type: Runner is not a train loop"):
        Runner(
            **tutorials.regression_runner_kwargs("funceng", tmp_path / "b", train_cfg=dict(type=Runner, max_epochs=1))
        )


def test_init_cfg_initialises_the_weights_like_mmengine():
    mm, fe = (tutorials.initialize_tutorial(pkg) for pkg in BOTH)
    assert_same(mm, fe, rtol=0, atol=0)
    assert torch.all(fe["block.inner.weight"] == 0.25)  # a child BaseModule applies its own init_cfg after


def test_the_runner_applies_init_cfg_when_training_starts_like_mmengine(tmp_path):
    trained = {}
    for pkg in BOTH:
        torch.manual_seed(0)
        model = tutorials.regression_model(pkg)(init_cfg=dict(type="Normal", layer="Linear", std=0.3, bias=0.2))
        zero_lr = dict(optimizer=dict(type="SGD", lr=0.0))
        kwargs = tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, model=model, optim_wrapper=zero_lr)
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        trained[pkg] = tutorials.weights(runner.model)
    assert_same(trained["mmengine"], trained["funceng"], rtol=0, atol=0)
    assert torch.all(trained["funceng"]["net.0.bias"] == 0.2)


@pytest.mark.parametrize(
    "hook_cfg",
    [
        None,
        dict(type="CheckpointHook", by_epoch=False, interval=4),
        dict(type="CheckpointHook", save_best="mse", rule="less"),
    ],
    ids=["default", "every-4-iterations", "given-without-interval"],
)
def test_checkpoint_hook_defaults_save_what_mmengine_saves(tmp_path, hook_cfg):
    saved = {}
    for pkg in BOTH:
        hooks = dict(checkpoint=hook_cfg) if hook_cfg else {}
        train_cfg = dict(by_epoch=False, max_iters=6, val_interval=3)
        kwargs = tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, train_cfg=train_cfg, default_hooks=hooks)
        runner_class(pkg)(**kwargs).train()
        names = (p.name.removesuffix(".pth") for p in (tmp_path / pkg).iterdir())
        saved[pkg] = sorted(n for n in names if n.startswith(("epoch_", "iter_", "best_")))
    assert saved["funceng"] == saved["mmengine"]
    expected = {None: ["epoch_1"], "every-4-iterations": ["iter_4", "iter_6"]}
    if hook_cfg is None or hook_cfg.get("interval"):
        assert saved["funceng"] == expected[None if hook_cfg is None else "every-4-iterations"]


def test_env_cfg_resource_limit_raises_the_open_files_limit(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(soft + 1, hard)
    try:
        env_cfg = dict(resource_limit=wanted)
        runner_class("funceng")(**tutorials.regression_runner_kwargs("funceng", tmp_path, env_cfg=env_cfg)).close()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_compile_true_in_a_config_compiles_the_train_step_and_trains_as_eagerly(tmp_path, fresh_dynamo):
    from funceng.config import Config
    from funceng.registry import DATASETS, MODELS
    from funceng.runner import Runner

    DATASETS.register_module(module=tutorials.TensorData, force=True)
    MODELS.register_module(name="Regressor", module=tutorials.regression_model("funceng"), force=True)
    trained = {}
    for compile in (False, True):
        (tmp_path / f"cfg_{compile}.py").write_text(
            "model = dict(type='Regressor')\n"
            "train_dataloader = dict(batch_size=4, dataset=dict(type='TensorData', n=12, seed=0),\n"
            "                        sampler=dict(type='DefaultSampler', shuffle=False))\n"
            "train_cfg = dict(by_epoch=True, max_epochs=1)\n"
            "optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))\n"
            f"work_dir = {str(tmp_path / str(compile))!r}\n"
            f"compile = {compile}\n"
        )
        torch.manual_seed(0)
        runner = Runner.from_cfg(Config.fromfile(tmp_path / f"cfg_{compile}.py"))
        runner.train()
        assert runner.train_step.compiled is compile and runner.state["step"].item() == 3
        trained[compile] = tutorials.weights(runner.model)
    assert_same(trained[False], trained[True])
    as_in_mmengine_docs = tutorials.regression_runner_kwargs("funceng", tmp_path / "cfg", cfg=dict(compile=True))
    assert Runner(**as_in_mmengine_docs).compile is True  # speed_up_training.md: Runner(..., cfg=dict(compile=True))


def test_a_custom_sampler_from_the_registry_gets_the_dataset_and_the_seed_like_mmengine(tmp_path):
    orders = {}
    for pkg in BOTH:
        registry = import_module(f"{pkg}.registry")

        class EveryOther(torch.utils.data.Sampler):
            def __init__(self, dataset, seed, offset=0):
                self.size, self.seed, self.offset = len(dataset), seed, offset

            def __iter__(self):
                return iter(range(self.offset, self.size, 2))

            def __len__(self):
                return len(range(self.offset, self.size, 2))

        registry.DATA_SAMPLERS.register_module(module=EveryOther, force=True)
        loader = dict(batch_size=2, dataset=tutorials.TensorData(8, 0), sampler=dict(type="EveryOther", offset=1))
        built = runner_class(pkg).build_dataloader(loader, seed=5)
        orders[pkg] = (list(built.sampler), built.sampler.seed)
    assert orders["funceng"] == orders["mmengine"] == ([1, 3, 5, 7], 5)


def test_torchvision_datasets_and_transforms_registered_and_named_in_a_config_load_like_mmengine(tmp_path, monkeypatch):
    import torchvision

    from .cifar import write_tiny_cifar10

    write_tiny_cifar10(tmp_path, per_train_batch=4, test_size=4)  # files made here: no checksums to match
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    mm, fe = (tutorials.torchvision_dataset_tutorial(pkg, tmp_path) for pkg in BOTH)
    assert_same(mm, fe, rtol=0, atol=0)
    assert fe["images"].shape == (4, 3, 32, 32) and fe["batches"] == 5


def test_cfg_activation_checkpointing_recomputes_and_trains_like_mmengine_and_needs_an_eager_step(tmp_path):
    def train(pkg, name, modules, compile=False):
        extra = dict(compile=compile) if pkg == "funceng" else {}
        cfg = dict(activation_checkpointing=modules) if modules else None
        runner = runner_class(pkg)(**tutorials.regression_runner_kwargs(pkg, tmp_path / name, cfg=cfg, **extra))
        runner.train()
        if modules:
            log = sorted((tmp_path / name).glob("*/*.log"))[-1].read_text()
            assert f'Enabling the "activation_checkpointing" feature for sub-modules: {modules}' in log
        return tutorials.weights(runner.model)

    # MMEngine's reentrant checkpoint needs an input that requires grad: net.2's does, net.0's (the data) does not
    assert_same(train("mmengine", "mm", ["net.2"]), train("funceng", "fe", ["net.2"]))
    plain = train("funceng", "plain", None)
    assert_same(plain, train("funceng", "eager", ["net.0", "net.2"]))  # non-reentrant: any submodule
    assert_same(plain, train("funceng", "auto", ["net.0", "net.2"], compile="auto"))
    compiled = tutorials.regression_runner_kwargs(
        "funceng", tmp_path / "compiled", cfg=dict(activation_checkpointing=["net.0"]), compile=True
    )
    with pytest.raises(ConfigError, match="activation_checkpointing needs an eager train step"):
        runner_class("funceng")(**compiled)
    bad = tutorials.regression_runner_kwargs("funceng", tmp_path / "bad", cfg=dict(activation_checkpointing=["net.9"]))
    with pytest.raises(ConfigError, match="no submodule 'net.9'"):
        runner_class("funceng")(**bad)


def test_the_hook_tutorials_check_invalid_loss_hook_runs_at_the_same_iterations(tmp_path):
    checked = {}
    for pkg in BOTH:
        hook_class = tutorials.check_invalid_loss_hook(pkg)
        hooks = [dict(type="CheckInvalidLossHook", interval=2)]
        runner_class(pkg)(**tutorials.regression_runner_kwargs(pkg, tmp_path / pkg, custom_hooks=hooks)).train()
        checked[pkg] = hook_class.checked
    assert checked["funceng"] == checked["mmengine"] == [(1, False), (3, False), (5, True)]


def test_model_train_step_and_val_step_by_hand_with_an_optim_wrapper_like_mmengine():
    mm, fe = (tutorials.model_steps_tutorial(pkg) for pkg in BOTH)
    assert_same(mm, fe, rtol=0, atol=0)
    assert sorted(fe["logs"][0]) == ["loss"]


def test_num_batch_per_epoch_trains_on_the_first_batches_like_mmengine(tmp_path):
    trained = {}
    for pkg in BOTH:
        kwargs = tutorials.regression_runner_kwargs(pkg, tmp_path / pkg)
        kwargs["train_dataloader"] = {**kwargs["train_dataloader"], "num_batch_per_epoch": 2}
        runner = runner_class(pkg)(**kwargs)
        runner.train()
        trained[pkg] = (tutorials.weights(runner.model), runner.iter)
    assert_same(trained["mmengine"], trained["funceng"])
    assert trained["funceng"][1] == 4  # 2 epochs of 2 batches


def _frozen_accumulating_run(pkg, work_dir, wrapper_type="OptimWrapper", max_epochs=2, resume=False, **wrapper_kw):
    """An overridable-step run with optimizer wrapper objects, a frozen first layer and accumulation over 3."""
    torch.manual_seed(0)
    model = tutorials.regression_model(pkg)()
    model.net[0].requires_grad_(False)
    initial = tutorials.weights(model)
    wrapper_class = getattr(import_module(f"{pkg}.optim"), wrapper_type)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    wrapper = wrapper_class(optimizer=sgd, accumulative_counts=3, **wrapper_kw)
    train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
    kwargs = tutorials.regression_runner_kwargs(
        pkg, work_dir, model=model, optim_wrapper=wrapper, train_cfg=train_cfg, resume=resume
    )
    runner = runner_class(pkg)(**kwargs)
    runner.train()
    return tutorials.weights(runner.model), initial


def test_wrapper_objects_compose_with_freezing_accumulation_and_resume_like_mmengine(tmp_path):
    (mm, mm_initial), (fe, fe_initial) = (_frozen_accumulating_run(pkg, tmp_path / pkg) for pkg in BOTH)
    assert_same(mm, fe)
    for name in ("net.0.weight", "net.0.bias"):  # frozen: bit for bit, weight decay and momentum included
        assert torch.equal(fe[name], fe_initial[name]) and torch.equal(mm[name], mm_initial[name])
    assert not torch.equal(fe["net.2.weight"], fe_initial["net.2.weight"])
    _frozen_accumulating_run("funceng", tmp_path / "stopped", max_epochs=1)  # 3 iterations: one whole window
    resumed, _ = _frozen_accumulating_run("funceng", tmp_path / "stopped", resume=True)
    assert_same(fe, resumed, rtol=0, atol=0)
    bf16, initial = _frozen_accumulating_run("funceng", tmp_path / "bf16", "AmpOptimWrapper", dtype="bfloat16")
    assert torch.equal(bf16["net.0.weight"], initial["net.0.weight"])
    assert not torch.equal(bf16["net.2.weight"], fe["net.2.weight"])  # the forward pass ran in bfloat16 ...
    assert_same(fe, bf16, rtol=0.1, atol=0.05)  # ... so it trains close to float32, not equal


def test_pseudo_collated_images_through_img_data_preprocessor_train_the_same_eager_and_compiled(tmp_path, fresh_dynamo):
    from funceng.model import BaseModel
    from funceng.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__(data_preprocessor=dict(type="ImgDataPreprocessor", mean=[127.5], std=[127.5]))
            self.fc = torch.nn.Linear(16, 2)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            out = self.fc(inputs.flatten(1))
            if mode == "loss":
                return dict(loss=torch.nn.functional.cross_entropy(out, torch.stack(data_samples)))
            return out

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 4, 4), generator=g, dtype=torch.uint8)
    samples = [dict(inputs=image, data_samples=torch.tensor(i % 2)) for i, image in enumerate(images)]
    trained = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = Net()
        initial = model.fc.weight.detach().clone()
        loader = dict(dataset=samples, batch_size=4, sampler=dict(type="DefaultSampler", shuffle=False))  # lists
        runner = Runner(
            model,
            work_dir=str(tmp_path / str(compile)),
            train_dataloader=loader,
            train_cfg=dict(by_epoch=True, max_epochs=2),
            optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
            compile=compile,
        )
        runner.train()
        assert runner.train_step.compiled is compile
        trained[compile] = tutorials.weights(runner.model)
    assert_same(trained[False], trained[True])
    assert not torch.equal(trained[True]["fc.weight"], initial)
