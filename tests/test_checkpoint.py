"""Checkpoints: the TrainState exactly, never a pickle, atomic, and corruption is caught and named."""

import os
import pickle
import subprocess
import sys
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
    assert meta["versions"]["torch"] == torch.__version__ and all(len(e["sha256"]) == 64 for e in meta["tensors"])


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
    victim = tmp_path / "ck" / "tensors" / "0.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"tensors/0.bin is corrupt"):
        load_state(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"tensors/0.bin is truncated or corrupt"):
        load_state(tmp_path / "ck", verify=False)


def test_bit_flip_is_detected_naming_the_file(state, tmp_path):
    save_state(state, tmp_path / "ck")
    victim = tmp_path / "ck" / "tensors" / "3.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensors/3.bin is corrupt: its sha256 does not match"):
        load_state(tmp_path / "ck")


def test_corrupt_or_missing_metadata_is_detected(state, tmp_path):
    save_state(state, tmp_path / "ck")
    (tmp_path / "ck" / "meta.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"meta.json is corrupt"):
        load_state(tmp_path / "ck")
    (tmp_path / "ck" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta.json is missing"):
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
    newest = tmp_path / "work" / "epoch_2" / "tensors" / "0.bin"
    newest.write_bytes(b"\x00" + newest.read_bytes()[1:])
    resumed = Runner(**runner_kwargs(tmp_path, resume=True, train_cfg=dict(by_epoch=True, max_epochs=3)))
    resumed.train()
    out = capsys.readouterr().out
    assert "Cannot resume from" in out and "epoch_2/tensors/0.bin is corrupt" in out
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

    def spy(state, path, extra=None):
        seen.append(sorted(p.name for p in path.parent.iterdir() if p.name.startswith("epoch_")))
        return real(state, path, extra=extra)

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
    bad = tmp_path / "ck" / "tensors" / "0.bin"
    bad.write_bytes(bad.read_bytes()[::-1])
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
