"""The checkpoint format as other tools see it: safetensors files any reader opens, weights exported for
inference and imported as initial weights, and format 1 checkpoints of funceng 0.2 still read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import funceng
from funceng import optim, tree
from funceng.checkpoint import CheckpointError, load_state, read_manifest, save_state
from funceng.cli import main as cli_main
from funceng.runner import Runner

from .models import mlp_with_batchnorm
from .runner_fixtures import TinyNet, runner_kwargs


@pytest.fixture
def state():
    torch.manual_seed(0)
    state = funceng.TrainState.create(mlp_with_batchnorm(), optim.adamw(1e-3))
    for t in state.values(True, True):
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape))
    return state


def test_the_reference_safetensors_reader_opens_a_checkpoint_and_finds_every_tensor_by_its_path(state, tmp_path):
    save_state(state, tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "state.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(tree.leaf_paths(tree.flatten(state)[0]))
        for key in state.keys(True, True):
            name = key if isinstance(key, str) else "/".join(key)
            assert torch.equal(f.get_tensor(name), state.get(key)), key


def test_a_file_written_by_the_reference_writer_loads_as_weights(tmp_path):
    torch.manual_seed(1)
    source = TinyNet()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "hub.safetensors"))
    runner = Runner(**runner_kwargs(tmp_path, load_from=str(tmp_path / "hub.safetensors")))
    runner.val()
    for name, value in source.state_dict().items():
        assert torch.equal(runner.model.state_dict()[name], value), name


def test_exported_weights_load_into_a_plain_module_and_back_into_a_runner(tmp_path):
    torch.manual_seed(0)
    runner = Runner(**runner_kwargs(tmp_path))
    runner.train()
    exported = funceng.export_state_dict(runner.state)
    plain = TinyNet()
    assert sorted(exported) == sorted(plain.state_dict())  # model.state_dict()'s names: params, then buffers
    plain.load_state_dict(exported)
    path = funceng.save_weights(runner.state, tmp_path / "model.safetensors")
    assert runner.save_weights(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    reread = load_file(str(path))
    assert set(reread) == set(exported) and all(torch.equal(reread[k], v) for k, v in exported.items())
    torch.manual_seed(5)
    fresh = Runner(**runner_kwargs(tmp_path / "fresh", load_from=str(path)))
    fresh.val()
    assert all(torch.equal(fresh.state["params"][k], v) for k, v in runner.state["params"].items())


def test_export_state_dict_copies_so_training_does_not_change_the_export(tmp_path):
    state = funceng.TrainState.create(torch.nn.Linear(3, 2), optim.sgd(0.1))
    exported = funceng.export_state_dict(state)
    state["params"]["weight"].add_(1.0)
    assert not torch.equal(exported["weight"], state["params"]["weight"])
    with pytest.raises(CheckpointError, match="expected a TrainState"):
        funceng.export_state_dict({"weight": torch.zeros(1)})


def write_format_1(state, path: Path, extra: dict) -> None:
    """A checkpoint as funceng 0.2 wrote it: meta.json and one raw file per tensor."""
    structure, leaves = tree.flatten(state)
    (path / "tensors").mkdir(parents=True)
    entries = []
    for i, leaf in enumerate(leaves):
        data = leaf.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if leaf.numel() else b""
        (path / "tensors" / f"{i}.bin").write_bytes(data)
        entries.append(
            {
                "file": f"tensors/{i}.bin",
                "dtype": str(leaf.dtype).removeprefix("torch."),
                "shape": list(leaf.shape),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    meta = {"format": "funceng.checkpoint/1", "versions": {"funceng": "0.2.0", "torch": "2.14.1"}}
    meta.update(structure=structure, tensors=entries, extra=extra)
    (path / "meta.json").write_text(json.dumps(meta))


def test_a_format_1_checkpoint_still_loads_and_a_resave_turns_it_into_format_2(state, tmp_path, capsys):
    old = tmp_path / "old"
    write_format_1(state, old, {"epoch": 1})
    loaded, extra = load_state(old)
    assert extra == {"epoch": 1} and (loaded == state).all()
    assert read_manifest(old)["format"] == "funceng.checkpoint/1"
    assert cli_main(["inspect", str(old)]) == 0 and "format: funceng.checkpoint/1" in capsys.readouterr().out
    save_state(loaded, old, extra={"epoch": 2})
    assert sorted(p.name for p in old.iterdir())[0] == "manifest.json" and not (old / "meta.json").exists()
    assert load_state(old)[1] == {"epoch": 2}


def test_a_tampered_format_1_checkpoint_is_refused_naming_the_file(state, tmp_path):
    old = tmp_path / "old"
    write_format_1(state, old, {})
    victim = old / "tensors" / "2.bin"
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"tensors/2.bin is truncated or corrupt"):
        load_state(old)
    meta = json.loads((old / "meta.json").read_text())
    meta["tensors"][0]["file"] = "../../etc/passwd"
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"field tensors\[0\].file '../../etc/passwd' is not a data file"):
        load_state(old)


def test_load_state_into_a_state_reads_straight_into_its_tensors(state, tmp_path):
    save_state(state, tmp_path / "ck", extra={"n": 1})
    target = state.clone().zero_()
    pointers = [t.data_ptr() for t in target.values(True, True)]
    loaded, extra = load_state(tmp_path / "ck", into=target)
    assert loaded is target and extra == {"n": 1} and (target == state).all()
    assert [t.data_ptr() for t in target.values(True, True)] == pointers  # no new memory
    wrong = funceng.TrainState.create(torch.nn.Linear(3, 5), optim.adamw(1e-3))
    with pytest.raises(CheckpointError, match="does not match this run's model and optimizer"):
        load_state(tmp_path / "ck", into=wrong)  # refused before a byte of data is read


def test_load_state_into_checks_the_file_header_against_the_state(state, tmp_path):
    from .test_checkpoint_tamper import header_edit

    save_state(state, tmp_path / "ck")
    # the file (re-hashed, manifest re-signed) says 6 x 12 where the manifest and the state say 12 x 6
    header_edit(lambda h: h["params/0.weight"].update(shape=[6, 12]))(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"holds torch.float32 \[6, 12\] under 'params/0.weight'; this state"):
        load_state(tmp_path / "ck", into=state.clone())
    with pytest.raises(CheckpointError, match=r"holds torch.float32 \[6, 12\] under 'params/0.weight'; the manifest"):
        load_state(tmp_path / "ck")
