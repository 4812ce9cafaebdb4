"""The ``funceng`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from funceng import checkpoint as ckpt


def inspect_checkpoint(path: str, out=None) -> int:
    """Prints a checkpoint's step, epoch, tensors and metadata after verifying every checksum; 0 if intact."""
    out = out or sys.stdout
    meta = ckpt.read_meta(path)
    extra = meta.get("extra", {})
    try:
        state, _ = ckpt.load_state(path, verify=True)
        verdict = f"all {len(meta['tensors'])} tensor files match their sha256"
        status = 0
    except ckpt.CheckpointError as exc:
        state, verdict, status = None, f"CORRUPT: {exc}", 1
    print(f"checkpoint: {path}", file=out)
    print(f"format: {meta['format']}  written by funceng {meta['versions']['funceng']}, "
          f"torch {meta['versions']['torch']}", file=out)
    step = int(state["step"]) if state is not None else "?"
    print(f"step: {step}  epoch: {extra.get('epoch')}  iter: {extra.get('iter')}  "
          f"batch in epoch: {extra.get('batch')}  seed: {extra.get('seed')}", file=out)
    print("tensors:", file=out)
    for name, entry in zip(_leaf_names(meta["structure"]), meta["tensors"]):
        print(f"  {name:<60} {str(tuple(entry['shape'])):<20} {entry['dtype']}", file=out)
    shown = {k: v for k, v in extra.items() if k not in ("rng", "rng_epoch_start")}
    print("metadata:", file=out)
    print("  " + json.dumps(shown, indent=2, sort_keys=True).replace("\n", "\n  "), file=out)
    print(f"checksums: {verdict}", file=out)
    return status


def _leaf_names(structure) -> list[str]:
    """Slash-separated key paths of a checkpoint's leaves, in leaf order."""
    names: dict[int, str] = {}

    def walk(node, path):
        if isinstance(node, int):
            names[node] = path
        else:
            for key, value in node.items():
                walk(value, f"{path}/{key}" if path else key)

    walk(structure, "")
    return [names[i] for i in sorted(names)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="funceng", description="funceng: a functional training engine on PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print and verify a checkpoint")
    inspect.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect_checkpoint(args.checkpoint)
    except ckpt.CheckpointError as exc:
        print(f"funceng: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
