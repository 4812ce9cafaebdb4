"""Checkpoints that *are* the TrainState: one safetensors file and a JSON manifest, never a pickle.

Layout of a checkpoint directory::

    <name>/manifest.json          format, versions, the state's structure, each tensor's name/dtype/shape/file,
                                  each file's size and sha256, the caller's ``extra`` metadata (epoch, RNG
                                  states, ...) and the sha256 of the manifest itself (`funceng.manifest`)
    <name>/state.safetensors      every tensor, keyed by its path in the state ("params/fc.weight"): any
                                  safetensors reader opens it
    <name>/state.rank<r>.safetensors   for a sharded state (`funceng.sharding`): the rows rank r held

A checkpoint does not depend on the number of ranks that wrote it: any run loads it whole, or any rank just
the rows of its own shard.

**Publishing** is one rename. A new checkpoint is written into ``.<name>.tmp-<pid>-<token>``, fsynced and renamed
to ``<name>``; over an existing one, the new data goes into a file of a fresh name inside it and the new
manifest is renamed over the old, so ``<name>`` never disappears and a crash at any moment leaves the old
checkpoint or the new one. Temporary directories of dead processes are removed at the next save; a failed
write (a full disk) removes its partial files and says which checkpoint it was.

**Loading** trusts nothing: the manifest's own sha256, every field, every file (regular, inside the
checkpoint, of the recorded size, before reading a byte), every file's sha256, and each tensor's dtype and
shape against the safetensors header. Anything wrong is a `CheckpointError` naming the checkpoint and the field.
Format 1 (``meta.json`` and raw ``tensors/<i>.bin`` files, funceng 0.2) is still read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from funceng import background_save, checkpoint_writer, dist, manifest, tree
from funceng.background_save import PendingSave, wait_for_saves  # noqa: F401 (part of this module's API)
from funceng.checkpoint_writer import remove_stale_temporaries  # noqa: F401 (part of this module's API)
from funceng.errors import CheckpointError
from funceng.finite import first_nonfinite
from funceng.safetensors_io import open_regular, read_file, read_into, read_verified
from funceng.sharding import ShardLayout
from funceng.state import TrainState

FORMAT = manifest.FORMAT
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle stream; a zip archive (torch.save)


# -- saving ----------------------------------------------------------------------------------------------------


def _refuse_nonfinite(state: TrainState, path: Path) -> None:
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(
            f"refusing to save checkpoint {path}: {bad} holds NaN or infinite values (a state that cannot train "
            "on); pass allow_nonfinite=True to save it anyway"
        )


def save_state(
    state: TrainState,
    path: str | os.PathLike,
    *,
    extra: dict[str, Any] | None = None,
    shards: ShardLayout | None = None,
    blocking: bool = True,
    on_saved: Callable[[Path], None] | None = None,
    allow_nonfinite: bool = False,
) -> Path | background_save.PendingSave:
    """Writes ``state`` (and JSON-serialisable ``extra``) to the checkpoint directory ``path``, published with one
    rename; returns ``path``, or with ``blocking=False`` a `PendingSave` at once.

    ``blocking=False`` copies the state to host memory, then writes it on a background thread while training
    goes on; a second save (or the interpreter's exit) first waits for the one in flight. ``on_saved(path)`` runs
    once the checkpoint is in place (on that thread). With ``shards`` (a sharded state,
    `funceng.sharding.shard_layout`) every rank must call this, blocking: each writes the rows it holds.
    A state whose params or buffers hold a NaN or an infinity is refused unless ``allow_nonfinite``.
    """
    path = Path(path)
    background_save.wait_for_saves()
    structure, leaves = tree.flatten(state)
    if not allow_nonfinite:
        _refuse_nonfinite(state, path)
    extra = dict(extra or {})

    def work(leaves: list[torch.Tensor], event: Any = None) -> Path:
        if event is not None:
            event.synchronize()
        checkpoint_writer.write(structure, leaves, path, extra, shards)
        if on_saved is not None:
            on_saved(path)
        return path

    if blocking:
        return work(leaves)
    if shards and dist.get_world_size() > 1:
        raise CheckpointError(f"cannot save {path} in the background: a sharded state is saved by all ranks together")
    copies, event = background_save.snapshot(leaves)
    return background_save.start(path, lambda: work(copies, event))


# -- loading ---------------------------------------------------------------------------------------------------


def read_pointer(file: Path) -> Path:
    """The checkpoint a pointer file (``last_checkpoint``) names, refusing a file that cannot be one."""
    with open_regular(Path(file), f"pointer {file}", 64 * 1024) as (f, _):
        data = f.read()
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"pointer {file} is not UTF-8 text: it cannot name a checkpoint") from None
    if not text or "\0" in text or "\n" in text:
        raise CheckpointError(f"pointer {file} must hold one path, got {text[:80]!r}")
    return Path(text)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's checked manifest (`funceng.manifest.parse`: ``structure``, ``tensors``, ``files``,
    ``extra``, and ``format``); refuses anything else, a pickle above all, with a clear error."""
    path = Path(path)
    where = f"checkpoint {path}"
    try:
        path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{where}: {exc.strerror}") from None
    if not path.is_dir():
        with open_regular(path, where) as (f, _):
            head = f.read(4)
        kind = "a pickle / torch.save file" if head.startswith(_PICKLE_MAGIC) else "a file"
        raise CheckpointError(
            f"{path} is {kind}, not a funceng checkpoint directory; funceng never unpickles checkpoints "
            "(that could run arbitrary code), so it refuses to load it"
        )
    if os.path.lexists(path / manifest.NAME):
        meta = manifest.parse(manifest.read_json(path / manifest.NAME, where), where)
        return {**meta, "format": manifest.FORMAT}
    if os.path.lexists(path / manifest.LEGACY_NAME):
        if os.path.islink(path / "tensors"):
            raise CheckpointError(f"{where}: tensors/ is a symlink; refused")
        meta = manifest.parse_legacy(manifest.read_json(path / manifest.LEGACY_NAME, where), where)
        return {**meta, "format": manifest.LEGACY_FORMAT}
    raise CheckpointError(f"{where}: {manifest.NAME} is missing: not a complete funceng checkpoint")


read_meta = read_manifest  # funceng 0.2's name


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Files:
    """The data files of one checkpoint, each read (and verified) once, when first needed."""

    def __init__(self, path: Path, meta: dict[str, Any], verify: bool):
        self.path, self.meta, self.verify = path, meta, verify
        self.where = f"checkpoint {path}"
        self.read: dict[str, Any] = {}

    def tensor(self, entry: dict[str, Any], file: str, shape: list[int]) -> torch.Tensor:
        info = self.meta["files"][file]
        if self.meta["format"] == manifest.LEGACY_FORMAT:
            return self._raw(file, info, shape, entry["dtype"])
        if file not in self.read:
            sha256 = info["sha256"] if self.verify else None
            self.read[file] = read_file(self.path / file, f"{self.where}: {file}", info["size"], sha256)
        tensor = self.read[file].get(entry["name"])
        if tensor is None or tensor.dtype != entry["dtype"] or list(tensor.shape) != list(shape):
            found = "nothing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
            raise CheckpointError(
                f"{self.where}: {file} holds {found} under {entry['name']!r}; the manifest says "
                f"{entry['dtype']} {list(shape)}"
            )
        return tensor

    def _raw(self, file: str, info: dict, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        expected = manifest.nbytes({"shape": shape, "dtype": dtype})
        where = f"{self.where}: {file}"
        with open_regular(self.path / file, where) as (f, size):
            if size != expected:
                raise CheckpointError(f"{where} is truncated or corrupt: {size} bytes, expected {expected}")
            data = read_verified(f, size, info["sha256"] if self.verify else None, where)
        return data.view(dtype).reshape(shape)


def _rows(files: _Files, entry: dict, rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``[start, stop)`` of a leaf, from whichever files hold them."""
    shape = entry["shape"]
    if "pieces" not in entry:
        return files.tensor(entry, entry["file"], shape)[rows[0] : rows[1]]
    parts, covered = [], rows[0]
    for piece in entry["pieces"]:
        first, last = piece["rows"]
        if last <= rows[0] or first >= rows[1]:
            continue
        if first > covered:
            break
        data = files.tensor(entry, piece["file"], [last - first, *shape[1:]])
        parts.append(data[max(rows[0], first) - first : min(rows[1], last) - first])
        covered = min(rows[1], last)
    if covered < rows[1]:
        raise CheckpointError(f"{files.where}: the pieces of {entry['name']!r} do not cover rows {covered}..{rows[1]}")
    return torch.cat(parts) if parts else torch.empty([0, *shape[1:]], dtype=entry["dtype"])


def check_fits(meta: dict[str, Any], state: TrainState, where: str, shapes: bool = True) -> None:
    """Refuses, before any tensor is read, a checkpoint (its `read_manifest`) whose structure, dtypes or (with
    ``shapes``) shapes differ from ``state``'s."""
    structure, leaves = tree.flatten(state)
    if meta["structure"] != structure:
        raise CheckpointError(
            f"{where}: the checkpoint's state does not match this run's model and optimizer: "
            f"{tree.describe_difference(structure, meta['structure'])}"
        )
    for entry, leaf in zip(meta["tensors"], leaves):
        if entry["dtype"] != leaf.dtype or (shapes and list(entry["shape"]) != list(leaf.shape)):
            raise CheckpointError(
                f"{where}: {entry['name']} is {entry['dtype']} {list(entry['shape'])} in the checkpoint, "
                f"{leaf.dtype} {list(leaf.shape)} in this run"
            )


def _load_into(path: Path, meta: dict[str, Any], into: TrainState, verify: bool) -> bool:
    """Reads a format-2, unsharded checkpoint straight into ``into``'s tensors; ``False`` (nothing read) when
    ``into`` cannot take it that way (format 1, a sharded checkpoint, a GPU or non-contiguous tensor)."""
    leaves = tree.leaves(into)
    usable = meta["format"] == manifest.FORMAT and all(
        leaf.device.type == "cpu" and leaf.is_contiguous() for leaf in leaves
    )
    if not usable or any("pieces" in entry for entry in meta["tensors"]):
        return False
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for entry, leaf in zip(meta["tensors"], leaves):
        by_file.setdefault(entry["file"], {})[entry["name"]] = leaf
    for file, targets in by_file.items():
        info = meta["files"][file]
        sha256 = info["sha256"] if verify else None
        read_into(path / file, f"checkpoint {path}: {file}", info["size"], sha256, targets)
    return True


def load_state(
    path: str | os.PathLike,
    *,
    verify: bool = True,
    shards: Callable[[dict, list], ShardLayout] | None = None,
    into: TrainState | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """``(state, extra)`` from a checkpoint directory; ``verify`` checks every file's sha256.

    ``shards`` (for a sharded model, `funceng.sharding.checkpoint_shard_layout`) maps the checkpoint's structure
    and full leaf shapes to the leaves this rank loads only its rows of, whatever sharding the checkpoint was
    written with; other leaves are loaded whole. ``into``: a state of the same structure, shapes and dtypes
    (the run's own, when resuming) that the checkpoint is copied into and returned; a CPU state is read into
    directly, without allocating memory for the data. If loading fails, ``into`` may hold part of the checkpoint.
    """
    path = Path(path)
    meta = read_manifest(path)
    if into is not None:
        check_fits(meta, into, f"checkpoint {path}", shapes=not shards)
        if not shards and _load_into(path, meta, into, verify):
            return into, meta["extra"]
    layout = shards(meta["structure"], [e["shape"] for e in meta["tensors"]]) if shards else {}
    needed = sum(manifest.nbytes(e) for e in meta["tensors"])
    available = available_memory()
    if available is not None and needed > available:
        raise CheckpointError(f"checkpoint {path}: its tensors need {needed} bytes, more than the {available} free")
    files = _Files(path, meta, verify)
    leaves = []
    for i, entry in enumerate(meta["tensors"]):
        shard = layout.get(i)
        if shard is not None:
            leaves.append(_rows(files, entry, (shard.start, shard.start + shard.rows)))
        elif "pieces" in entry:
            leaves.append(_rows(files, entry, (0, entry["shape"][0])))
        else:
            leaves.append(files.tensor(entry, entry["file"], entry["shape"]))
    state = TrainState(tree.unflatten(meta["structure"], leaves), batch_size=[])
    state.lock_()
    if into is not None:
        into.update_(state)
        return into, meta["extra"]
    return state, meta["extra"]
