"""safetensors files, written durably with their sha256 and read back bounded and verified.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON (``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the tensors' bytes, which the header's offsets must tile exactly. Any tool that reads safetensors reads
these files, and `read_file` reads theirs.

Writing streams each tensor's bytes to the file while a second thread hashes them (hashing and writing both
release the GIL), then fsyncs: a checkpoint costs about what the bytes cost to write. Reading checks the file
before trusting any of it: a regular file (no FIFO, device or symlink), of the expected size, whose header is
bounded, well formed and accounts for every byte; every tensor's dtype and shape must agree with its byte range.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import stat
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from funceng.errors import CheckpointError

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
_CHUNK = 8 * 2**20  # bytes hashed at a time, so hashing overlaps reading and writing


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in C order, without a copy when it is a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], bytes]:
    """The order of the tensors in the file (widest dtype first, so every tensor is aligned to its element size
    after the 8-byte aligned header) and the padded header."""
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise CheckpointError(f"cannot save {name!r}: dtype {tensor.dtype} has no safetensors code")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return order, struct.pack("<Q", len(text)) + text


class _Hasher(threading.Thread):
    """sha256 of the chunks put into it, computed on its own thread."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.digest = hashlib.sha256()
        self.chunks: queue.Queue = queue.Queue()  # views of memory that exists anyway: no copies queue up

    def run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.digest.update(chunk)

    def hexdigest(self) -> str:
        self.chunks.put(None)
        self.join()
        return self.digest.hexdigest()


def _chunks(data: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(data), _CHUNK):
        yield data[start : start + _CHUNK]


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> tuple[int, str]:
    """Writes ``tensors`` to the safetensors file ``path`` and fsyncs it; returns its size and sha256 (hex)."""
    order, header = _layout(tensors)
    hasher = _Hasher()
    hasher.start()
    size = 0
    try:
        with open(path, "wb") as f:  # buffered: write() writes every byte
            for piece in [memoryview(header), *(tensor_bytes(tensors[name]) for name in order)]:
                for chunk in _chunks(piece):
                    hasher.chunks.put(chunk)
                    f.write(chunk)
                    size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    finally:
        digest = hasher.hexdigest()
    return size, digest


