"""The checkpoint manager: every decision about a run's checkpoints, for `CheckpointHook` and the Runner alike.

It saves the state with the metadata that resumes it exactly (the loop's position, the hooks' state, the config),
points ``work_dir/last_checkpoint`` at the newest one, keeps the last ``max_keep_ckpts`` and the best one, and
resumes: from ``last_checkpoint`` or the newest intact checkpoint, falling back (and saying so) past corrupt ones,
with every rank agreeing on which. The format itself is `funceng.checkpoint`'s.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from funceng import checkpoint, dist, fileio, manifest, mmengine_format, rng
from funceng.errors import CheckpointError, check_keys
from funceng.evaluator import improvement
from funceng.finite import first_nonfinite
from funceng.sharding import checkpoint_shard_layout, shard_layout
from funceng.state import TrainState

if TYPE_CHECKING:
    from funceng.runner.runner import Runner


def _jsonable(value: Any) -> Any:
    """Config values for checkpoint metadata: classes and functions become their names."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__name__", repr(value))


class Checkpointer:
    """Saves to and resumes from ``directory`` (the work_dir, or a `CheckpointHook`'s ``out_dir``)."""

    def __init__(self, runner: Runner, directory: Path, options: Mapping[str, Any] | None = None):
        self.runner, self.directory = runner, Path(directory)
        options = dict(options or {})
        check_keys("checkpoint", options, {"async_save", "check_finite_params"})
        self.async_save = bool(options.get("async_save", False))
        self.check_finite_params = bool(options.get("check_finite_params", False))
        self.blocking = False  # set while a save must be in place before going on (a stop signal)
        self.last_checkpoint = runner.work_dir / "last_checkpoint"  # in work_dir, where resume=True looks
        self.kept: list[str] = []  # rolling checkpoints, oldest first
        self.best_value: float | None = None
        self.best_path: str | None = None

    # -- saving ------------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint records beside the state: the loop's position, the hooks' and this manager's
        bookkeeping, and a summary of the config."""
        runner = self.runner
        position = runner.train_loop.position() if runner.train_loop is not None else {}
        return {
            **position,
            "seed": runner.seed,
            "hooks": {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(runner.hooks)},
            "checkpointer": {"kept": self.kept, "best_value": self.best_value, "best_path": self.best_path},
            "config": _jsonable(runner.config_summary()),
            "config_sha256": runner.config_sha256,
        }

    def save(self, name: str, update_last: bool = True, replaces: tuple[str, ...] = ()) -> Path:
        """Saves the state as ``directory/name`` atomically; then ``last_checkpoint`` names it (unless
        ``update_last`` is false) and the checkpoints named in ``replaces`` are removed. A state whose loss, a
        parameter or a buffer became non-finite is never saved: the pending loss checks are read first, then the
        parameters and buffers are checked (one sync), and the error names the iteration and the tensor.

        In a data-parallel run every rank holds the same state and rank 0 alone writes it; a sharded state is
        written by all ranks, each its rows. Either way the checkpoint does not depend on the number of ranks.
        With ``checkpoint=dict(async_save=True)`` (and an unsharded state) the state is copied to host memory
        and written on a background thread; the pointer moves and old checkpoints go only once it is in place.
        """
        runner = self.runner
        loop = runner.train_loop
        if loop is not None:
            loop.check_finite()
        bad = first_nonfinite(runner.state)
        if bad is not None:
            when = f"after iteration {loop.iter} ({loop.describe(loop.iter)})" if loop is not None else "before saving"
            raise FloatingPointError(f"{bad} holds NaN or infinite values {when}: checkpoint {name} was not saved")
        extra = self.metadata()
        runner.call_hook("before_save_checkpoint", checkpoint=extra)
        path = self.directory / name

        def published(path: Path) -> None:
            if update_last:
                fileio.replace_atomically(self.last_checkpoint, str(path).encode())
            for old in replaces:
                shutil.rmtree(self.directory / old, ignore_errors=True)

        if runner.sharded:
            shards = shard_layout(runner.model, runner.state)
            checkpoint.save_state(runner.state, path, extra=extra, shards=shards, allow_nonfinite=True)  # checked
            if runner.rank == 0:
                published(path)
        elif runner.rank == 0:
            background = self.async_save and not self.blocking
            checkpoint.save_state(
                runner.state, path, extra=extra, blocking=not background, on_saved=published, allow_nonfinite=True
            )  # checked above, naming the iteration
        return path

    def wait(self) -> None:
        """Waits until a checkpoint being written in the background is in place (raising its error)."""
        checkpoint.wait_for_saves()

    def save_rolling(self, name: str, max_keep: int) -> Path:
        """Saves ``name``, then removes the oldest rolling checkpoints beyond ``max_keep`` (``-1``: keep all)."""
        self.kept.append(name)
        removed = []
        while 0 < max_keep < len(self.kept):
            removed.append(self.kept.pop(0))
        return self.save(name, replaces=tuple(removed))

    def save_if_best(self, metric: str, value: float, rule: str, name: str) -> bool:
        """Saves ``name`` (replacing the previous best) if ``value`` of ``metric`` beats the best so far."""
        if self.best_value is not None and improvement(value, self.best_value, rule) <= 0:
            return False
        self.best_value = value
        previous = self.best_path if self.best_path and self.best_path != name else None
        self.save(name, update_last=False, replaces=(previous,) if previous else ())
        self.best_path = name
        return True

    # -- loading -----------------------------------------------------------------------------------------------

    def load(self, path: str | Path) -> tuple[TrainState, dict[str, Any]]:
        """Loads a checkpoint into the run's state (whole, or this rank's rows of it for a sharded model), after
        checking, before reading any tensor, that it is a state of this run's model and optimizer; returns the
        state and the checkpoint's metadata. On a `CheckpointError` the state may hold part of the checkpoint."""
        runner = self.runner
        shards = checkpoint_shard_layout(runner.model) if runner.sharded else None
        state, extra = checkpoint.load_state(path, shards=shards, into=runner.state)  # no second copy in memory
        check_position(path, extra, int(state["step"].reshape(-1)[0]), runner.train_loop)
        return state, extra

    def load_weights(self, path: str | Path) -> None:
        """Copies a checkpoint's params and buffers into the runner's state (``load_from``): a funceng checkpoint
        (a directory; names must match), a ``.safetensors`` weights file (`funceng.save_weights`, a model hub's)
        or an MMEngine / PyTorch ``.pth`` file (read without unpickling code; loaded non-strictly, as MMEngine
        does, each difference logged: `funceng.mmengine_format`)."""
        if not Path(path).is_dir():
            mmengine_format.load_weights(self.runner.state, path, self.runner.logger)
            self.runner.logger.info(f"Load checkpoint from {path}")
            return
        loaded, _ = checkpoint.load_state(path)
        state = self.runner.state
        for part in ("params", "buffers"):
            expected, got = set(state[part].keys()), set(loaded[part].keys())
            if expected != got:
                raise CheckpointError(
                    f"load_from={path}: its {part} do not match the model's (missing "
                    f"{sorted(expected - got)}, unexpected {sorted(got - expected)})"
                )
            state[part].update_(loaded[part])
        self.runner.logger.info(f"Load checkpoint from {path}")

    def resume_candidates(self) -> list[Path]:
        """``last_checkpoint``'s target first, then every other checkpoint (newest iteration first)."""
        candidates = []
        if os.path.lexists(self.last_checkpoint):
            try:
                candidates.append(checkpoint.read_pointer(self.last_checkpoint))
            except CheckpointError as exc:
                self.runner.logger.warning(f"Ignoring last_checkpoint: {exc}; looking for checkpoints instead.")
        found = []
        for folder in dict.fromkeys([self.runner.work_dir, self.directory]):
            for path in folder.iterdir() if folder.is_dir() else []:
                if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                    continue
                if not any(os.path.lexists(path / name) for name in (manifest.NAME, manifest.LEGACY_NAME)):
                    continue
                try:
                    iteration = checkpoint.read_manifest(path)["extra"].get("iter", -1)
                    found.append((iteration if type(iteration) is int else -1, path.name, path))
                except CheckpointError:
                    found.append((-1, path.name, path))
        return candidates + [p for _, _, p in sorted(found, reverse=True) if p not in candidates]

    def resume(self, resume_from: bool | str | Path) -> None:
        """Restores the state, the loop's position, the hooks and this manager from a checkpoint: ``True`` for
        the newest intact one (rank 0 decides; all ranks must load it), or a path."""
        runner = self.runner
        if resume_from is True:
            candidates = dist.broadcast_object(self.resume_candidates() if runner.rank == 0 else None)
            if not candidates:
                runner.logger.info("resume=True but work_dir has no checkpoint: training from scratch.")
                return
        else:
            candidates = [Path(resume_from)]
        path, extra = self._first_loadable(candidates)
        runner.train_loop.restore(extra)
        for i, hook in enumerate(runner.hooks):
            hook_state = extra.get("hooks", {}).get(f"{i}:{type(hook).__name__}")
            if hook_state:
                hook.load_state_dict(hook_state)
        self._restore_bookkeeping(extra)
        runner.call_hook("after_load_checkpoint", checkpoint=extra)
        runner.logger.info(f"resumed epoch: {runner.epoch}, iter: {runner.iter} from {path}")

    def _first_loadable(self, candidates: list[Path]) -> tuple[Path, dict[str, Any]]:
        """Loads the first candidate every rank can load into the run's state; its path and metadata."""
        runner = self.runner
        for i, path in enumerate(candidates):
            try:
                _, extra = self.load(path)
                error = None
            except CheckpointError as exc:
                error = f"rank {runner.rank}: {exc}" if runner.world_size > 1 else str(exc)
            failures = [e for e in dist.gather_objects(error) if e]
            if not failures:
                return path, extra
            if i + 1 == len(candidates):
                raise CheckpointError("; ".join(failures))
            runner.logger.warning(f"Cannot resume from {path}: {failures[0]}. Falling back to {candidates[i + 1]}.")
        raise AssertionError("no candidates")

    def _restore_bookkeeping(self, extra: dict[str, Any]) -> None:
        saved = extra.get("checkpointer")
        if saved is None:  # written by funceng 0.1, where CheckpointHook kept this
            saved = next((v for k, v in extra.get("hooks", {}).items() if k.endswith(":CheckpointHook")), {})
        self.kept = list(saved.get("kept", []))
        self.best_value, self.best_path = saved.get("best_value"), saved.get("best_path")


