"""What a new user touches first: the demo, the CLI and config files, the progress bar, TensorBoard, plots."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from funceng.cli import main as cli
from funceng.config import apply_cfg_options, parse_value
from funceng.runner import ConfigError, Runner

from .runner_fixtures import runner_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "digits_config.py")


def test_demo_reaches_95_percent_on_real_digits_and_says_where_everything_is(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_cnn.py"), "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    accuracy = float(re.search(r"final validation accuracy: ([\d.]+)%", out).group(1))
    assert accuracy >= 95.0, out
    for label in ("log", "checkpoints", "plots"):
        path = re.search(rf"^{label}:\s+(\S+)", out, re.M).group(1)
        assert Path(path).exists(), (label, path)
    assert len(list(tmp_path.glob("*/plots/*.png"))) == 3
    assert list(tmp_path.glob("*/vis_data/events.out.tfevents.*"))


def test_cli_trains_tests_and_plots_from_a_config_file(tmp_path, capsys):
    work = tmp_path / "w"
    assert (
        cli(
            [
                "train",
                CONFIG,
                "--work-dir",
                str(work),
                "--cfg-options",
                "train_cfg.max_epochs=2",
                "default_hooks.checkpoint.interval=1",
                "param_scheduler=[]",
                "randomness.seed=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Epoch(val) [2][5/5]    accuracy:" in out and f"checkpoints: {work}" in out
    assert {"epoch_1", "epoch_2"} <= {p.name for p in work.iterdir()}
    assert cli(["test", CONFIG, "--work-dir", str(work), "--checkpoint", str(work / "epoch_2")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.rindex("\n{") + 1 :])  # the metrics are the closing JSON block
    assert 50.0 < metrics["accuracy"] <= 100.0
    assert cli(["plot", str(work)]) == 0
    pngs = capsys.readouterr().out.split()
    assert [Path(p).name for p in pngs] == ["train_loss.png", "lr.png", "val_accuracy.png"]


def test_cli_rejects_an_unknown_cfg_option_naming_the_key(tmp_path, capsys):
    code = cli(["train", CONFIG, "--work-dir", str(tmp_path), "--cfg-options", "train_cfg.max_epoch=2"])
    assert code == 2
    assert "unknown key 'train_cfg.max_epoch'" in capsys.readouterr().err


def test_cfg_options_override_a_top_level_variable_everywhere_it_is_used_and_the_run_records_it(tmp_path, capsys):
    import hashlib

    from funceng import checkpoint as ckpt

    work = tmp_path / "w"
    assert cli(["train", CONFIG, "--work-dir", str(work), "--cfg-options", "max_epochs=1", "randomness.seed=1"]) == 0
    assert "Epoch(train) [2]" not in capsys.readouterr().out  # train_cfg.max_epochs = max_epochs = 1
    (run,) = [p for p in work.iterdir() if (p / "vis_data").is_dir()]
    dumped = run / f"{run.name}.py"  # the resolved config, in the run's folder
    text = dumped.read_text()
    assert "max_epochs = 1" in text and "'end': 1" in text  # the cosine follows the variable too
    assert (work / "digits_config.py").read_text() == text  # and beside the runs, where MMEngine writes it
    meta = ckpt.read_meta(work / "epoch_1")
    assert meta["extra"]["config_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_cfg_options_name_the_closest_variable_and_refuse_a_dotted_variable(tmp_path, capsys):
    from funceng.config import split_variable_options

    assert cli(["train", CONFIG, "--work-dir", str(tmp_path), "--cfg-options", "max_epoch=1"]) == 2
    assert "unknown key 'max_epoch' (did you mean 'max_epochs'?)" in capsys.readouterr().err
    cfg = {"backbone": {"depth": 18}, "model": {}}
    assert split_variable_options(cfg, ["backbone={'depth': 50}", "model.x=1"], {"model"}) == (
        {"backbone": {"depth": 50}},
        ["model.x=1"],
    )
    with pytest.raises(ConfigError, match="override it whole"):
        split_variable_options(cfg, ["backbone.depth=50"], {"model"})


def test_cfg_options_parse_values_and_create_only_runner_arguments():
    cfg = {"a": {"b": 1}, "c": [1]}
    apply_cfg_options(cfg, ["a.b=2.5", "c=[1,2]", "a.b=true", "randomness.seed=7"], new_top_level={"randomness"})
    assert cfg == {"a": {"b": True}, "c": [1, 2], "randomness": {"seed": 7}}
    assert parse_value("None") is None and parse_value("SGD") == "SGD" and parse_value("(1, 2)") == (1, 2)
    with pytest.raises(ConfigError, match="unknown key 'typo'"):
        apply_cfg_options(cfg, ["typo=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_cfg_options(cfg, ["a.b"])


def test_progress_bar_replaces_iteration_lines_on_the_terminal_but_not_in_the_log(tmp_path, capsys):
    runner = Runner(
        **runner_kwargs(tmp_path, default_hooks=dict(logger=dict(interval=5, progress=True), checkpoint=None))
    )
    runner.train()
    captured = capsys.readouterr()
    assert "Epoch(train)" not in captured.out
    assert "Epoch(val) [2][3/3]    accuracy:" in captured.out  # epoch summaries still print
    assert re.search(r"Epoch 2/2: 100%.*10/10.*it/s.*loss=\d\.\d{4}.*lr=1\.00e-01", captured.out)  # one stream
    log = (runner.log_dir / f"{runner.timestamp}.log").read_text()
    assert log.count("Epoch(train)") == 4


def test_tensorboard_backend_writes_events_tensorboard_can_read(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = Runner(
        **runner_kwargs(
            tmp_path,
            default_hooks=dict(logger=dict(interval=5), checkpoint=None),
            visualizer=dict(vis_backends=[dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]),
        )
    )
    runner.train()
    runner.scalars.close()
    events = EventAccumulator(str(runner.log_dir / "vis_data"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "accuracy", "time", "data_time"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [5, 10, 15, 20]
    assert [e.step for e in events.Scalars("accuracy")] == [1, 2]
    local = [json.loads(line) for line in (runner.log_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in local if "loss" in r])


def test_unknown_vis_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend 'WandbBackend'"):
        Runner(**runner_kwargs(tmp_path, visualizer=dict(vis_backends=[dict(type="WandbBackend")])))