@contextmanager
def open_regular(path: Path, where: str, max_bytes: int | None = None) -> Iterator[tuple[BinaryIO, int]]:
    """``(file, size)`` for a regular file at ``path`` that is not a symlink, opened without blocking (a FIFO
    cannot stall the open) and refused before any read if it is anything else or larger than ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path} is missing") from None
    except OSError as exc:  # ELOOP: a symlink; EACCES; ENXIO: a socket
        raise CheckpointError(f"{where}: cannot open {path} as a regular file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{where}: {path} is not a regular file (a device, FIFO or directory); refused")
        if max_bytes is not None and info.st_size > max_bytes:
            raise CheckpointError(f"{where}: {path} is {info.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", buffering=0) as f:
            fd = -1
            yield f, info.st_size
    finally:
        if fd >= 0:
            os.close(fd)


def _fill(f: BinaryIO, views: list[memoryview], sha256: str | None, where: str, already: bytes = b"") -> None:
    """Fills each of ``views`` from ``f`` in turn, hashing ``already`` (bytes read before) and every chunk on a
    second thread as it arrives; then checks the digest against ``sha256`` (when given)."""
    hasher = _Hasher() if sha256 is not None else None
    if hasher is not None:
        hasher.start()
        hasher.chunks.put(already)
    try:
        for view in views:
            for start in range(0, len(view), _CHUNK):
                chunk, filled = view[start : start + _CHUNK], 0
                while filled < len(chunk):
                    got = f.readinto(chunk[filled:])
                    if not got:
                        raise CheckpointError(f"{where}: the file ended early (it is changing?)")
                    filled += got
                if hasher is not None:
                    hasher.chunks.put(chunk)
    finally:
        digest = hasher.hexdigest() if hasher is not None else None
    if digest is not None and digest != sha256:
        raise CheckpointError(f"{where}: the sha256 of its bytes does not match the manifest's: corrupt or altered")


def read_verified(f: BinaryIO, size: int, sha256: str | None, where: str) -> torch.Tensor:
    """All ``size`` bytes of ``f`` as a uint8 tensor, hashed while they are read; checked against ``sha256`` when
    given."""
    data = torch.empty(size, dtype=torch.uint8)  # not zero-filled: every byte is read into it
    _fill(f, [memoryview(data.numpy()).cast("B")] if size else [], sha256, where)
    return data


def check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 64:
        raise CheckpointError(f"{where}: shape must be a list of at most 64 sizes, got {shape!r:.80}")
    if not all(type(n) is int and 0 <= n < 2**62 for n in shape):
        raise CheckpointError(f"{where}: shape must hold non-negative ints, got {shape!r:.80}")
    return shape


Entries = dict[str, tuple[torch.dtype, list[int], int, int]]


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """The header length the first 8 bytes of a file of ``file_size`` bytes give, checked to fit."""
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: {file_size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if not 2 <= length <= min(MAX_HEADER_BYTES, file_size - 8):
        raise CheckpointError(f"{where}: header length {length} does not fit the file's {file_size} bytes")
    return length


def parse_header(data: memoryview, where: str, file_size: int | None = None) -> tuple[Entries, int]:
    """``({name: (dtype, shape, begin, end)}, data_start)`` from a safetensors file's bytes (or its first bytes,
    up to the end of the header, and the file's size), with every field checked: sizes, types, dtype codes,
    shapes against byte counts, and offsets that tile the data exactly."""
    file_size = len(data) if file_size is None else file_size
    length = header_length(bytes(data[:8]), file_size, where)
    try:
        header = json.loads(bytes(data[8 : 8 + length]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: the safetensors header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    entries, spans = {}, []
    for name, entry in header.items():
        field = f"{where}: tensor {name!r:.80}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{field} must have exactly dtype, shape and data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{field}: unsupported dtype {entry['dtype']!r:.40}")
        shape = check_shape(entry["shape"], f"{field}.shape")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{field}.data_offsets must be a pair of ints, got {offsets!r:.80}")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{field}: data_offsets {offsets} do not hold a {entry['dtype']} tensor of {shape}")
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{where}: tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if 8 + length + position != file_size:
        raise CheckpointError(f"{where}: the header accounts for {8 + length + position} of {file_size} bytes")
    return entries, 8 + length


def _tensor_at(data: torch.Tensor, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    raw = data[begin:end]
    if begin % dtype.itemsize:  # not aligned (another writer's file): copy
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def read_file(
    path: Path, where: str, size: int | None = None, sha256: str | None = None, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, after checking that it is a regular file of ``size`` bytes
    (when given) and at most ``max_bytes``, and its sha256 (when given). The tensors share one buffer."""
    with open_regular(path, where, max_bytes) as (f, actual):
        if size is not None and actual != size:
            raise CheckpointError(f"{where} is {actual} bytes, the manifest says {size}")
        data = read_verified(f, actual, sha256, where)
    entries, start = parse_header(memoryview(data.numpy()).cast("B") if actual else memoryview(b""), where)
    return {
        name: _tensor_at(data, dtype, shape, start + begin, start + end)
        for name, (dtype, shape, begin, end) in entries.items()
    }


def read_into(path: Path, where: str, size: int, sha256: str | None, targets: Mapping[str, torch.Tensor]) -> None:
    """Reads the safetensors file ``path`` straight into ``targets`` (contiguous CPU tensors, by name, of the
    file's dtypes and shapes: every tensor of the file must have one), with the checks of `read_file`. No memory is
    allocated for the data, which makes this several times faster than a fresh load. If the file turns out
    corrupt, the targets already written hold part of it: the caller must not use them then."""
    with open_regular(path, where) as (f, actual):
        if actual != size:
            raise CheckpointError(f"{where} is {actual} bytes, the manifest says {size}")
        prefix = f.read(8)
        head = prefix + f.read(header_length(prefix, actual, where))
        entries, _ = parse_header(memoryview(head), where, actual)
        for name, (dtype, shape, _, _) in entries.items():
            target = targets.get(name)
            if target is None or target.dtype != dtype or list(target.shape) != shape:
                found = "nothing" if target is None else f"{target.dtype} {list(target.shape)}"
                raise CheckpointError(f"{where} holds {dtype} {shape} under {name!r:.80}; this state has {found}")
        ordered = sorted(entries, key=lambda name: entries[name][2])
        _fill(f, [tensor_bytes(targets[name]) for name in ordered], sha256, where, already=head)
