"""A checkpoint's manifest: the JSON that says what the state is and where its bytes are, checked field by field.

``manifest.json`` (format ``funceng.checkpoint/2``) holds the state's structure (its nesting, each tensor
replaced by its index), one entry per tensor (its key path, dtype, shape, and the safetensors file that holds
it, or for a sharded state the files that hold its rows), every file's size and sha256, the caller's ``extra``
metadata, and ``manifest_sha256``: the sha256 of the manifest itself (of its canonical JSON without that field),
so an edit of the manifest is caught like an edit of a tensor file.

`parse` refuses anything that is not exactly such a manifest with a `CheckpointError` naming the checkpoint
and the field. `parse_legacy` reads format 1's ``meta.json`` (one raw file per tensor, no manifest checksum),
which funceng 0.3 still loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from funceng import tree
from funceng.errors import CheckpointError
from funceng.safetensors_io import DTYPE_CODES, check_shape, open_regular

FORMAT = "funceng.checkpoint/2"
LEGACY_FORMAT = "funceng.checkpoint/1"
NAME = "manifest.json"
LEGACY_NAME = "meta.json"
MAX_BYTES = 64 * 2**20  # a manifest is structure and metadata: kilobytes, megabytes for huge states
MAX_DEPTH = 64  # nesting of the state's structure
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in DTYPE_CODES}
DATA_FILE = re.compile(r"state(-[0-9a-f]{8})?(\.rank[0-9]{1,6})?\.safetensors")
LEGACY_FILE = re.compile(r"tensors/[0-9]{1,9}(\.[0-9]{1,19})?\.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def canonical_sha256(manifest: dict[str, Any]) -> str:
    """The sha256 of ``manifest``'s canonical JSON, ``manifest_sha256`` left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dump(manifest: dict[str, Any]) -> bytes:
    """The manifest's file contents, ``manifest_sha256`` included."""
    return json.dumps({**manifest, "manifest_sha256": canonical_sha256(manifest)}, indent=1).encode()


def read_json(file: Path, where: str) -> Any:
    """The JSON in ``file`` (a bounded regular file), or a `CheckpointError` saying what is wrong with it."""
    with open_regular(file, where, MAX_BYTES) as (f, _):
        data = f.read(MAX_BYTES + 1)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: {file.name} is not valid JSON ({type(exc).__name__}: {exc})") from None


