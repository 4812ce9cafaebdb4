"""The Runner training a population: train_cfg.population, logs, validation of every member, best member,
checkpoints that resume exactly, one curve per member."""

import json

import pytest
import torch
from safetensors.torch import load_file

from funceng import population
from funceng.errors import ConfigError
from funceng.plot import plot_run
from funceng.runner import Runner

from .runner_fixtures import runner_kwargs

SCHEDULE = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=5),
    dict(type="MultiStepLR", milestones=[1], by_epoch=True),
]


def population_kwargs(tmp_path, **overrides):
    train_cfg = dict(by_epoch=True, max_epochs=2, population=dict(seeds=[0, 1], grid=dict(lr=[0.01, 0.1])))
    kwargs = dict(
        train_cfg=train_cfg,
        param_scheduler=SCHEDULE,
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1, save_best="accuracy")),
    )
    return runner_kwargs(tmp_path, **{**kwargs, **overrides})


def scalars(runner):
    return [json.loads(line) for line in (runner.log_dir / "vis_data" / "scalars.json").read_text().splitlines()]


def test_a_population_run_logs_the_members_validates_each_and_keeps_the_best(tmp_path):
    with Runner(**population_kwargs(tmp_path)) as runner:
        runner.train()
        log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
        records = scalars(runner)
        metrics = runner.last_metrics
        best = metrics["best_member"]
        state = runner.state
        weights = load_file(runner.save_weights(tmp_path / "best.safetensors"))
        best_checkpoint = runner.checkpointer.directory / runner.checkpointer.best_path
    assert population.size(state) == 4 and state["step"].tolist() == [20] * 4
    assert "Training a population of 4 members" in log and "member 3 (seed=1, lr=0.1)" in log
    train_lines = [line for line in log.splitlines() if "Epoch(train)" in line]
    assert all("loss_min:" in line and "loss_max:" in line and "member_" not in line for line in train_lines)
    assert "Members' accuracy: 0:" in log and f"best_member: {best}" in log
    member_accuracies = [metrics[f"member_{i}/accuracy"] for i in range(4)]
    assert metrics["accuracy"] == max(member_accuracies) == member_accuracies[best]
    train_records = [r for r in records if "iter" in r]
    assert all(f"member_{i}/loss" in r for r in train_records for i in range(4))
    assert train_records[-1]["loss"] == pytest.approx(sum(train_records[-1][f"member_{i}/loss"] for i in range(4)) / 4)
    assert best_checkpoint.name.startswith("best_accuracy_epoch_") and (best_checkpoint / "manifest.json").exists()
    best_params = population.member(state, best)["params"]
    for name, tensor in best_params.items():
        assert torch.equal(weights[name], tensor)  # save_weights writes the best member
    # each member's learning rate: the schedule's value times member lr / configured lr (0.1)
    lrs = state["opt_state", "hyperparams", "lr"].tolist()
    assert lrs == pytest.approx([0.01 * 0.1, 0.1 * 0.1, 0.01 * 0.1, 0.1 * 0.1])


def test_a_population_checkpoint_resumes_bitwise_exact(tmp_path):
    with Runner(**population_kwargs(tmp_path / "straight")) as runner:
        runner.train()
        straight = runner.state.clone()
    first_half = population_kwargs(tmp_path / "halves")
    first_half["train_cfg"] = {**first_half["train_cfg"], "max_epochs": 1}
    with Runner(**first_half) as runner:
        runner.train()
    with Runner(**population_kwargs(tmp_path / "halves", resume=True)) as runner:
        runner.train()
        resumed = runner.state
    for (path, a), (_, b) in zip(straight.items(True, True), resumed.items(True, True), strict=True):
        assert torch.equal(a, b), path


def test_plot_draws_one_curve_per_member(tmp_path):
    with Runner(**population_kwargs(tmp_path)) as runner:
        runner.train()
    written = {p.name for p in plot_run(tmp_path / "work")}
    assert {"train_loss_members.png", "val_accuracy_members.png", "train_loss.png"} <= written
    assert "val_best_member.png" not in written


