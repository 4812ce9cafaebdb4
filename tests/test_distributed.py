"""Data-parallel training on CPU with gloo, launched by torchrun like a user would (see tests/dist_worker.py).

Tolerance: 2 ranks with batch B/2 sum the same float32 per-sample gradients as 1 rank with batch B, in another
order, so weights after 12 steps agree to within 1e-5 absolute (measured: about 1e-7), not bitwise.
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from funceng.checkpoint import CheckpointError, load_state
from funceng.cli import inspect_checkpoint
from funceng.tree import flatten
from tests.cifar import write_tiny_cifar10
from tests.dist_worker import GLOBAL_BATCH, TIMEOUT_S, build_runner

WORKER = Path(__file__).with_name("dist_worker.py")
ATOL = 1e-5


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    return result


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}


def ranks(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def params(checkpoint: Path) -> list[torch.Tensor]:
    return flatten(load_state(checkpoint)[0]["params"])[1]


def assert_close(a: Path, b: Path) -> float:
    diff = max((x - y).abs().max().item() for x, y in zip(params(a), params(b), strict=True))
    assert diff < ATOL, f"{a} and {b} differ by {diff}"
    return diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One rank with batch 16, and two ranks with batch 8 each, trained on the same data for 12 steps."""
    root = tmp_path_factory.mktemp("dist")
    single = build_runner(root / "single" / "work", GLOBAL_BATCH)
    single.train()
    single_metrics = single.test()
    result = torchrun(2, "runner", str(root / "two"), "--batch-size", str(GLOBAL_BATCH // 2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, single_metrics, result


def test_two_ranks_with_half_batches_end_with_the_weights_of_one_rank_with_the_full_batch(runs):
    root, _, _ = runs
    two = ranks(root / "two", 2)
    assert two[0]["digest"] == two[1]["digest"], "ranks ended with different states"
    assert two[0]["world_size"] == 2 and two[0]["iter"] == 12
    assert two[0]["lr"] == 0.05  # auto_scale_lr: 0.05 * (2 ranks * 8) / 8, halved by the schedule at epoch 1
    assert_close(root / "single" / "work" / "iter_12", root / "two" / "work" / "iter_12")


def test_distributed_metrics_equal_single_process_metrics_on_the_same_weights(runs, tmp_path):
    root, _, _ = runs
    two = ranks(root / "two", 2)
    assert two[0]["metrics"] == two[1]["metrics"]
    assert two[0]["metrics"]["samples/count"] == 45  # no sample of the 45 is counted twice or dropped
    evaluate = build_runner(
        tmp_path / "eval",
        GLOBAL_BATCH,
        load_from=str(root / "two" / "work" / "iter_12"),
        train_dataloader=None,
        optim_wrapper=None,
        train_cfg=None,
        param_scheduler=None,
    )
    assert evaluate.test() == two[0]["metrics"]


def test_only_rank_zero_logs_and_writes_checkpoints(runs):
    root, _, result = runs
    work = root / "two" / "work"
    assert sorted(p.name for p in work.iterdir() if not p.name[0].isdigit()) == ["iter_12", "iter_9", "last_checkpoint"]
    (log_dir,) = [p for p in work.iterdir() if p.name[0].isdigit() and p.is_dir()]
    assert [p.name for p in work.iterdir() if p.suffix == ".py"] == [f"{log_dir.name}.py"]  # the config, by rank 0
    log = (log_dir / f"{log_dir.name}.log").read_text()
    assert "World size: 2" in log and "Epoch(train) [2][6/6]" in log
    assert result.stdout.count("Epoch(train) [2][6/6]") == 1  # printed by rank 0 only


def test_checkpoint_from_two_ranks_resumes_on_one_rank(runs, tmp_path):
    root, _, _ = runs
    saved = root / "two" / "work" / "iter_9"
    runner = build_runner(tmp_path / "work", GLOBAL_BATCH, resume_from=str(saved))
    runner.load_or_resume()
    loaded = load_state(saved)[0]
    for a, b in zip(flatten(runner.state)[1], flatten(loaded)[1], strict=True):
        assert torch.equal(a, b)
    runner.train()  # a fresh runner: train() builds and resumes itself
    assert runner.iter == 12
    assert_close(tmp_path / "work" / "iter_12", root / "single" / "work" / "iter_12")


def test_checkpoint_from_one_rank_resumes_on_two_ranks(runs, tmp_path):
    root, single_metrics, _ = runs
    result = torchrun(
        2,
        "runner",
        str(tmp_path),
        "--batch-size",
        str(GLOBAL_BATCH // 2),
        "--resume-from",
        str(root / "single" / "work" / "iter_9"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Resuming a 1-rank run on 2 rank(s) at sample 48 of the epoch" in result.stdout
    assert ranks(tmp_path, 2)[0]["iter"] == 12
    assert_close(tmp_path / "work" / "iter_12", root / "single" / "work" / "iter_12")


def test_compiled_step_averages_gradients_in_one_graph_and_fp16_overflow_skips_on_every_rank(tmp_path):
    result = torchrun(2, "step", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = ranks(tmp_path, 2)
    assert two[0]["digest"] == two[1]["digest"]
    for record in two:
        assert record["max_param_diff"] < ATOL and record["loss_diff"] < ATOL
        assert record["graphs"] == 1 and record["graph_breaks"] == 0
        assert record["fp16_shard_finite"] is False and record["fp16_scale_after_overflow"] == 512.0


def start_two_ranks_by_hand(scenario: str, tmp_path: Path, port: int) -> list[subprocess.Popen]:
    """Two ranks of ``scenario`` started with torchrun's environment but no launcher, which would stop the
    survivor for us."""
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(tmp_path)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]


def test_a_rank_that_dies_makes_the_others_fail_with_a_clear_error(tmp_path):
    start = time.monotonic()
    procs = start_two_ranks_by_hand("die", tmp_path, 29400 + os.getpid() % 500)
    outputs = [p.communicate(timeout=TIMEOUT_S + 60) for p in procs]
    elapsed = time.monotonic() - start
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    assert elapsed < TIMEOUT_S + 30
    failure = "DistributedError: rank 0: a collective failed during the train step at iteration 4 (epoch 1, batch 4)"
    assert failure in outputs[0][1]
    assert "rank 1 did not reach it (stopped, hung or dead)" in outputs[0][1]


def test_a_stopped_rank_makes_the_others_fail_naming_it_and_the_collective_within_the_timeout(tmp_path):
    """A rank that hangs (SIGSTOP: alive, its connections open) is named, within the configured timeout."""
    start = time.monotonic()
    procs = start_two_ranks_by_hand("hang", tmp_path, 29900 + os.getpid() % 90)
    try:
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - start
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert elapsed < TIMEOUT_S + 20, elapsed
    assert "DistributedError: rank 0: a collective failed during the train step at iteration 4" in err, err[-3000:]
    assert "rank 1 did not reach it (stopped, hung or dead)" in err, err[-3000:]


def test_torchrun_stops_the_job_when_a_rank_dies(tmp_path):
    start = time.monotonic()
    result = torchrun(2, "die", str(tmp_path), timeout=TIMEOUT_S + 60)
    assert result.returncode != 0
    assert time.monotonic() - start < TIMEOUT_S + 30
    assert "exitcode  : 3" in result.stderr


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The run of `runs`, on two ranks with the state sharded by FSDP2."""
    out = tmp_path_factory.mktemp("fsdp")
    result = torchrun(2, "runner", str(out), "--batch-size", str(GLOBAL_BATCH // 2), "--fsdp")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_sharded_state_holds_each_parameter_once_across_ranks(sharded):
    two = ranks(sharded, 2)
    total = sum(p.numel() for p in params(sharded / "work" / "iter_12"))
    assert two[0]["param_elements"] + two[1]["param_elements"] == total
    assert max(r["param_elements"] for r in two) < 0.6 * total
    meta = json.loads((sharded / "work" / "iter_12" / "manifest.json").read_text())
    pieces = [e["pieces"] for e in meta["tensors"] if "pieces" in e]
    assert pieces and all(len(p) == 2 for p in pieces)  # every sharded leaf written as one piece per rank
    assert sorted(meta["files"]) == ["state.rank0.safetensors", "state.rank1.safetensors"]
    refusals = two[0]["refusals"]
    assert "runs its step eagerly" in refusals["compile"]
    assert "params['net.0.weight'] is not the storage of the sharded model's parameter" in refusals["copy"]


def test_sharded_training_matches_one_rank_with_the_full_batch(runs, sharded):
    root, _, _ = runs
    assert_close(sharded / "work" / "iter_12", root / "single" / "work" / "iter_12")
    assert ranks(sharded, 2)[0]["metrics"] == ranks(sharded, 2)[1]["metrics"]


def test_sharded_checkpoint_resumes_on_one_rank(runs, sharded, tmp_path):
    root, _, _ = runs
    runner = build_runner(tmp_path / "work", GLOBAL_BATCH, resume_from=str(sharded / "work" / "iter_9"))
    runner.train()
    assert runner.iter == 12
    assert_close(tmp_path / "work" / "iter_12", root / "single" / "work" / "iter_12")


def test_full_checkpoint_resumes_sharded_on_two_ranks(runs, tmp_path):
    root, _, _ = runs
    result = torchrun(
        2,
        "runner",
        str(tmp_path),
        "--batch-size",
        str(GLOBAL_BATCH // 2),
        "--fsdp",
        "--resume-from",
        str(root / "single" / "work" / "iter_9"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_close(tmp_path / "work" / "iter_12", root / "single" / "work" / "iter_12")


def test_user_built_data_loaders_are_sharded_like_config_built_ones(runs, tmp_path):
    root, _, _ = runs
    result = torchrun(2, "runner", str(tmp_path), "--batch-size", str(GLOBAL_BATCH // 2), "--user-loaders")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ranks(tmp_path, 2)[0]["digest"] == ranks(root / "two", 2)[0]["digest"]  # the same data, step by step
    assert ranks(tmp_path, 2)[0]["metrics"] == ranks(root / "two", 2)[0]["metrics"]


def test_sync_buffers_hook_gives_every_rank_the_mean_batchnorm_statistics(tmp_path):
    result = torchrun(2, "buffers", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = ranks(tmp_path, 2)
    assert rank0["unsynced"] != rank1["unsynced"]  # each rank saw its own half of the data
    assert rank0["synced"] == rank1["synced"]
    assert "WeightedRandomSampler" in rank0["refused"] and "DistributedSampler" in rank0["refused"]


def test_sigterm_to_torchrun_checkpoints_all_ranks_at_one_iteration_and_resumes_exactly(runs, tmp_path):
    root, _, _ = runs
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "runner",
        str(tmp_path / "stopped"),
        "--batch-size",
        str(GLOBAL_BATCH // 2),
        "--sleep",
        "0.5",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    for line in proc.stdout:
        if "Epoch(train) [1][3/6]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    (saved,) = [p for p in (tmp_path / "stopped" / "work").glob("iter_*")]
    assert 3 <= int(saved.name.removeprefix("iter_")) < 12
    assert f"Received SIGTERM: saved checkpoint {saved}" in output
    result = torchrun(
        2, "runner", str(tmp_path / "stopped"), "--batch-size", str(GLOBAL_BATCH // 2), "--resume-from", "auto"
    )  # rank 0 finds the newest checkpoint; every rank resumes it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"from {saved}" in result.stdout
    assert ranks(tmp_path / "stopped", 2)[0]["digest"] == ranks(root / "two", 2)[0]["digest"]


def test_launch_configuration_errors_name_the_problem(tmp_path, monkeypatch):
    from funceng.dist import DistributedError
    from funceng.runner import ConfigError

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="launcher='slurm' is not supported: start the script with torchrun"):
        build_runner(tmp_path / "a", GLOBAL_BATCH, launcher="slurm")
    with pytest.raises(DistributedError, match="needs torchrun's environment"):
        build_runner(tmp_path / "b", GLOBAL_BATCH, launcher="pytorch")
    with pytest.raises(ConfigError, match="MMFullyShardedDataParallel shards over several ranks"):
        build_runner(tmp_path / "c", GLOBAL_BATCH, model_wrapper_cfg=dict(type="MMFullyShardedDataParallel"))
    with pytest.raises(ConfigError, match="did you mean 'MMDistributedDataParallel'"):
        build_runner(tmp_path / "d", GLOBAL_BATCH, model_wrapper_cfg=dict(type="MMDistributedDataParalel"))
    with pytest.raises(ConfigError, match="env_cfg.dist_cfg: unknown key 'timout'"):
        build_runner(tmp_path / "e", GLOBAL_BATCH, env_cfg=dict(dist_cfg=dict(timout=5)))
    runner = build_runner(tmp_path / "f", GLOBAL_BATCH, auto_scale_lr=dict(enable=True))
    with pytest.raises(ConfigError, match="auto_scale_lr: missing 'base_batch_size'"):
        runner.train()


def test_auto_scale_lr_scales_by_the_global_batch_on_one_rank(runs):
    root, _, _ = runs
    meta = json.loads((root / "single" / "work" / "iter_12" / "manifest.json").read_text())
    assert meta["extra"]["config"]["optim_wrapper"]["optimizer"]["lr"] == pytest.approx(0.1)  # 0.05 * 16 / 8


def test_seed_script_runs_unchanged_under_torchrun(tmp_path):
    """MMEngine's tutorial passes no launcher: started by torchrun, the Runner joins the group on its own."""
    write_tiny_cifar10(tmp_path / "data" / "cifar10", per_train_batch=64, test_size=40)
    result = torchrun(2, "seed", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Distributed launcher: pytorch" in out and "World size: 2" in out
    epochs = re.findall(r"Epoch\(train\) \[(\d)\]\[5/5\]", out)  # 320 images, 2 ranks of batch 32: 5 steps
    assert epochs == ["1", "2", "3", "4", "5"]
    assert len(re.findall(r"Epoch\(val\) \[\d\]\[1/1\]    accuracy: ", out)) == 5  # 40 images, 20 per rank
    work_dir = tmp_path / "work_dir"
    assert {p.name for p in work_dir.iterdir() if p.name.startswith("epoch_")} == {f"epoch_{i}" for i in range(1, 6)}
    assert len([p for p in work_dir.iterdir() if re.fullmatch(r"\d{8}_\d{6}", p.name)]) == 1


def test_sharded_checkpoint_pieces_are_verified_and_inspectable(sharded, tmp_path):
    copy = tmp_path / "iter_12"
    shutil.copytree(sharded / "work" / "iter_12", copy)
    report = io.StringIO()
    assert inspect_checkpoint(str(copy), out=report) == 0
    pieces = sorted(copy.glob("state.rank*.safetensors"))
    assert "all 2 files match their sha256" in report.getvalue()
    data = bytearray(pieces[-1].read_bytes())
    data[-1] ^= 0xFF
    pieces[-1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{pieces[-1].name}: the sha256 of its bytes does not match"):
        load_state(copy)
