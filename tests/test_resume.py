"""Exact resumption: a run killed at any point and resumed ends bitwise equal to one that never stopped."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from funceng.checkpoint import load_state

WORKER = Path(__file__).with_name("resume_worker.py")
ITERS = 24  # 3 epochs of 8 batches (120 samples, batch 16)


def run(work_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(work_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group, which --sigterm-group-at signals
    )


def run_to_completion(work_dir: Path, *first_args: str, workers: int = 0, max_attempts: int = 5) -> list[int]:
    """Runs once with ``first_args``, then resumes until the run completes; returns every exit code."""
    loader = ["--workers", str(workers)]
    codes = [run(work_dir, *first_args, *loader).returncode]
    while not (work_dir / "final").exists():
        assert len(codes) < max_attempts, codes
        done = run(work_dir, "--resume", *loader)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr
        codes.append(done.returncode)
    return codes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("reference")
    done = run(work_dir)
    assert done.returncode == 0, done.stderr
    return load_state(work_dir / "final")[0]


def assert_bitwise_equal(expected, work_dir: Path) -> None:
    got, _ = load_state(work_dir / "final")
    keys = list(expected.keys(include_nested=True, leaves_only=True))
    assert keys == list(got.keys(include_nested=True, leaves_only=True))
    for key in keys:
        assert torch.equal(expected.get(key), got.get(key)), key


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_iteration_then_resume_is_bitwise_exact(reference, tmp_path, seed):
    kill_at = random.Random(seed).randint(1, ITERS - 1)
    codes = run_to_completion(tmp_path, "--kill-at", str(kill_at))
    assert codes[0] == -signal.SIGKILL and codes[-1] == 0
    assert_bitwise_equal(reference, tmp_path)


def test_epoch_checkpoints_resume_bitwise_exact(tmp_path_factory, tmp_path):
    ref_dir = tmp_path_factory.mktemp("epoch_reference")
    assert run(ref_dir, "--checkpoint", "epoch").returncode == 0
    codes = run_to_completion(tmp_path, "--checkpoint", "epoch", "--kill-at", "13")
    assert codes[0] == -signal.SIGKILL
    assert_bitwise_equal(load_state(ref_dir / "final")[0], tmp_path)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    # iter_4 is the first checkpoint and last_checkpoint; die once iter_8's data file is written, before its
    # manifest and the rename that publishes it
    done = run(tmp_path, "--kill-in-save", "2")
    assert done.returncode == -signal.SIGKILL
    assert Path((tmp_path / "last_checkpoint").read_text()) == tmp_path / "iter_4"
    assert not (tmp_path / "iter_8").exists()
    (staging,) = [p.name for p in tmp_path.iterdir() if p.name.startswith(".iter_8.tmp-")]
    load_state(tmp_path / "iter_4")  # intact
    run_to_completion(tmp_path, "--resume")
    assert_bitwise_equal(reference, tmp_path)
    assert not (tmp_path / staging).exists()  # the dead process's staging directory went at the next save


def test_sigkill_at_a_random_moment_from_outside(reference, tmp_path):
    rng = random.Random(7)
    codes = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), "--sleep", "0.1", *(["--resume"] if codes else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(3.0, 5.0))
        proc.kill()
        codes.append(proc.wait())
    run_to_completion(tmp_path, "--resume")
    assert_bitwise_equal(reference, tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_sigterm_and_sigint_save_a_checkpoint_exit_and_resume_exactly(reference, tmp_path, signum):
    name = signal.Signals(signum).name
    done = run(tmp_path, f"--{name.lower()}-at", "10")
    assert done.returncode == 128 + signum
    assert f"Received {name}: saved checkpoint" in done.stdout
    assert Path((tmp_path / "last_checkpoint").read_text()) == tmp_path / "iter_10"
    assert "Traceback" not in done.stderr
    run_to_completion(tmp_path, "--resume")
    assert_bitwise_equal(reference, tmp_path)


@pytest.fixture(scope="module")
def reference_with_workers(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("reference_workers")
    done = run(work_dir, "--workers", "2")
    assert done.returncode == 0, done.stderr
    return load_state(work_dir / "final")[0]


@pytest.mark.parametrize("seed", [4])
def test_sigkill_with_two_loader_workers_and_random_augmentation_resumes_bitwise_exact(
    reference_with_workers, tmp_path, seed
):
    kill_at = random.Random(seed).randint(1, ITERS - 1)
    codes = run_to_completion(tmp_path, "--kill-at", str(kill_at), workers=2)
    assert codes[0] == -signal.SIGKILL and codes[-1] == 0
    assert_bitwise_equal(reference_with_workers, tmp_path)


def test_sigterm_to_the_process_group_with_loader_workers_saves_exits_and_resumes_exactly(
    reference_with_workers, tmp_path
):
    done = run(tmp_path, "--workers", "2", "--sigterm-group-at", "11")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Received SIGTERM: saved checkpoint" in done.stdout + done.stderr
    assert "killed by signal" not in done.stderr
    assert Path((tmp_path / "last_checkpoint").read_text()).name == "iter_11"
    run_to_completion(tmp_path, "--resume", workers=2)
    assert_bitwise_equal(reference_with_workers, tmp_path)