def test_members_and_per_member_lists_without_a_grid(tmp_path):
    kwargs = population_kwargs(
        tmp_path,
        train_cfg=dict(
            by_epoch=False,
            max_iters=4,
            val_interval=4,
            population=dict(members=3, momentum=[0, 0.5, 0.9], weight_decay=[0, 1e-4, 1e-3]),
        ),
        param_scheduler=None,
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
    )
    with Runner(**kwargs) as runner:
        runner.train()
        state = runner.state
    assert state["opt_state", "hyperparams", "momentum"].tolist() == pytest.approx([0.0, 0.5, 0.9])
    assert state["opt_state", "hyperparams", "lr"].tolist() == pytest.approx([0.1] * 3)
    # SGD's configured weight decay is 0, which no factor scales: the members' values are set as given
    assert state["opt_state", "hyperparams", "weight_decay"].tolist() == pytest.approx([0, 1e-4, 1e-3])
    assert population.size(state) == 3


@pytest.mark.parametrize(
    ("population_cfg", "message"),
    [
        (dict(seeds=[0, 1], lr=[0.1]), "has 1 values for 2 members"),
        (dict(seeds=[0, 1], grid=dict(lr=[0.1, 0.2]), lr=[0.1, 0.2]), "both in grid and as a per-member list"),
        (dict(), "give seeds=\\[...\\] or members=N"),
        (dict(members=2, lr="0.1"), "expected a list of numbers"),
        (dict(members=2, betas=[0.9, 0.8]), "'betas' cannot differ per member"),
    ],
)
def test_population_config_mistakes_are_named(tmp_path, population_cfg, message):
    kwargs = population_kwargs(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1, population=population_cfg))
    with pytest.raises(ConfigError, match=message):
        with Runner(**kwargs) as runner:
            runner.train()


def test_a_population_refuses_ema(tmp_path):
    kwargs = population_kwargs(tmp_path, custom_hooks=[dict(type="EMAHook")])
    with pytest.raises(ConfigError, match="EMAHook is not supported with a population"):
        with Runner(**kwargs) as runner:
            runner.train()


def test_a_compiled_population_run_trains_every_member(tmp_path, fresh_dynamo):
    kwargs = population_kwargs(tmp_path, compile=True)
    kwargs["train_cfg"] = {**kwargs["train_cfg"], "max_epochs": 1}
    with Runner(**kwargs) as runner:
        runner.train()
        state = runner.state
    assert state["step"].tolist() == [10] * 4
    assert torch.isfinite(state["params", "net.0.weight"]).all()
    assert not torch.equal(state["params", "net.0.weight"][0], state["params", "net.0.weight"][1])


def test_funceng_inspect_reads_a_population_checkpoint(tmp_path):
    import io

    from funceng.cli import inspect_checkpoint

    kwargs = population_kwargs(tmp_path)
    kwargs["train_cfg"] = {**kwargs["train_cfg"], "max_epochs": 1}
    with Runner(**kwargs) as runner:
        runner.train()
    out = io.StringIO()
    assert inspect_checkpoint(str(tmp_path / "work"), out) == 0
    assert "step: 10 (4 members)" in out.getvalue()
    assert "params/net.0.weight" in out.getvalue() and "(4, 16, 8)" in out.getvalue()


def test_a_later_run_of_the_same_name_logs_none_of_an_earlier_populations_scalars(tmp_path):
    # two runs started in the same second in different work_dirs share a name; they used to share a message hub,
    # and the second printed the first's loss_min and member_<i>/loss
    with Runner(**population_kwargs(tmp_path / "a", experiment_name="same")) as runner:
        runner.train()
    with Runner(**runner_kwargs(tmp_path / "b", experiment_name="same")) as runner:
        runner.train()
        log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    train_lines = [line for line in log.splitlines() if "Epoch(train)" in line]
    assert train_lines and not any("loss_min" in line or "member_" in line for line in train_lines)
