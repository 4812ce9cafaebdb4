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
_CHUNK = 64 * 2**20  # bytes hashed at a time, so hashing overlaps writing


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
        self.chunks: queue.Queue = queue.Queue(maxsize=4)

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


def read_verified(f: BinaryIO, size: int, sha256: str | None, where: str) -> bytearray:
    """All ``size`` bytes of ``f``, hashed while they are read; checked against ``sha256`` when given."""
    data = bytearray(size)
    view = memoryview(data)
    hasher = _Hasher() if sha256 is not None else None
    if hasher is not None:
        hasher.start()
    done = 0
    try:
        while done < size:
            got = f.readinto(view[done : done + _CHUNK])
            if not got:
                raise CheckpointError(f"{where}: the file ended after {done} of its {size} bytes (it is changing?)")
            if hasher is not None:
                hasher.chunks.put(view[done : done + got])
            done += got
    finally:
        digest = hasher.hexdigest() if hasher is not None else None
    if digest is not None and digest != sha256:
        raise CheckpointError(f"{where}: the sha256 of its bytes does not match the manifest's: corrupt or altered")
    return data


def check_shape(shape: Any, where: str) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 64:
        raise CheckpointError(f"{where}: shape must be a list of at most 64 sizes, got {shape!r:.80}")
    if not all(type(n) is int and 0 <= n < 2**62 for n in shape):
        raise CheckpointError(f"{where}: shape must hold non-negative ints, got {shape!r:.80}")
    return shape


def parse_header(data: bytes | bytearray, where: str) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """``({name: (dtype, shape, begin, end)}, data_start)`` from a safetensors file's bytes, with every field
    checked: sizes, types, dtype codes, shapes against byte counts, and offsets that tile the data exactly."""
    if len(data) < 8:
        raise CheckpointError(f"{where}: {len(data)} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    if not 2 <= length <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"{where}: header length {length} does not fit the file's {len(data)} bytes")
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
    if 8 + length + position != len(data):
        raise CheckpointError(f"{where}: the header accounts for {8 + length + position} of {len(data)} bytes")
    return entries, 8 + length


def _tensor_at(data: bytearray, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    if begin % dtype.itemsize:  # not aligned (another writer's file): copy
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin).clone()
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).reshape(shape)


def read_file(
    path: Path, where: str, size: int | None = None, sha256: str | None = None, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, after checking that it is a regular file of ``size`` bytes
    (when given) and at most ``max_bytes``, and its sha256 (when given). The tensors share one buffer."""
    with open_regular(path, where, max_bytes) as (f, actual):
        if size is not None and actual != size:
            raise CheckpointError(f"{where} is {actual} bytes, the manifest says {size}")
        data = read_verified(f, actual, sha256, where)
    entries, start = parse_header(data, where)
    return {
        name: _tensor_at(data, dtype, shape, start + begin, start + end)
        for name, (dtype, shape, begin, end) in entries.items()
    }