def check_position(path: str | Path, extra: dict[str, Any], step: int, loop: Any) -> None:
    """Refuses a checkpoint whose recorded position contradicts itself or its state (an edited ``extra``):
    resuming from it would train the wrong data or nothing at all, silently."""
    if loop is None:
        return
    where = f"checkpoint {path}: field extra"
    for key in ("epoch", "iter", "batch"):
        if type(extra.get(key)) is not int or extra[key] < 0:
            raise CheckpointError(f"{where}.{key} must be a non-negative int, got {extra.get(key)!r:.40}")
    if extra["iter"] != step:
        raise CheckpointError(f"{where}.iter is {extra['iter']} but its state has taken {step} steps")
    per_epoch = extra.get("batches_per_epoch")
    if loop.by_epoch and type(per_epoch) is int and extra.get("world_size") == loop.runner.world_size:
        if extra["epoch"] * per_epoch + extra["batch"] != extra["iter"]:
            raise CheckpointError(
                f"{where}: epoch {extra['epoch']}, batch {extra['batch']} of {per_epoch} per epoch is not "
                f"iteration {extra['iter']}"
            )
    for key in ("rng", "rng_epoch_start"):
        problem = rng.check_states(extra.get(key)) if extra.get(key) or key == "rng" else None
        if problem:
            raise CheckpointError(f"{where}.{key}: {problem.removeprefix('rng ')}")
