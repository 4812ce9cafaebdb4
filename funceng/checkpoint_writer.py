"""Writing a checkpoint directory and publishing it with one rename (`funceng.checkpoint` documents the layout).

A new checkpoint is written into ``.<name>.tmp-<pid>-<token>`` and renamed to ``<name>``; over an existing one,
the data goes into files of a fresh name inside it and the new manifest is renamed over the old one. Temporary
directories of dead processes are removed first; a failed write removes its partial files and names the
checkpoint. With a sharded state every rank writes its own file and rank 0 the manifest.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from funceng import dist, fileio, manifest, tree
from funceng.errors import CheckpointError
from funceng.safetensors_io import DTYPE_CODES, write_file
from funceng.sharding import ShardLayout
from funceng.version import __version__

_TEMPORARY = re.compile(r"\.(.+)\.(?:tmp|old)-([0-9]+)(?:-[0-9a-f]{8})?")


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


def write(structure: Any, leaves: list[torch.Tensor], path: Path, extra: dict, shards: ShardLayout | None) -> Path:
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
        "format": manifest.FORMAT,
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