def _field(value: Any, kind: type | tuple[type, ...], where: str, name: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(f"{where}: field {name} must be a {expected}, got {type(value).__name__}")
    return value


def _get(mapping: dict, key: str, kind: type | tuple[type, ...], where: str, prefix: str = "") -> Any:
    if key not in mapping:
        raise CheckpointError(f"{where}: field {prefix}{key} is missing")
    return _field(mapping[key], kind, where, prefix + key)


def check_structure(structure: Any, count: int, where: str) -> list[str]:
    """The key path of each leaf of ``structure``, after checking that it is nested dicts whose leaves are the
    indices ``0..count-1``, each once, at most `MAX_DEPTH` deep."""
    seen: set[int] = set()
    stack = [(structure, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{where}: field structure is nested more than {MAX_DEPTH} deep")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif type(node) is int and 0 <= node < count and node not in seen and depth > 0:
            seen.add(node)
        else:
            raise CheckpointError(f"{where}: field structure holds {node!r:.40}; expected dicts of tensor indices")
    if len(seen) != count:
        raise CheckpointError(f"{where}: field structure names {len(seen)} tensors, field tensors lists {count}")
    return tree.leaf_paths(structure)


def _rows(value: Any, first_dim: int, where: str, name: str) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
    if not ok or not 0 <= value[0] < value[1] <= first_dim:
        raise CheckpointError(
            f"{where}: field {name} must be a pair [start, stop) in 0..{first_dim}: got {value!r:.60}"
        )
    return value[0], value[1]


def _tensor_entry(entry: Any, i: int, path: str, files: dict, pattern: re.Pattern, where: str, legacy: bool) -> dict:
    name = f"tensors[{i}]"
    _field(entry, dict, where, name)
    if not legacy and _get(entry, "name", str, where, f"{name}.") != path:
        raise CheckpointError(f"{where}: field {name}.name is {entry['name']!r:.80}, the structure says {path!r:.80}")
    dtype_name = _get(entry, "dtype", str, where, f"{name}.")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"{where}: field {name}.dtype {dtype_name!r:.40} is not one of {sorted(DTYPES)}")
    shape = check_shape(_get(entry, "shape", list, where, f"{name}."), f"{where}: field {name}.shape")
    checked: dict[str, Any] = {"name": path, "dtype": DTYPES[dtype_name], "shape": shape}

    def file_name(holder: dict, prefix: str) -> str:
        file = _get(holder, "file", str, where, prefix)
        if not pattern.fullmatch(file):
            raise CheckpointError(f"{where}: field {prefix}file {file!r:.80} is not a data file of this checkpoint")
        if legacy:
            files.setdefault(file, {"sha256": _sha(holder, where, prefix)})
        elif file not in files:
            raise CheckpointError(f"{where}: field {prefix}file {file!r:.80} is not listed in field files")
        return file

    if "pieces" in entry:
        if not shape:
            raise CheckpointError(f"{where}: field {name}.pieces: a 0-d tensor cannot be split into rows")
        pieces, position = [], 0
        for j, piece in enumerate(_get(entry, "pieces", list, where, f"{name}.")):
            prefix = f"{name}.pieces[{j}]."
            _field(piece, dict, where, prefix[:-1])
            start, stop = _rows(piece.get("rows"), shape[0], where, f"{prefix}rows")
            if start < position:
                raise CheckpointError(f"{where}: field {prefix}rows overlaps the piece before it")
            pieces.append({"file": file_name(piece, prefix), "rows": (start, stop)})
            position = stop
        checked["pieces"] = pieces
    else:
        checked["file"] = file_name(entry, f"{name}.")
    return checked


def _sha(holder: dict, where: str, prefix: str) -> str:
    digest = _get(holder, "sha256", str, where, prefix)
    if not _SHA256.fullmatch(digest):
        raise CheckpointError(f"{where}: field {prefix}sha256 is not a sha256 hex digest")
    return digest


def _common(meta: Any, where: str, expected_format: str) -> tuple[list[str], list]:
    _field(meta, dict, where, "(the manifest)")
    found = _get(meta, "format", str, where)
    if found != expected_format:
        raise CheckpointError(f"{where}: unknown format {found!r:.60}; this funceng reads {FORMAT} and {LEGACY_FORMAT}")
    _get(meta, "extra", dict, where)
    _get(meta, "versions", dict, where)
    tensors = _get(meta, "tensors", list, where)
    return check_structure(meta.get("structure"), len(tensors), where), tensors


def parse(meta: Any, where: str) -> dict[str, Any]:
    """A format-2 manifest, checked: its own sha256, every field's type, file names inside the checkpoint, and
    tensor entries that agree with the structure. Returns ``{"structure", "tensors", "files", "extra"}``."""
    if isinstance(meta, dict) and meta.get("manifest_sha256") != canonical_sha256(meta):
        raise CheckpointError(f"{where}: the manifest's own sha256 does not match its contents: it was altered")
    paths, tensors = _common(meta, where, FORMAT)
    files = {}
    for file, info in _get(meta, "files", dict, where).items():
        if not DATA_FILE.fullmatch(file):
            raise CheckpointError(f"{where}: field files names {file!r:.80}, which is not a data file name")
        _field(info, dict, where, f"files[{file!r}]")
        size = _get(info, "size", int, where, f"files[{file!r}].")
        if size < 0:
            raise CheckpointError(f"{where}: field files[{file!r}].size is negative")
        files[file] = {"size": size, "sha256": _sha(info, where, f"files[{file!r}].")}
    entries = [_tensor_entry(e, i, paths[i], files, DATA_FILE, where, False) for i, e in enumerate(tensors)]
    return {key: meta[key] for key in ("structure", "versions", "extra")} | {"tensors": entries, "files": files}


def parse_legacy(meta: Any, where: str) -> dict[str, Any]:
    """Format 1's ``meta.json``, checked as `parse` checks a manifest (it has no checksum of its own)."""
    paths, tensors = _common(meta, where, LEGACY_FORMAT)
    files: dict[str, dict] = {}
    entries = [_tensor_entry(e, i, paths[i], files, LEGACY_FILE, where, True) for i, e in enumerate(tensors)]
    return {key: meta[key] for key in ("structure", "versions", "extra")} | {"tensors": entries, "files": files}


def nbytes(entry: dict[str, Any], rows: tuple[int, int] | None = None) -> int:
    """Bytes of a tensor entry (or of its rows ``[start, stop)``)."""
    shape = list(entry["shape"])
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=entry["dtype"]).element_size()
