"""Checkpoints that *are* the TrainState: raw tensor files plus a JSON manifest, never a pickle.

Layout of a checkpoint directory::

    <name>/meta.json        format, versions, structure of the state, per-tensor dtype/shape/file/sha256,
                            and the caller's ``extra`` metadata (epoch, iteration, RNG states, ...)
    <name>/tensors/<i>.bin  the bytes of leaf ``i``, C-contiguous
    <name>/tensors/<i>.<row>.bin  for a sharded state (`funceng.sharding`): the rows of leaf ``i`` that one rank
                            held, from ``row`` on; meta.json lists each such piece with its row range

A checkpoint does not depend on the number of ranks that wrote it: any run loads it whole, or any rank just
the rows of its own shard, whatever the sharding when it was saved.

Writes are atomic: everything goes to a hidden sibling directory which is fsynced and renamed into place, so a
crash at any moment leaves either the old checkpoint or the new one, never a partial one. Loading reads only
JSON and raw bytes: no object is ever unpickled, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funceng import dist, fileio, tree
from funceng.errors import CheckpointError
from funceng.sharding import ShardLayout
from funceng.state import TrainState
from funceng.version import __version__

FORMAT = "funceng.checkpoint/1"
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle stream; a zip archive (torch.save)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _dtype_name(leaf: torch.Tensor) -> str:
    dtype = str(leaf.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise CheckpointError(f"cannot save a tensor of dtype {leaf.dtype}")
    return dtype


def save_state(
    state: TrainState,
    path: str | os.PathLike,
    *,
    extra: dict[str, Any] | None = None,
    shards: ShardLayout | None = None,
) -> Path:
    """Writes ``state`` (and JSON-serialisable ``extra``) to the checkpoint directory ``path``, atomically.

    With ``shards`` (a sharded state, `funceng.sharding.shard_layout`) every rank must call this: each writes
    the rows it holds, and rank 0 the unsharded leaves and the manifest. Without, only the caller writes.
    """
    path = Path(path)
    sharded = bool(shards) and dist.get_world_size() > 1
    writer = not sharded or dist.get_rank() == 0
    tmp = path.with_name(f".{path.name}.tmp-{dist.broadcast_object(os.getpid()) if sharded else os.getpid()}")
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "tensors").mkdir(parents=True)
    if sharded:
        dist.barrier()
    structure, leaves = tree.flatten(state)
    entries: dict[int, dict[str, Any]] = {}
    for i, leaf in enumerate(leaves):
        shard = shards.get(i) if sharded else None
        if shard is None or shard.shape[0] == 0:  # unsharded (or empty: no rank holds a row of it)
            if writer:
                file = f"tensors/{i}.bin"
                entries[i] = {
                    "file": file,
                    "dtype": _dtype_name(leaf),
                    "shape": list(leaf.shape),
                    "sha256": fileio.write_durably(tmp / file, _tensor_bytes(leaf)),
                }
        elif shard.rows:
            file = f"tensors/{i}.{shard.start}.bin"
            entries[i] = {
                "dtype": _dtype_name(leaf),
                "shape": list(shard.shape),
                "pieces": [
                    {
                        "file": file,
                        "rows": [shard.start, shard.start + shard.rows],
                        "sha256": fileio.write_durably(tmp / file, _tensor_bytes(leaf)),
                    }
                ],
            }
    if sharded:
        gathered = dist.gather_objects(entries)
        entries = {}
        for part in gathered:
            for i, entry in part.items():
                if i in entries and "pieces" in entry:
                    entries[i]["pieces"] = sorted(entries[i]["pieces"] + entry["pieces"], key=lambda p: p["rows"])
                else:
                    entries[i] = entry
    if writer:
        _publish(tmp, path, structure, [entries[i] for i in range(len(leaves))], extra)
    if sharded:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place
    return path


def _publish(tmp: Path, path: Path, structure: Any, entries: list[dict], extra: dict | None) -> None:
    """Writes the manifest into the complete temporary directory, then renames it to ``path``."""
    meta = {
        "format": FORMAT,
        "versions": {"funceng": __version__, "torch": torch.__version__},
        "structure": structure,
        "tensors": entries,
        "extra": extra or {},
    }
    fileio.write_durably(tmp / "meta.json", json.dumps(meta, indent=1).encode())
    fileio.fsync_dir(tmp / "tensors")
    fileio.fsync_dir(tmp)
    if path.exists():  # replace: move the old one aside first so the rename below is atomic
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, trash)
        os.rename(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fileio.fsync_dir(path.parent)


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


def _read(file: Path, sha256: str, shape: list[int], dtype: torch.dtype, verify: bool) -> torch.Tensor:
    """The tensor in ``file``, checked against its recorded digest and size."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing from checkpoint {file.parent.parent}") from None
    if verify and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{file} is corrupt: its sha256 does not match the one recorded in meta.json")
    expected = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise CheckpointError(f"{file} is truncated or corrupt: {len(data)} bytes, expected {expected}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _read_rows(path: Path, entry: dict, dtype: torch.dtype, rows: tuple[int, int], verify: bool) -> torch.Tensor:
    """Rows ``[start, stop)`` of a leaf, from whichever files hold them (one whole file, or sharded pieces)."""
    shape = entry["shape"]
    if "pieces" not in entry:
        return _read(path / entry["file"], entry["sha256"], shape, dtype, verify)[rows[0] : rows[1]]
    parts, covered = [], rows[0]
    for piece in entry["pieces"]:
        first, last = piece["rows"]
        if last <= rows[0] or first >= rows[1]:
            continue
        if first > covered:
            break
        data = _read(path / piece["file"], piece["sha256"], [last - first, *shape[1:]], dtype, verify)
        parts.append(data[max(rows[0], first) - first : min(rows[1], last) - first])
        covered = min(rows[1], last)
    if covered < rows[1]:
        raise CheckpointError(f"{path}: the pieces of a sharded tensor do not cover rows {covered}..{rows[1]}")
    return torch.cat(parts) if parts else torch.empty([0, *shape[1:]], dtype=dtype)


def load_state(
    path: str | os.PathLike, *, verify: bool = True, shards: Callable[[dict, list], ShardLayout] | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """``(state, extra)`` from a checkpoint directory; ``verify`` checks every tensor file's sha256.

    ``shards`` (for a sharded model, `funceng.sharding.checkpoint_shard_layout`) maps the checkpoint's structure
    and full leaf shapes to the leaves this rank loads only its rows of, whatever sharding the checkpoint was
    written with; other leaves are loaded whole.
    """
    path = Path(path)
    meta = read_meta(path)
    layout = shards(meta["structure"], [e["shape"] for e in meta["tensors"]]) if shards else {}
    leaves = []
    for i, entry in enumerate(meta["tensors"]):
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path / entry.get('file', 'meta.json')}: unknown dtype {entry['dtype']!r}")
        shard = layout.get(i)
        if shard is not None:
            leaves.append(_read_rows(path, entry, dtype, (shard.start, shard.start + shard.rows), verify))
        elif "pieces" in entry:
            leaves.append(_read_rows(path, entry, dtype, (0, entry["shape"][0]), verify))
        else:
            leaves.append(_read(path / entry["file"], entry["sha256"], entry["shape"], dtype, verify))
    state = TrainState(tree.unflatten(meta["structure"], leaves), batch_size=[])
    state.lock_()
    return state, meta["extra"]
