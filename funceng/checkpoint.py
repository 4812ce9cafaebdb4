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

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from funceng import background_save, dist, fileio, manifest, tree
from funceng.background_save import PendingSave, wait_for_saves  # noqa: F401 (part of this module's API)
from funceng.errors import CheckpointError
from funceng.finite import finite_flags
from funceng.safetensors_io import DTYPE_CODES, open_regular, read_file, read_verified, write_file
from funceng.sharding import ShardLayout
from funceng.state import TrainState
from funceng.version import __version__

FORMAT = manifest.FORMAT
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle stream; a zip archive (torch.save)
_TEMPORARY = re.compile(r"\.(.+)\.(?:tmp|old)-([0-9]+)(?:-[0-9a-f]{8})?")


# -- saving ----------------------------------------------------------------------------------------------------


def _dtype_name(leaf: torch.Tensor, name: str) -> str:
    if leaf.dtype not in DTYPE_CODES:
        raise CheckpointError(f"cannot save {name}: dtype {leaf.dtype} is not one of {sorted(manifest.DTYPES)}")
    return str(leaf.dtype).removeprefix("torch.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Removes the temporary directories that processes which have died left in ``folder``; returns their
    names."""
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = _TEMPORARY.fullmatch(entry.name)
        if match and int(match.group(2)) != os.getpid() and not _alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _plan(path: Path) -> tuple[str, str, bool]:
    """Where rank 0 has the data files written: ``(folder, file-name token, fresh)``."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save checkpoint {path}: it exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    token = secrets.token_hex(4)
    if path.is_dir():
        return str(path), f"-{token}", False
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}-{token}")
    staging.mkdir()
    return str(staging), "", True


def _io_error(path: Path, exc: OSError) -> CheckpointError:
    name = errno.errorcode.get(exc.errno or 0, "")
    return CheckpointError(
        f"cannot save checkpoint {path}: {exc.strerror or exc} ({name}); its partial files were removed and the "
        "previous checkpoint and last_checkpoint are untouched"
    )


def _write(structure: Any, leaves: list[torch.Tensor], path: Path, extra: dict, shards: ShardLayout | None) -> Path:
    sharded = bool(shards) and dist.get_world_size() > 1
    rank = dist.get_rank() if sharded else 0
    names = tree.leaf_paths(structure)
    if len(set(names)) != len(names):
        raise CheckpointError(f"cannot save checkpoint {path}: two tensors have the same key path")
    plan = _plan(path) if rank == 0 else None
    folder, token, fresh = dist.broadcast_object(plan) if sharded else plan
    folder = Path(folder)
    file = f"state{token}{f'.rank{rank}' if sharded else ''}.safetensors"
    mine: dict[str, torch.Tensor] = {}
    entries: dict[int, dict[str, Any]] = {}
    for i, (name, leaf) in enumerate(zip(names, leaves)):
        shard = shards.get(i) if sharded else None
        entry = {"name": name, "dtype": _dtype_name(leaf, name)}
        if shard is None or shard.shape[0] == 0:  # unsharded (or empty: no rank holds a row of it)
            if rank == 0:
                mine[name], entries[i] = leaf, {**entry, "shape": list(leaf.shape), "file": file}
        elif shard.rows:
            piece = {"file": file, "rows": [shard.start, shard.start + shard.rows]}
            mine[name], entries[i] = leaf, {**entry, "shape": list(shard.shape), "pieces": [piece]}
    files, error = {}, None
    try:
        if mine or rank == 0:
            size, sha256 = write_file(folder / file, mine)
            files[file] = {"size": size, "sha256": sha256}
    except OSError as exc:
        error = exc
    parts = dist.gather_objects((entries, files, error and str(error))) if sharded else [(entries, files, None)]
    failed = error is not None or any(part[2] for part in parts)
    if not failed and rank == 0:
        try:
            _publish(folder, path, _manifest(structure, names, parts, extra), fresh)
        except OSError as exc:
            error, failed = exc, True
    if sharded:
        failed = any(dist.gather_objects(failed))  # no rank goes on (or exits) before the checkpoint is in place
    if failed:
        if rank == 0 and fresh:
            shutil.rmtree(folder, ignore_errors=True)
        elif not fresh:
            (folder / file).unlink(missing_ok=True)
            (folder / f".{manifest.NAME}.tmp-{os.getpid()}").unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _io_error(path, error) from error
        raise CheckpointError(f"cannot save checkpoint {path}: another rank failed to write its part")
    return path


def _manifest(structure: Any, names: list[str], parts: list, extra: dict) -> dict[str, Any]:
    entries: dict[int, dict] = {}
    files: dict[str, dict] = {}
    for part_entries, part_files, _ in parts:
        files.update(part_files)
        for i, entry in part_entries.items():
            if i in entries and "pieces" in entry:
                entries[i]["pieces"] = sorted(entries[i]["pieces"] + entry["pieces"], key=lambda p: p["rows"])
            else:
                entries[i] = entry
    return {
        "format": FORMAT,
        "versions": {"funceng": __version__, "torch": torch.__version__},
        "structure": structure,
        "tensors": [entries[i] for i in range(len(names))],
        "files": files,
        "extra": extra,
    }


def _publish(folder: Path, path: Path, meta: dict, fresh: bool) -> None:
    """Makes the written data files a checkpoint with one rename: of the staging folder (a new checkpoint) or of
    the new manifest over the old one; then removes what the old manifest alone referred to."""
    body = manifest.dump(meta)
    if fresh:
        fileio.write_durably(folder / manifest.NAME, body)
        fileio.fsync_dir(folder)
        os.rename(folder, path)
        fileio.fsync_dir(path.parent)
        return
    fileio.replace_atomically(path / manifest.NAME, body)
    for entry in path.iterdir():
        stale = manifest.DATA_FILE.fullmatch(entry.name) and entry.name not in meta["files"]
        if stale or entry.name in (manifest.LEGACY_NAME, "tensors") or _TEMPORARY.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _refuse_nonfinite(state: TrainState, path: Path) -> None:
    named = [
        (f"{part}/{name}", t)
        for part in ("params", "buffers")
        if part in state.keys()
        for name, t in state[part].items()
    ]
    if not named:
        return
    flags = finite_flags([t for _, t in named]).tolist()
    if not all(flags):
        bad = named[flags.index(False)][0]
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
        _write(structure, leaves, path, extra, shards)
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
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)


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


def load_state(
    path: str | os.PathLike, *, verify: bool = True, shards: Callable[[dict, list], ShardLayout] | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """``(state, extra)`` from a checkpoint directory; ``verify`` checks every file's sha256.

    ``shards`` (for a sharded model, `funceng.sharding.checkpoint_shard_layout`) maps the checkpoint's structure
    and full leaf shapes to the leaves this rank loads only its rows of, whatever sharding the checkpoint was
    written with; other leaves are loaded whole.
    """
    path = Path(path)
    meta = read_manifest(path)
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
    return state, meta["extra"]
