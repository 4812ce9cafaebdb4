"""Checkpoints: the TrainState exactly, never a pickle, atomic, and corruption is caught and named."""

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import funceng
from funceng import optim
from funceng.checkpoint import CheckpointError, load_state, read_meta, save_state
from funceng.cli import main as cli_main
from funceng.runner import Runner

from .models import mlp_with_batchnorm
from .runner_fixtures import runner_kwargs


@pytest.fixture
def state():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    return funceng.TrainState.create(mlp_with_batchnorm(), tx)


def test_round_trip_gives_back_every_tensor_bitwise_with_its_dtype(state, tmp_path):
    for t in state.values(True, True):
        t.copy_(torch.randn(t.shape).to(t.dtype)) if t.is_floating_point() else None
    save_state(state, tmp_path / "ck", extra={"epoch": 3, "note": "hi"})
    loaded, extra = load_state(tmp_path / "ck")
    assert extra == {"epoch": 3, "note": "hi"}
    assert isinstance(loaded, funceng.TrainState) and loaded.is_locked
    for key in state.keys(True, True):
        assert state.get(key).dtype == loaded.get(key).dtype
        assert torch.equal(state.get(key), loaded.get(key)), key
    meta = read_meta(tmp_path / "ck")
    assert meta["versions"]["torch"] == torch.__version__ and meta["format"] == "funceng.checkpoint/2"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["manifest.json", "state.safetensors"]
    assert [len(f["sha256"]) for f in meta["files"].values()] == [64]


def test_unusual_dtypes_and_empty_tensors_round_trip(tmp_path):
    td = funceng.TrainState(
        {
            "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "b": torch.tensor([True, False]),
            "c": torch.empty(0, 3),
            "d": {"e": torch.tensor(7, dtype=torch.int32)},
        },
        batch_size=[],
    )
    save_state(td, tmp_path / "ck")
    loaded, _ = load_state(tmp_path / "ck")
    assert (loaded == td).all()


def test_a_resave_replaces_the_checkpoint_atomically(state, tmp_path):
    save_state(state, tmp_path / "ck", extra={"v": 1})
    save_state(state, tmp_path / "ck", extra={"v": 2})
    assert load_state(tmp_path / "ck")[1] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary siblings left behind


def test_truncated_tensor_file_is_detected_naming_the_file(state, tmp_path):
    save_state(state, tmp_path / "ck")
    victim = tmp_path / "ck" / "state.safetensors"
    victim.write_bytes(victim.read_bytes()[:-4])
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=r"ck: state.safetensors is \d+ bytes, the manifest says \d+"):
            load_state(tmp_path / "ck", verify=verify)


def test_bit_flip_is_detected_naming_the_file(state, tmp_path):
    save_state(state, tmp_path / "ck")
    victim = tmp_path / "ck" / "state.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"state.safetensors: the sha256 of its bytes does not match"):
        load_state(tmp_path / "ck")


