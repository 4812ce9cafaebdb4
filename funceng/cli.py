"""The ``funceng`` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from funceng.errors import CheckpointError, ConfigError, DistributedError, MissingExtraError
from funceng.version import __version__

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # in a source checkout


def inspect_checkpoint(path: str, out=None) -> int:
    """Prints a checkpoint's step, epoch, tensors and metadata after verifying every checksum; 0 if intact.
    Given a work_dir, inspects the checkpoint its ``last_checkpoint`` names."""
    from funceng import checkpoint as ckpt  # torch is imported by the commands that need it, not by --help

    out = out or sys.stdout
    if (Path(path) / "last_checkpoint").exists() and not (Path(path) / "manifest.json").exists():
        target = ckpt.read_pointer(Path(path) / "last_checkpoint")
        print(f"{path}/last_checkpoint -> {target}", file=out)
        path = str(target)
    meta = ckpt.read_manifest(path)
    extra = meta["extra"]
    try:
        state, _ = ckpt.load_state(path, verify=True)
        verdict = f"all {len(meta['files'])} files match their sha256"
        status = 0
    except CheckpointError as exc:
        state, verdict, status = None, f"CORRUPT: {exc}", 1
    print(f"checkpoint: {path}", file=out)
    versions = meta["versions"]
    print(
        f"format: {meta['format']}  written by funceng {versions.get('funceng')}, torch {versions.get('torch')}",
        file=out,
    )
    step = "?"
    if state is not None and "step" in state.keys():
        counts = state["step"].reshape(-1).tolist()  # a population holds one count per member
        step = counts[0] if len(counts) == 1 else f"{counts[0]} ({len(counts)} members)"
    print(
        f"step: {step}  epoch: {extra.get('epoch')}  iter: {extra.get('iter')}  "
        f"batch in epoch: {extra.get('batch')}  seed: {extra.get('seed')}",
        file=out,
    )
    print("files:", file=out)
    for name, info in meta["files"].items():
        print(f"  {name:<40} {info.get('size', '?'):>14} bytes  sha256 {info['sha256'][:16]}...", file=out)
    print("tensors:", file=out)
    for entry in meta["tensors"]:
        dtype = str(entry["dtype"]).removeprefix("torch.")
        print(f"  {entry['name']:<60} {str(tuple(entry['shape'])):<20} {dtype}", file=out)
    shown = {k: v for k, v in extra.items() if k not in ("rng", "rng_epoch_start")}
    print("metadata:", file=out)
    print("  " + json.dumps(shown, indent=2, sort_keys=True).replace("\n", "\n  "), file=out)
    print(f"checksums: {verdict}", file=out)
    return status


def _runner(args: argparse.Namespace, **overrides):
    from funceng.config import Config, apply_cfg_options, load_config, split_variable_options
    from funceng.runner import Runner

    cfg = load_config(args.config)
    runner_args = set(inspect.signature(Runner.__init__).parameters) - {"self"}
    variables, options = split_variable_options(cfg, args.cfg_options or [], runner_args)
    if variables:  # re-read, so that every entry computed from a variable sees its new value
        cfg = load_config(args.config, variables)
    apply_cfg_options(cfg, options, new_top_level=runner_args)
    cfg["work_dir"] = args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    if args.launcher:
        cfg["launcher"] = args.launcher
    cfg.update(overrides)
    return Runner.from_cfg(Config(cfg, filename=Path(args.config).resolve()))


def train(args: argparse.Namespace) -> int:
    with _runner(args, **({"resume": True} if args.resume else {})) as runner:
        runner.train()
    if runner.rank == 0:
        _where(runner)
    return 0


def test(args: argparse.Namespace) -> int:
    with _runner(args, load_from=args.checkpoint, resume=False) as runner:
        metrics = runner.test() if runner.test_dataloader is not None else runner.val()
    if runner.rank == 0:
        print(json.dumps(metrics, indent=2, default=float))
    return 0


def _where(runner) -> None:
    print(f"logs:        {runner.log_dir / (runner.timestamp + '.log')}")
    print(f"scalars:     {runner.log_dir / 'vis_data'}")
    last = runner.work_dir / "last_checkpoint"
    if last.exists():
        print(f"checkpoints: {runner.work_dir} (newest: {last.read_text().strip()})")


def plot(args: argparse.Namespace) -> int:
    from funceng.plot import plot_run

    for path in plot_run(args.work_dir, args.out):
        print(path)
    return 0


def bench(argv: list[str]) -> int:
    """Runs the comparison suite of a source checkout's ``benchmarks/`` (imported only now)."""
    if not (BENCHMARKS / "compare.py").is_file():
        print(
            f"funceng bench: the benchmark suite is not here ({BENCHMARKS}/compare.py): it lives in the "
            "repository's benchmarks/ folder, not in the installed package; run it from a source checkout",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(BENCHMARKS))
    import compare

    compare.main(argv, prog="funceng bench")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="funceng", description="funceng: a functional training engine on PyTorch")
    parser.add_argument("--version", action="version", version=f"funceng {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("train", "train from a config file"), ("test", "evaluate a checkpoint")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("config", help="a Python file of top-level variables (model, train_dataloader, ...)")
        sub.add_argument("--work-dir", help="default: the config's work_dir, else work_dirs/<config name>")
        sub.add_argument(
            "--cfg-options",
            nargs="+",
            metavar="KEY=VALUE",
            help="override config values, e.g. train_cfg.max_epochs=3 optim_wrapper.optimizer.lr=0.1",
        )
        sub.add_argument(
            "--launcher",
            choices=["none", "pytorch"],
            help="'pytorch' under torchrun (detected anyway), e.g. torchrun --nproc_per_node=4 "
            "-m funceng train CONFIG --launcher pytorch",
        )
        if name == "train":
            sub.add_argument("--resume", action="store_true", help="resume from the work_dir's last checkpoint")
        else:
            sub.add_argument("--checkpoint", required=True, help="a funceng checkpoint directory")
    inspect_cmd = commands.add_parser("inspect", help="print and verify a checkpoint")
    inspect_cmd.add_argument("checkpoint", help="a checkpoint directory, or a work_dir (its last_checkpoint)")
    convert_cmd = commands.add_parser("convert", help="write a funceng checkpoint as an MMEngine .pth file")
    convert_cmd.add_argument("checkpoint", help="a funceng checkpoint directory")
    convert_cmd.add_argument("out", help="the .pth file to write ({'meta': ..., 'state_dict': ...})")
    plot_cmd = commands.add_parser("plot", help="render loss, lr and metric curves of a work_dir to PNG")
    plot_cmd.add_argument("work_dir")
    plot_cmd.add_argument("--out", help="output folder (default: <run>/plots)")
    commands.add_parser(
        "bench",
        add_help=False,
        help="compare training speed, compile time and memory with PyTorch "
        "loops, MMEngine and Lightning (`funceng bench --help` lists its options)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options are the suite's own, parsed by it
        return bench(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect_checkpoint(args.checkpoint)
        if args.command == "convert":
            from funceng.mmengine_format import convert

            print(f"wrote {convert(args.checkpoint, args.out)}")
            return 0
        return {"train": train, "test": test, "plot": plot}[args.command](args)
    except (CheckpointError, ConfigError, DistributedError, FileNotFoundError, MissingExtraError) as exc:
        print(f"funceng: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
