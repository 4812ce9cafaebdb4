"""MMEngine's (and plain PyTorch's) ``.pth`` checkpoints: read their weights safely, write a state as one.

Reading never runs code from the file: ``torch.load(weights_only=True)``, or, for a file that holds other objects
too (MMEngine's checkpoints do), an unpickler that builds tensors and containers only (`read_weights`). The
weights are the file's ``state_dict`` entry (MMEngine's layout) or the file itself when it is a plain
``{name: tensor}`` dict; names prefixed ``module.`` (saved from a DDP-wrapped model) are read without the prefix.
Writing produces MMEngine's layout, ``{"meta": ..., "state_dict": {name: tensor}}``, which
``mmengine.runner.load_checkpoint`` and ``torch.load`` read.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from funceng import checkpoint, fileio
from funceng.errors import CheckpointError
from funceng.safetensors_io import MAX_HEADER_BYTES, open_regular, read_file
from funceng.weights import export_state_dict

# what a pickled state_dict needs: tensors and their containers; every other global a file names is skipped
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class Skipped:
    """Stands for an object of a class the file named and funceng did not build: it takes any arguments and
    state and does nothing with them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):  # a skipped function "called" by the pickle
        return Skipped()


class _SkippingUnpickler(pickle.Unpickler):
    skipped: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and name.endswith(("Storage", "float32", "float16", "bfloat16", "float64", "int64")):
            return super().find_class(module, name)
        _SkippingUnpickler.skipped.add(f"{module}.{name}")
        return Skipped


class _SkippingPickleModule:
    """A ``pickle_module`` for ``torch.load`` whose unpickler builds tensors and containers only."""

    __name__ = "funceng_skipping_pickle"
    Unpickler = _SkippingUnpickler
    load = staticmethod(lambda file, **kw: _SkippingUnpickler(file, **kw).load())


def read_weights(path: str | os.PathLike, skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` from a ``.pth`` or ``.safetensors`` file (told apart by their contents), never running
    code from it. Anything but a regular file, or one larger than the free memory, is refused before reading.

    ``torch.load(weights_only=True)`` reads plain weight files. A file holding other objects too (an MMEngine
    checkpoint's message hub, config, numpy RNG state) is read again with an unpickler that builds only tensors
    and containers and replaces every other object by an inert `Skipped`; the names of the skipped classes and
    functions are appended to ``skipped``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: not a file (a funceng checkpoint is a directory; a .pth file is a file)")
    with open_regular(path, f"weights file {path}", checkpoint.available_memory()) as (f, _):
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < MAX_HEADER_BYTES:
        return {_strip_wrapper(k): v for k, v in read_file(path, f"weights file {path}").items()}  # safetensors
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            _SkippingUnpickler.skipped = set()
            loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SkippingPickleModule)
            if skipped is not None:
                skipped.extend(sorted(_SkippingUnpickler.skipped))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    weights = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(
            f"{path}: expected MMEngine's layout (a dict with a 'state_dict' of tensors) or a dict of tensors"
        )
    return {_strip_wrapper(name): tensor for name, tensor in weights.items()}


def _strip_wrapper(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def load_weights(state: Any, path: str | os.PathLike, logger: Any) -> None:
    """Copies the ``.pth`` file's weights into ``state``'s params and buffers, as MMEngine's ``load_from`` does
    (non-strict): names the model lacks, names the file lacks and shapes that differ are each logged as a
    warning naming them, and those entries are left as they are."""
    skipped: list[str] = []
    weights = read_weights(path, skipped)
    if skipped:
        logger.info(f"load_from={path}: read the weights only; objects of {', '.join(skipped)} were not built")
    targets = {**dict(state["params"].items()), **dict(state["buffers"].items())}
    mismatched = []
    with torch.no_grad():
        for name, tensor in weights.items():
            if name in targets:
                if targets[name].shape != tensor.shape:
                    mismatched.append(f"{name}: {tuple(tensor.shape)} in the file, {tuple(targets[name].shape)} here")
                else:
                    targets[name].copy_(tensor)
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    for what, names in (
        ("missing keys in source state_dict", missing),
        ("unexpected key in source state_dict", unexpected),
        ("size mismatch (left unchanged)", mismatched),
    ):
        if names:
            logger.warning(f"load_from={path}: {what}: {', '.join(names)}")


state_dict = export_state_dict  # the weights a .pth file holds


def write_pth(
    state: Any, path: str | os.PathLike, meta: dict[str, Any] | None = None, keys: tuple = ("meta", "state_dict")
) -> Path:
    """Writes ``state``'s weights (and ``meta``) as an MMEngine ``.pth`` file, atomically; returns the path."""
    path = Path(path)
    content = {"meta": dict(meta or {}), "state_dict": state_dict(state)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({k: content[k] for k in keys}, tmp)
    os.replace(tmp, path)
    fileio.fsync_dir(path.parent)
    return path


def _meta(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: extra[k] for k in ("epoch", "iter", "seed", "config") if k in extra}


def convert(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A funceng checkpoint directory ``source`` written as the MMEngine ``.pth`` file ``target``."""
    state, extra = checkpoint.load_state(source)
    return write_pth(state, target, _meta(extra))


def publish(source: Path, keys: list[str]) -> Path:
    """MMEngine's published checkpoint: ``source``'s ``keys`` as ``<source>-<sha256[:8]>.pth`` beside it."""
    state, extra = checkpoint.load_state(source)
    draft = write_pth(state, source.with_name(f"{source.name}.pth"), _meta(extra), tuple(keys))
    digest = hashlib.sha256(draft.read_bytes()).hexdigest()[:8]
    final = source.with_name(f"{source.name}-{digest}.pth")
    os.replace(draft, final)
    return final
