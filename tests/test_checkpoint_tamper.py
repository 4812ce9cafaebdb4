"""Hostile and garbled checkpoints, through every entry point: `load_state`, ``funceng inspect``, ``load_from``
and ``Runner(resume=True)``.

Each case tampers with the newest checkpoint of a finished run (``epoch_2``, which ``last_checkpoint`` names)
and asserts that every entry point refuses it with a `CheckpointError` naming the checkpoint and the problem,
within a time limit (no hang) and without reading more than the files' real sizes (no memory blow-up), and that
resume falls back to the intact ``epoch_1`` and says why. Most edits recompute every checksum, as an attacker
would, so that the checks behind the checksums are exercised too. A seeded fuzzer then mutates the manifest and
the safetensors header at random: every mutation loads the same tensors or raises `CheckpointError`, nothing
else.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch

from funceng import manifest
from funceng.checkpoint import CheckpointError, load_state
from funceng.cli import main as cli_main
from funceng.runner import Runner

from .runner_fixtures import runner_kwargs

TIME_LIMIT_S = 20


@contextlib.contextmanager
def time_limit(seconds: int = TIME_LIMIT_S):
    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    torch.manual_seed(0)
    Runner(**runner_kwargs(root, default_hooks=dict(checkpoint=dict(interval=1)), experiment_name="x")).train()
    return root / "work"


@pytest.fixture
def work(finished_run, tmp_path):
    target = tmp_path / "work"
    shutil.copytree(finished_run, target, symlinks=True)
    (target / "last_checkpoint").write_text(str(target / "epoch_2"))
    return target


def read(ck: Path) -> dict:
    return json.loads((ck / "manifest.json").read_text())


def write(ck: Path, meta: dict) -> None:
    """Writes ``meta`` as the manifest with a valid ``manifest_sha256``, as an attacker who knows the format."""
    meta = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    (ck / "manifest.json").write_bytes(manifest.dump(meta))


def rehash_file(ck: Path, name: str = "state.safetensors") -> None:
    """Records the file's current size and sha256 in the manifest (and re-signs it)."""
    meta = read(ck)
    data = (ck / name).read_bytes()
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write(ck, meta)


def edit(change):
    def tamper(ck: Path) -> None:
        meta = read(ck)
        change(meta)
        write(ck, meta)

    return tamper


def replace_file(make):
    def tamper(ck: Path) -> None:
        target = ck / "state.safetensors"
        target.unlink()
        make(target)

    return tamper


def sparse(size: int):
    def make(target: Path) -> None:
        with open(target, "wb") as f:
            f.truncate(size)

    return make


