"""Experiment trackers as visualizer backends: MLflow (a real local file store) and W&B (offline mode, no
network) get every logged scalar by step, the resolved config as params, and the plots and best checkpoint's
manifest as artifacts; a missing package names the extra to install."""

import glob
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from funceng.errors import ConfigError, MissingExtraError
from funceng.runner import Runner
from tests.runner_fixtures import runner_kwargs


def tracked_run(tmp_path, backend: dict) -> Runner:
    kwargs = runner_kwargs(
        tmp_path,
        visualizer=dict(vis_backends=[dict(type="LocalVisBackend"), backend]),
        default_hooks=dict(logger=dict(interval=5), checkpoint=dict(interval=1, save_best="accuracy")),
    )
    with Runner(**kwargs) as runner:
        runner.train()
    return runner


def logged_scalars(runner: Runner) -> list[dict]:
    path = runner.log_dir / "vis_data" / "scalars.json"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mlflow_gets_metrics_by_step_the_resolved_config_and_the_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    runner = tracked_run(tmp_path, dict(type="MLflowVisBackend", tracking_uri=store, tags=dict(team="x")))
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("funceng").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == runner.timestamp and run.data.tags["team"] == "x"
    local = logged_scalars(runner)
    for key in ("loss", "accuracy"):
        expected = [(r["step"], r[key]) for r in local if key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [s for s, _ in expected] and len(expected) == (4 if key == "loss" else 2)
        assert [v for _, v in history] == pytest.approx([v for _, v in expected])
    params = run.data.params
    assert params["optim_wrapper.optimizer.lr"] == "0.1" and params["train_cfg.max_epochs"] == "2"
    assert params["optim_wrapper.optimizer.type"] == "SGD" and params["compile"] == "auto"
    artifacts = {a.path for folder in ("plots", "checkpoints") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/train_loss.png", "plots/val_accuracy.png", "plots/lr.png", "checkpoints/manifest.json"} <= artifacts
    best = runner.checkpointer.directory / runner.checkpointer.best_path / "manifest.json"
    fetched = client.download_artifacts(run.info.run_id, "checkpoints/manifest.json", str(tmp_path))
    assert open(fetched).read() == best.read_text()


def wandb_records(run_file: str):
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log of 32 KiB blocks after a 7-byte
    header), read without network or the W&B service."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def complete_wandb_records(run_file: str, timeout: float = 60.0) -> list:
    """The run file's records once W&B's service has written its exit record: its writer may still be flushing
    the file when ``run.finish()`` returns on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_gets_scalars_by_step_the_config_and_the_artifacts(tmp_path):
    runner = tracked_run(tmp_path, dict(type="WandbVisBackend", init_kwargs=dict(mode="offline", project="p")))
    [run_file] = glob.glob(str(runner.log_dir / "vis_data" / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = complete_wandb_records(run_file)
    kinds = [record.WhichOneof("record_type") for record in records]
    history, config, files = [], {}, set()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "files":
            files.update(f.path for f in record.files.files)
    local = logged_scalars(runner)
    for key, logged, axis in (("loss", "loss", "iter"), ("accuracy", "val/accuracy", "val_step")):
        assert [h[axis] for h in history if logged in h] == [r["step"] for r in local if key in r], (history, kinds)
        assert [h[logged] for h in history if logged in h] == pytest.approx([r[key] for r in local if key in r])
    assert config["optim_wrapper.optimizer.lr"] == 0.1 and config["train_cfg.max_epochs"] == 2
    run_files = {p.name for p in (Path(run_file).parent / "files").iterdir()}  # linked or copied by run.save
    assert {"train_loss.png", "val_accuracy.png", "manifest.json"} <= files & run_files, (files, run_files)


@pytest.mark.parametrize(("backend", "extra"), [("WandbVisBackend", "wandb"), ("MLflowVisBackend", "mlflow")])
def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, backend, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # import fails as if not installed
    kwargs = runner_kwargs(tmp_path, visualizer=dict(vis_backends=[dict(type=backend)]))
    with pytest.raises(
        MissingExtraError, match=rf"{backend} needs the '{extra}' package.*pip install 'funceng\[{extra}\]'"
    ):
        Runner(**kwargs)


def test_the_config_is_flattened_to_dotted_keys_lists_by_index():
    from funceng.runner.trackers import flatten_config

    cfg = dict(
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, betas=(0.9, 0.99))),
        param_scheduler=[dict(type="LinearLR", end=5), dict(type="CosineAnnealingLR", T_max=10)],
        model=dict(type=flatten_config),
        work_dir="w",
        dataset=object(),
    )
    assert flatten_config(cfg) == {
        "optim_wrapper.optimizer.type": "SGD",
        "optim_wrapper.optimizer.lr": 0.1,
        "optim_wrapper.optimizer.betas": "[0.9, 0.99]",
        "param_scheduler.0.type": "LinearLR",
        "param_scheduler.0.end": 5,
        "param_scheduler.1.type": "CosineAnnealingLR",
        "param_scheduler.1.T_max": 10,
        "model.type": "funceng.runner.trackers.flatten_config",
        "work_dir": "w",
        "dataset": "<object>",
    }


def test_mlflow_params_are_the_config_as_resolved_by_cfg_options(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from funceng.cli import main as cli

    config = Path(__file__).resolve().parents[1] / "examples" / "digits_config.py"
    store = (tmp_path / "store").as_uri()
    options = [
        "train_cfg.max_epochs=1",
        "optim_wrapper.optimizer.lr=0.05",
        f"visualizer.vis_backends=[{{'type': 'MLflowVisBackend', 'tracking_uri': '{store}'}}]",
    ]
    assert cli(["train", str(config), "--work-dir", str(tmp_path / "w"), "--cfg-options", *options]) == 0
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("funceng").experiment_id])
    assert run.data.params["optim_wrapper.optimizer.lr"] == "0.05" and run.data.params["train_cfg.max_epochs"] == "1"
    assert "loss" in run.data.metrics and "accuracy" in run.data.metrics
    assert "no plots among the artifacts: plots are drawn from vis_data/scalars.json" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"visualizer: expected a dict such as dict\(vis_backends=\[...\]\), got 'x'"):
        Runner(**runner_kwargs(tmp_path, visualizer="x"))


def test_without_matplotlib_the_trackers_get_the_manifest_and_the_log_names_the_extra(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    store = (tmp_path / "store").as_uri()
    tracked_run(tmp_path, dict(type="MLflowVisBackend", tracking_uri=store))
    assert "no plots among the artifacts: funceng plot needs the 'matplotlib' package" in capsys.readouterr().out
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("funceng").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["checkpoints"]