def test_corrupt_or_missing_manifest_is_detected(state, tmp_path):
    save_state(state, tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"manifest.json is not valid JSON"):
        load_state(tmp_path / "ck")
    (tmp_path / "ck" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json is missing"):
        load_state(tmp_path / "ck")


class _Planted:
    """Unpickling this would create a marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(FileNotFoundError):
        marker.stat()


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _plant_pickle(tmp_path / "epoch_1.pth", marker)
    with pytest.raises(CheckpointError, match=r"epoch_1.pth is a pickle / torch.save file.*never unpickles"):
        load_state(tmp_path / "epoch_1.pth")
    torch.save({"w": torch.ones(1)}, tmp_path / "mmengine.pth")
    with pytest.raises(CheckpointError, match=r"mmengine.pth is a pickle / torch.save file"):
        load_state(tmp_path / "mmengine.pth")
    assert not marker.exists()


def test_runner_refuses_a_pickle_through_load_from_and_last_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    work = tmp_path / "work"
    work.mkdir()
    _plant_pickle(work / "epoch_1.pth", marker)
    with pytest.raises(CheckpointError, match="epoch_1.pth: not a readable PyTorch checkpoint"):
        Runner(**runner_kwargs(tmp_path, load_from=str(work / "epoch_1.pth"))).val()  # a .pth: weights only
    (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
    with pytest.raises(CheckpointError, match="never unpickles"):
        Runner(**runner_kwargs(tmp_path, resume=True)).train()
    assert not marker.exists()


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, capsys):
    Runner(**runner_kwargs(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=2))).train()
    newest = tmp_path / "work" / "epoch_2" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 1
    newest.write_bytes(bytes(data))
    resumed = Runner(**runner_kwargs(tmp_path, resume=True, train_cfg=dict(by_epoch=True, max_epochs=3)))
    resumed.train()
    out = capsys.readouterr().out
    assert "Cannot resume from" in out and "epoch_2: state.safetensors: the sha256 of its bytes does not match" in out
    assert "Falling back to" in out and "resumed epoch: 1, iter: 10" in out
    assert resumed.epoch == 3


def test_max_keep_ckpts_removes_old_checkpoints_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    from funceng import checkpoint

    runner = Runner(
        **runner_kwargs(
            tmp_path,
            train_cfg=dict(by_epoch=True, max_epochs=3),
            default_hooks=dict(checkpoint=dict(interval=1, max_keep_ckpts=1)),
        )
    )
    seen = []
    real = checkpoint.save_state

    def spy(state, path, **kwargs):
        seen.append(sorted(p.name for p in path.parent.iterdir() if p.name.startswith("epoch_")))
        return real(state, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_state", spy)
    runner.train()
    assert seen == [[], ["epoch_1"], ["epoch_2"]]  # the previous one still existed while the next was written
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if p.name.startswith("epoch_")) == ["epoch_3"]


def test_inspect_prints_the_state_and_verifies_checksums(state, tmp_path, capsys):
    save_state(state, tmp_path / "ck", extra={"epoch": 2, "iter": 20, "rng": {"torch": "..."}})
    assert cli_main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "step: 0  epoch: 2  iter: 20" in out
    assert "params/0.weight" in out and "(12, 6)" in out and "float32" in out
    assert "opt_state/1/0/exp_avg/0.weight" in out
    assert '"epoch": 2' in out and '"torch"' not in out
    assert "all " in out and "match their sha256" in out
    bad = tmp_path / "ck" / "state.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    assert cli_main(["inspect", str(tmp_path / "ck")]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_inspect_console_script_refuses_a_pickle(tmp_path):
    (tmp_path / "x.pth").write_bytes(pickle.dumps({"a": 1}))
    done = subprocess.run(
        [sys.executable, "-m", "funceng.cli", "inspect", str(tmp_path / "x.pth")],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert done.returncode == 2 and "never unpickles" in done.stderr


def test_a_resave_keeps_the_path_a_checkpoint_at_every_moment_and_cleans_what_a_crash_left(state, tmp_path):
    ck = tmp_path / "ck"
    save_state(state, ck, extra={"v": 1})
    # what a process killed in the middle of a resave leaves: its new data file and its unrenamed manifest
    (ck / "state-deadbeef.safetensors").write_bytes(b"partial")
    (ck / ".manifest.json.tmp-999999999").write_bytes(b"{")
    assert load_state(ck)[1] == {"v": 1}  # still the old checkpoint
    save_state(state, ck, extra={"v": 2})
    names = sorted(p.name for p in ck.iterdir())
    assert names[0] == "manifest.json" and len(names) == 2 and names[1].startswith("state-")
    assert load_state(ck)[1] == {"v": 2}


def test_stale_temporary_directories_of_dead_processes_are_removed_at_the_next_save(state, tmp_path):
    dead = tmp_path / ".iter_8.tmp-999999999-0123abcd"  # no such pid
    dead.mkdir()
    (dead / "state.safetensors").write_bytes(b"x" * 100)
    mine = tmp_path / f".iter_9.tmp-{os.getpid()}-0123abcd"  # this live process's: kept
    mine.mkdir()
    save_state(state, tmp_path / "iter_12")
    assert not dead.exists() and mine.exists()


def test_a_full_disk_names_the_checkpoint_removes_partial_files_and_keeps_the_previous_one(state, tmp_path):
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import torch, funceng
from funceng import optim
from funceng.checkpoint import CheckpointError, save_state, load_state
from tests.models import mlp_with_batchnorm
state = funceng.TrainState.create(mlp_with_batchnorm(), optim.adamw(1e-3))
root = {str(tmp_path)!r}
save_state(state, root + "/ck", extra={{"v": 1}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # every larger write fails with EFBIG, as a full disk
for name in ("ck", "new"):
    try:
        save_state(state, root + "/" + name, extra={{"v": 2}})
    except CheckpointError as exc:
        print("REFUSED", exc)
print("OLD", load_state(root + "/ck")[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refusals = [line for line in done.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refusals) == 2 and all("EFBIG" in line and "partial files were removed" in line for line in refusals)
    assert f"cannot save checkpoint {tmp_path / 'ck'}" in refusals[0]
    assert "OLD {'v': 1}" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["manifest.json", "state.safetensors"]


def test_a_background_save_writes_the_state_as_it_was_when_saved(state, tmp_path, monkeypatch):
    from funceng import checkpoint_writer

    release, real = threading.Event(), checkpoint_writer.write_file

    def slow_write(path, tensors):
        release.wait(30)
        return real(path, tensors)

    monkeypatch.setattr(checkpoint_writer, "write_file", slow_write)
    before = state.clone()
    pending = save_state(state, tmp_path / "a", extra={"n": 1}, blocking=False)
    state["params"].apply_(lambda t: t.add_(1.0))  # training goes on: the state changes in place
    assert not pending.done() and not (tmp_path / "a").exists()
    threading.Timer(0.3, release.set).start()
    save_state(state, tmp_path / "b", blocking=False).wait()  # a second save waits for the first
    assert pending.done() and pending.wait() == tmp_path / "a"
    assert (load_state(tmp_path / "a")[0] == before).all()
    assert (load_state(tmp_path / "b")[0] == state).all()


def test_a_failed_background_save_raises_at_the_next_save(state, tmp_path, monkeypatch):
    from funceng import checkpoint_writer

    def full(path, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_writer, "write_file", full)
    pending = save_state(state, tmp_path / "a", blocking=False)
    while not pending.done():
        time.sleep(0.01)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"cannot save checkpoint .*/a: No space left on device \(ENOSPC\)"):
        save_state(state, tmp_path / "b")
    assert not (tmp_path / "a").exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_runner_async_save_gives_the_same_checkpoints_and_weights_as_blocking_saves(tmp_path, compiled):
    results = {}
    for mode in (False, True):
        torch.manual_seed(0)
        runner = Runner(
            **runner_kwargs(
                tmp_path / str(mode),
                compile=compiled,
                checkpoint=dict(async_save=mode),
                default_hooks=dict(checkpoint=dict(interval=3, by_epoch=False, max_keep_ckpts=2)),
            )
        )
        runner.train()
        work = tmp_path / str(mode) / "work"
        results[mode] = (runner.state.clone(), sorted(p.name for p in work.glob("iter_*")))
        assert Path((work / "last_checkpoint").read_text()).name == "iter_20"
        assert (load_state(work / "iter_20")[0] == runner.state).all()
    assert results[True][1] == results[False][1] == ["iter_18", "iter_20"]
    assert (results[True][0] == results[False][0]).all()


def test_runner_checkpoint_options_are_checked():
    with pytest.raises(funceng.ConfigError, match="checkpoint: unknown key 'async' \\(did you mean 'async_save'"):
        Runner(**runner_kwargs(Path("/tmp/unused"), checkpoint=dict(async_save=True, **{"async": 1})))


def test_a_state_with_a_non_finite_parameter_or_buffer_is_not_saved_unless_asked(state, tmp_path):
    state["buffers"][next(iter(state["buffers"].keys()))].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save checkpoint .*/ck: buffers/1.running_mean holds NaN"):
        save_state(state, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    save_state(state, tmp_path / "ck", allow_nonfinite=True)
    assert torch.isnan(load_state(tmp_path / "ck")[0]["buffers"]["1.running_mean"]).any()