def header_edit(change):
    """Rewrites the safetensors header (and then the file's recorded sha256)."""

    def tamper(ck: Path) -> None:
        data = (ck / "state.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (ck / "state.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
        rehash_file(ck)

    return tamper


def first_weight(meta: dict) -> dict:
    return next(e for e in meta["tensors"] if e["name"].startswith("params/") and len(e["shape"]) == 2)


def swap_first_two(meta):
    meta["tensors"][0], meta["tensors"][1] = meta["tensors"][1], meta["tensors"][0]


def nest_deeply(ck: Path) -> None:
    text = (ck / "manifest.json").read_text()
    deep = '{"a":' * 100_000 + "0" + "}" * 100_000
    (ck / "manifest.json").write_text(text.replace('"structure": {', f'"structure": {{"deep": {deep},', 1))


def unsigned(change):
    def tamper(ck: Path) -> None:
        meta = read(ck)
        change(meta)
        (ck / "manifest.json").write_text(json.dumps(meta))  # manifest_sha256 left as it was

    return tamper


def outside_symlink(ck: Path) -> None:
    outside = ck.parent.parent / "elsewhere.safetensors"
    shutil.move(ck / "state.safetensors", outside)
    (ck / "state.safetensors").symlink_to(outside)


def manifest_symlink(ck: Path) -> None:
    shutil.move(ck / "manifest.json", ck.parent.parent / "manifest.json")
    (ck / "manifest.json").symlink_to(ck.parent.parent / "manifest.json")


def flip_data_byte(ck: Path) -> None:
    data = bytearray((ck / "state.safetensors").read_bytes())
    data[-3] ^= 0x40
    (ck / "state.safetensors").write_bytes(bytes(data))


# name: (tamper, the message it must raise, whether load_from (weights only) must refuse it too)
CASES = {
    "manifest names /dev/zero": (
        edit(lambda m: [m["files"].update({"/dev/zero": m["files"].pop("state.safetensors")})]),
        "'/dev/zero', which is not a data file name",
        True,
    ),
    "tensor file outside the checkpoint": (
        edit(lambda m: first_weight(m).update(file="../epoch_1/state.safetensors")),
        "is not a data file of this checkpoint",
        True,
    ),
    "tensor file is a symlink out": (outside_symlink, "cannot open .* as a regular file", True),
    "manifest is a symlink": (manifest_symlink, "cannot open .* as a regular file", True),
    "tensor file is a FIFO": (replace_file(os.mkfifo), "is not a regular file", True),
    "manifest is a FIFO": (
        lambda ck: [(ck / "manifest.json").unlink(), os.mkfifo(ck / "manifest.json")],
        "not a regular file",
        True,
    ),
    "tensor file is 64 GiB sparse": (
        replace_file(sparse(64 * 2**30)),
        r"is 68719476736 bytes, the manifest says",
        True,
    ),
    "manifest is 64 GiB sparse": (
        lambda ck: sparse(64 * 2**30)(ck / "manifest.json"),
        "more than the 67108864 allowed",
        True,
    ),
    "missing structure": (edit(lambda m: m.pop("structure")), "field structure holds None", True),
    "missing files": (edit(lambda m: m.pop("files")), "field files is missing", True),
    "missing tensors": (edit(lambda m: m.pop("tensors")), "field tensors is missing", True),
    "missing extra": (edit(lambda m: m.pop("extra")), "field extra is missing", True),
    "tensors is a dict": (edit(lambda m: m.update(tensors={})), "field tensors must be a list", True),
    "structure is a list": (edit(lambda m: m.update(structure=[0, 1])), "field structure holds", True),
    "format is a number": (edit(lambda m: m.update(format=3)), "field format must be a str", True),
    "file size is a string": (
        edit(lambda m: m["files"]["state.safetensors"].update(size="12")),
        r"field files\['state.safetensors'\].size must be a int",
        True,
    ),
    "shape [2**62, 4]": (
        edit(lambda m: first_weight(m).update(shape=[2**62, 4])),
        "shape must hold non-negative ints",
        True,
    ),
    "shape [-4, -4]": (
        edit(lambda m: first_weight(m).update(shape=[-4, -4])),
        "shape must hold non-negative ints",
        True,
    ),
    "shape with a float": (
        edit(lambda m: first_weight(m).update(shape=[3.0, 12])),
        "shape must hold non-negative ints",
        True,
    ),
    "structure nested 100k deep": (nest_deeply, "manifest.json is not valid JSON", True),
    "sharded piece rows not a pair": (
        edit(lambda m: first_weight(m).update(pieces=[{"file": "state.safetensors", "rows": 5}])),
        r"pieces\[0\].rows must be a pair",
        True,
    ),
    "sharded pieces overlap": (
        edit(
            lambda m: first_weight(m).update(
                pieces=[{"file": "state.safetensors", "rows": [0, 2]}, {"file": "state.safetensors", "rows": [1, 3]}]
            )
        ),
        "overlaps the piece before it",
        True,
    ),
    "dtype float32 -> int32": (
        edit(lambda m: first_weight(m).update(dtype="int32")),
        "the manifest says torch.int32",
        True,
    ),
    "transposed shape": (
        edit(lambda m: first_weight(m).update(shape=first_weight(m)["shape"][::-1])),
        "the manifest says",
        True,
    ),
    "tensors reordered": (edit(swap_first_two), r"field tensors\[0\].name is", True),
    "manifest edited without re-signing": (
        unsigned(lambda m: m["extra"].update(epoch=99)),
        "the manifest's own sha256 does not match its contents",
        True,
    ),
    "unknown dtype": (edit(lambda m: first_weight(m).update(dtype="complex64")), "is not one of", True),
    "a data byte flipped": (flip_data_byte, "the sha256 of its bytes does not match", True),
    "truncated data file, size re-recorded": (
        lambda ck: [
            (ck / "state.safetensors").write_bytes((ck / "state.safetensors").read_bytes()[:-8]),
            rehash_file(ck),
        ],
        "the header accounts for",
        True,
    ),
    "header length past the file": (
        lambda ck: [
            (ck / "state.safetensors").write_bytes(
                struct.pack("<Q", 2**40) + (ck / "state.safetensors").read_bytes()[8:]
            ),
            rehash_file(ck),
        ],
        "header length 1099511627776 does not fit",
        True,
    ),
    "header dtype changed": (
        header_edit(
            lambda h: next(v for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32").update(dtype="I32")
        ),
        "the manifest says torch.float32",
        True,
    ),
    "header offsets overlap": (
        header_edit(
            lambda h: [
                v.update(data_offsets=[0, v["data_offsets"][1] - v["data_offsets"][0]])
                for k, v in h.items()
                if k != "__metadata__"
            ]
        ),
        "overlaps or leaves a gap",
        True,
    ),
    "extra.epoch = 99, re-signed": (
        edit(lambda m: m["extra"].update(epoch=99)),
        r"epoch 99, batch 0 of 10 per epoch is not iteration 20",
        False,
    ),
    "extra.iter = 5, re-signed": (
        edit(lambda m: m["extra"].update(iter=5)),
        "field extra.iter is 5 but its state has taken 20 steps",
        False,
    ),
    "extra.rng garbled, re-signed": (edit(lambda m: m["extra"]["rng"].update(torch="!!")), "field extra.rng", False),
}


def run_runner_entry_points(work: Path, message: str, weights_too: bool, capsys) -> None:
    ck = work / "epoch_2"
    if weights_too:
        with time_limit(), pytest.raises(CheckpointError, match=message):
            Runner(**runner_kwargs(work.parent / "from", load_from=str(ck), experiment_name="x")).val()
    with time_limit():
        capsys.readouterr()
        resumed = Runner(
            **runner_kwargs(work.parent, resume=True, experiment_name="x", train_cfg=dict(by_epoch=True, max_epochs=3))
        )
        resumed.train()
    out = capsys.readouterr().out
    assert f"Cannot resume from {ck}" in out and "Falling back to" in out, out[-2000:]
    assert "resumed epoch: 1, iter: 10" in out and resumed.epoch == 3


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_checkpoint_is_refused_by_every_entry_point_and_resume_falls_back(case, work, capsys):
    tamper, message, weights_too = CASES[case]
    ck = work / "epoch_2"
    tamper(ck)
    if weights_too:
        with time_limit(), pytest.raises(CheckpointError, match=message) as raised:
            load_state(ck)
        assert str(ck) in str(raised.value)
        with time_limit():
            capsys.readouterr()
            status = cli_main(["inspect", str(ck)])
        assert status in (1, 2)
        printed = capsys.readouterr()
        assert "Traceback" not in printed.err and ("funceng: " in printed.err or "CORRUPT" in printed.out)
        with time_limit():
            assert cli_main(["inspect", str(work)]) in (1, 2)  # a work_dir: its last_checkpoint
    run_runner_entry_points(work, message, weights_too, capsys)


def test_a_garbled_last_checkpoint_pointer_falls_back_to_the_newest_checkpoint(work, capsys):
    for garbage in (b"\xff\xfe\x00not utf-8", b"", b"/dev/zero", b"x" * 100_000):
        (work / "last_checkpoint").write_bytes(garbage)
        with time_limit():
            capsys.readouterr()
            resumed = Runner(
                **runner_kwargs(
                    work.parent, resume=True, experiment_name="x", train_cfg=dict(by_epoch=True, max_epochs=2)
                )
            )
            resumed.train()
        out = capsys.readouterr().out
        assert "resumed epoch: 2, iter: 20" in out, (garbage[:20], out[-1500:])
    (work / "last_checkpoint").unlink()
    os.mkfifo(work / "last_checkpoint")
    with time_limit():
        Runner(
            **runner_kwargs(work.parent, resume=True, experiment_name="x", train_cfg=dict(by_epoch=True, max_epochs=2))
        ).train()
    assert "Ignoring last_checkpoint" in capsys.readouterr().out


def _mutations(value, rng: random.Random):
    """Random replacements for a JSON value: other types, edge numbers, deletions of dict keys."""
    return rng.choice([None, True, -1, 0, 2**63, 1.5, "", "x" * 300, [], {}, [0, 0], [-1], {"a": 1}, [value, value]])


def _mutate(meta: dict, rng: random.Random) -> None:
    node, steps = meta, 0
    while isinstance(node, (dict, list)) and node and steps < 6:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = rng.choice(keys)
        if rng.random() < 0.35 or not isinstance(node[key], (dict, list)) or not node[key]:
            if isinstance(node, dict) and rng.random() < 0.3:
                del node[key]
            else:
                node[key] = _mutations(node[key], rng)
            return
        node, steps = node[key], steps + 1


def test_fuzzed_manifests_and_headers_load_the_same_tensors_or_raise_checkpoint_error(work):
    ck = work / "epoch_2"
    original_meta = read(ck)
    original_file = (ck / "state.safetensors").read_bytes()
    expected, _ = load_state(ck)
    rng = random.Random(1234)
    outcomes = {"refused": 0, "loaded": 0}
    for trial in range(400):
        write(ck, copy.deepcopy(original_meta))
        (ck / "state.safetensors").write_bytes(original_file)
        if trial % 2:
            meta = copy.deepcopy(original_meta)
            _mutate(meta, rng)
            write(ck, meta)
        else:
            (length,) = struct.unpack("<Q", original_file[:8])
            data = bytearray(original_file)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(0, 8 + length)] = rng.randrange(256)
            (ck / "state.safetensors").write_bytes(bytes(data))
            rehash_file(ck)
        try:
            with time_limit():
                got, _ = load_state(ck)
        except CheckpointError as exc:
            assert str(ck) in str(exc)
            outcomes["refused"] += 1
            continue
        assert list(got.keys(True, True)) == list(expected.keys(True, True)), trial
        for key in expected.keys(True, True):
            assert torch.equal(got.get(key), expected.get(key)), (trial, key)
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 300, outcomes  # the rest changed extra/versions or JSON whitespace only
