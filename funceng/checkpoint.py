"""Checkpoints that *are* the TrainState: raw tensor files plus a JSON manifest, never a pickle.

Layout of a checkpoint directory::

    <name>/meta.json        format, versions, structure of the state, per-tensor dtype/shape/file/sha256,
                            and the caller's ``extra`` metadata (epoch, iteration, RNG states, ...)
    <name>/tensors/<i>.bin  the bytes of leaf ``i``, C-contiguous

Writes are atomic: everything goes to a hidden sibling directory which is fsynced and renamed into place, so a
crash at any moment leaves either the old checkpoint or the new one, never a partial one. Loading reads only
JSON and raw bytes: no object is ever unpickled, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funceng import tree
from funceng.state import TrainState

FORMAT = "funceng.checkpoint/1"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)}
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle stream; a zip archive (torch.save)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or not a funceng checkpoint; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def save_state(state: TrainState, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Writes ``state`` (and JSON-serialisable ``extra``) to the checkpoint directory ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tensors").mkdir(parents=True)
    structure, leaves = tree.flatten(state)
    entries = []
    for i, leaf in enumerate(leaves):
        dtype = str(leaf.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise CheckpointError(f"cannot save a tensor of dtype {leaf.dtype}")
        file = f"tensors/{i}.bin"
        digest = _write(tmp / file, _tensor_bytes(leaf))
        entries.append({"file": file, "dtype": dtype, "shape": list(leaf.shape), "sha256": digest})
    meta = {
        "format": FORMAT,
        "versions": {"funceng": _version(), "torch": torch.__version__},
        "structure": structure,
        "tensors": entries,
        "extra": extra or {},
    }
    _write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    _fsync_dir(tmp / "tensors")
    _fsync_dir(tmp)
    if path.exists():  # replace: move the old one aside first so the rename below is atomic
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, trash)
        os.rename(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)
    return path


def _version() -> str:
    from funceng import __version__

    return __version__


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``meta.json``; refuses anything else (a pickle above all) with a clear error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        kind = "a pickle / torch.save file" if head.startswith(_PICKLE_MAGIC) else "a file"
        raise CheckpointError(
            f"{path} is {kind}, not a funceng checkpoint directory; funceng never unpickles checkpoints "
            "(that could run arbitrary code), so it refuses to load it"
        )
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: {path} is not a complete funceng checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_file} is corrupt: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def load_state(path: str | os.PathLike, *, verify: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """``(state, extra)`` from a checkpoint directory; ``verify`` checks every tensor file's sha256."""
    path = Path(path)
    meta = read_meta(path)
    leaves = []
    for entry in meta["tensors"]:
        file = path / entry["file"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: unknown dtype {entry['dtype']!r}")
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing from checkpoint {path}") from None
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{file} is corrupt: its sha256 does not match the one recorded in meta.json")
        shape = entry["shape"]
        expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        if len(data) != expected:
            raise CheckpointError(f"{file} is truncated or corrupt: {len(data)} bytes, expected {expected}")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        leaves.append(raw.view(dtype).reshape(shape))
    state = TrainState(tree.unflatten(meta["structure"], leaves), batch_size=[])
    state.lock_()
    return state, meta["extra"]
