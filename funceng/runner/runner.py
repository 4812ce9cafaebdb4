"""`Runner`: MMEngine's training front end as a thin driver over funceng's pure steps.

It builds the TrainState and the steps from MMEngine-style configs, then threads the state through the train
step, calls hooks at MMEngine's stages, and feeds eval outputs to the metrics.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from funceng import checkpoint as ckpt
from funceng import dist
from funceng.evaluator import Evaluator
from funceng.runner import build
from funceng.runner.build import ConfigError
from funceng.runner.hooks import HOOKS, CheckpointHook, EMAHook, Hook, LoggerHook
from funceng.runner.log import close_logger, environment_banner, make_logger
from funceng.runner.resume import capture_rng, forked_rng, restore_rng, resume_position
from funceng.runner.sampler import shard_loader
from funceng.runner.visualizer import Visualizer
from funceng.sharding import checkpoint_shard_layout, fully_shard_model, is_sharded, shard_layout
from funceng.state import TrainState
from funceng.step import make_eval_step, make_train_step
from funceng.tree import describe_difference, flatten

DEFAULT_HOOKS = {"logger": LoggerHook, "checkpoint": CheckpointHook}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _ragged(loader: Any) -> bool:
    """Whether a loader's last batch is smaller than the others (so a compiled step must allow any size)."""
    batch_size = getattr(loader, "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    if not batch_size or getattr(loader, "drop_last", False) or not hasattr(dataset, "__len__"):
        return False
    return len(dataset) % batch_size != 0


def _build_hook(cfg: Any, name: str, defaults: dict | None = None) -> Hook:
    if isinstance(cfg, Hook):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{name}: expected a Hook or a dict, got {type(cfg).__name__}")
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind is None:
        kind = DEFAULT_HOOKS.get(name.rpartition(".")[2])
        if kind is None:
            raise ConfigError(f"{name}: missing 'type'")
    if isinstance(kind, str):
        if kind not in HOOKS:
            raise ConfigError(f"{name}.type: unknown hook {kind!r}; known: {sorted(HOOKS)} or pass the class")
        kind = HOOKS[kind]
    try:
        return kind(**cfg)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _jsonable(value: Any) -> Any:
    """Config values for checkpoint metadata: classes and functions become their names."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__name__", repr(value))


class Runner:
    """Trains, validates, tests, logs and checkpoints a `BaseModel` from MMEngine-style arguments."""

    def __init__(
        self,
        model: nn.Module,
        work_dir: str | os.PathLike,
        train_dataloader: Any = None,
        val_dataloader: Any = None,
        test_dataloader: Any = None,
        train_cfg: Mapping | None = None,
        val_cfg: Mapping | None = None,
        test_cfg: Mapping | None = None,
        optim_wrapper: Mapping | None = None,
        param_scheduler: Mapping | Sequence[Mapping] | None = None,
        val_evaluator: Any = None,
        test_evaluator: Any = None,
        default_hooks: Mapping | None = None,
        custom_hooks: Sequence | None = None,
        load_from: str | None = None,
        resume: bool | str = False,
        randomness: Mapping | None = None,
        compile: bool | str = False,
        experiment_name: str | None = None,
        log_level: str = "INFO",
        cfg: Any = None,
        default_scope: str | None = None,
        env_cfg: Mapping | None = None,
        launcher: str = "none",
        visualizer: Mapping | None = None,
        auto_scale_lr: Mapping | None = None,
        model_wrapper_cfg: Mapping | None = None,
    ):
        self.work_dir = Path(work_dir).resolve()
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise ConfigError(f"work_dir {self.work_dir} exists and is a file; it must be a directory")
        if train_dataloader is not None and (train_cfg is None or optim_wrapper is None):
            missing = [n for n, v in (("train_cfg", train_cfg), ("optim_wrapper", optim_wrapper)) if v is None]
            raise ConfigError(f"train_dataloader is set but {' and '.join(missing)} is missing")
        evaluated = ((val_dataloader, val_evaluator, "val"), (test_dataloader, test_evaluator, "test"))
        for loader, evaluator, name in evaluated:
            if loader is not None and evaluator is None:
                raise ConfigError(
                    f"{name}_dataloader is set but {name}_evaluator is missing: pass "
                    f"{name}_evaluator=dict(type=YourMetric) (a BaseMetric subclass)"
                )
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module (a BaseModel), got {type(model).__name__}")
        self.launcher = self._start_distributed(launcher, env_cfg)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        randomness = dict(randomness or {})
        build.check_keys("randomness", randomness, {"seed", "deterministic", "diff_rank_seed"})
        self.seed = randomness.get("seed")
        if self.seed is None:
            self.seed = dist.broadcast_object(random.SystemRandom().randrange(2**31))
        self.deterministic = bool(randomness.get("deterministic", False))
        # diff_rank_seed: each rank draws different random numbers (dropout, augmentation); data order stays shared
        self.rank_seed = self.seed + self.rank if randomness.get("diff_rank_seed", False) else self.seed
        self._seed_everything()

        self.train_cfg = build.check_train_cfg(train_cfg) if train_cfg is not None else None
        self.val_cfg, self.test_cfg = dict(val_cfg or {}), dict(test_cfg or {})
        self.train_dataloader = self._loader(train_dataloader, "train_dataloader", train=True)
        self.val_dataloader = self._loader(val_dataloader, "val_dataloader", train=False)
        self.test_dataloader = self._loader(test_dataloader, "test_dataloader", train=False)
        self.val_evaluator = Evaluator(val_evaluator) if val_evaluator is not None else None
        self.test_evaluator = Evaluator(test_evaluator) if test_evaluator is not None else None
        self.optim_wrapper, self.param_scheduler = optim_wrapper, param_scheduler
        self.auto_scale_lr = dict(auto_scale_lr or {})
        build.check_keys("auto_scale_lr", self.auto_scale_lr, {"base_batch_size", "enable"})
        self.load_from, self.resume_from = load_from, resume
        self.compile = compile
        self.experiment_name = experiment_name

        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        wrapper = build.check_model_wrapper_cfg(model_wrapper_cfg)
        if wrapper["type"] == "MMFullyShardedDataParallel":
            if self.world_size == 1:
                raise ConfigError("model_wrapper_cfg: MMFullyShardedDataParallel shards over several ranks; start "
                                  "with torchrun --nproc_per_node=N and launcher='pytorch'")
            # sharded where it is built (the CPU, say); FSDP2 moves each unit's shard to the device
            fully_shard_model(model, tuple(wrapper.get("shard_modules", ())) or None, device=self.device)
        self.model = model.to(self.device)
        self.sharded = is_sharded(self.model)
        self.hooks: list[Hook] = []
        self._register_hooks(default_hooks or {}, custom_hooks or [])
        if self.sharded and any(isinstance(h, EMAHook) for h in self.hooks):
            raise ConfigError("custom_hooks: EMAHook cannot evaluate an averaged copy of a sharded model")

        self.timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        self.log_dir = self.work_dir / self.timestamp
        for n in range(1, 1000 if self.rank == 0 else 0):  # two runs started within a second must not share a log
            try:
                self.log_dir.mkdir(parents=True)
                break
            except FileExistsError:
                self.timestamp = f"{self.timestamp.split('-')[0]}-{n}"
                self.log_dir = self.work_dir / self.timestamp
        self.timestamp = dist.broadcast_object(self.timestamp)  # rank 0 alone writes logs, scalars, checkpoints
        self.log_dir = self.work_dir / self.timestamp
        if self.rank == 0:
            self.logger = make_logger(self.log_dir / f"{self.timestamp}.log", log_level)
        else:
            self.logger = make_logger(None, "WARNING")
        self.scalars = Visualizer.from_cfg(self.log_dir / "vis_data", visualizer, write=self.rank == 0)
        self.logger.info(environment_banner(self.seed, self.deterministic, self.launcher, self.world_size))

        self.state: TrainState | None = None
        self.tx = None
        self._train_step = self._eval_step = None
        self.epoch = self.iter = 0
        self.stop_training = False
        self.eval_params_key = "params"
        self.timing = {"time": 0.0, "data_time": 0.0}
        self._batches_done = 0  # batches of the current pass over the train loader already trained on
        self._epoch_start_rng: dict[str, Any] = {}
        self._resume_point: dict[str, Any] | None = None
        self._signal: int | None = None
        self._signal_vote: tuple[Any, torch.Tensor] | None = None
        self.last_metrics: dict[str, Any] = {}  # of the latest validation or test

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Runner:
        """A Runner from a config's variables (see `funceng.config.load_config`); other variables are ignored.

        ``model`` may be a module or a dict with ``type`` (a class) and its keyword arguments.
        """
        import inspect

        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        if "model" not in kwargs or "work_dir" not in kwargs:
            missing = [k for k in ("model", "work_dir") if k not in kwargs]
            raise ConfigError(f"config: missing {missing}")
        kwargs["model"] = build.build_model(kwargs["model"])
        return cls(**kwargs)

    # -- properties MMEngine users reach for ------------------------------------------------------------------------

    @property
    def by_epoch(self) -> bool:
        return self.train_cfg["by_epoch"] if self.train_cfg else True

    @property
    def max_epochs(self) -> int | None:
        return self.train_cfg.get("max_epochs") if self.train_cfg and self.by_epoch else None

    @property
    def max_iters(self) -> int:
        if self.train_cfg is None:
            return 0
        if self.by_epoch:
            return self.train_cfg["max_epochs"] * len(self.train_dataloader)
        return self.train_cfg["max_iters"]

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir

    def describe_iter(self, iteration: int) -> str:
        if self.by_epoch and self.train_dataloader is not None:
            per_epoch = len(self.train_dataloader)
            return f"epoch {(iteration - 1) // per_epoch + 1}, batch {(iteration - 1) % per_epoch + 1}"
        return f"iteration {iteration} of {self.max_iters}"

    # -- set-up --------------------------------------------------------------------------------------------------

    def _start_distributed(self, launcher: str, env_cfg: Mapping | None) -> str:
        """Applies ``env_cfg`` and joins the process group for ``launcher="pytorch"`` (or under torchrun)."""
        env_cfg = dict(env_cfg or {})
        build.check_keys("env_cfg", env_cfg, {"cudnn_benchmark", "mp_cfg", "dist_cfg"})
        dist_cfg = dict(env_cfg.get("dist_cfg") or {})
        build.check_keys("env_cfg.dist_cfg", dist_cfg, {"backend", "timeout"})
        if env_cfg.get("cudnn_benchmark"):
            torch.backends.cudnn.benchmark = True
        mp_cfg = dict(env_cfg.get("mp_cfg") or {})
        build.check_keys("env_cfg.mp_cfg", mp_cfg, {"mp_start_method", "opencv_num_threads"})
        if "mp_start_method" in mp_cfg:
            torch.multiprocessing.set_start_method(mp_cfg["mp_start_method"], force=True)
        if "opencv_num_threads" in mp_cfg:
            try:
                import cv2

                cv2.setNumThreads(mp_cfg["opencv_num_threads"])
            except ImportError:
                pass
        if launcher not in ("none", "pytorch"):
            raise ConfigError(
                f"launcher={launcher!r} is not supported: start the script with torchrun (on SLURM: srun torchrun "
                "...) and pass launcher='pytorch'")
        if launcher == "none" and dist.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            launcher = "pytorch"  # under torchrun, N unrelated copies of one run are never what was meant
        if launcher == "pytorch" or dist.is_distributed():
            dist.init_distributed(dist_cfg.get("backend"), dist_cfg.get("timeout"))
        return launcher

    def _loader(self, cfg: Any, name: str, train: bool) -> Any:
        """The data loader for ``cfg``, holding this rank's shard in a distributed run."""
        loader = build.build_dataloader(cfg, name, self.seed, train=train)
        try:
            return shard_loader(loader, name, self.seed, train=train)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    def _seed_everything(self) -> None:
        random.seed(self.rank_seed)
        np.random.seed(self.rank_seed % 2**32)
        torch.manual_seed(self.rank_seed)
        if self.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def _register_hooks(self, default_hooks: Mapping, custom_hooks: Sequence) -> None:
        build.check_keys("default_hooks", default_hooks,
                         set(DEFAULT_HOOKS) | {"timer", "runtime_info", "param_scheduler", "sampler_seed",
                                               "visualization"})
        for name in DEFAULT_HOOKS:
            cfg = default_hooks.get(name, {})
            if cfg is None:  # explicitly disabled
                continue
            self.hooks.append(_build_hook(cfg, f"default_hooks.{name}"))
        for i, cfg in enumerate(custom_hooks):
            self.hooks.append(_build_hook(cfg, f"custom_hooks[{i}]"))
        self.hooks.sort(key=lambda h: h.priority_value)

    def call_hook(self, stage: str, **kwargs: Any) -> None:
        for hook in self.hooks:
            getattr(hook, stage)(self, **kwargs)

    def _build_training(self) -> None:
        if self.train_dataloader is None:
            raise ConfigError("train() needs a train_dataloader")
        if len(self.train_dataloader) == 0:
            raise ConfigError("train_dataloader is empty (length 0): check the dataset, batch_size and drop_last")
        epoch_length = len(self.train_dataloader)
        self.optim_wrapper = self._scale_lr(self.optim_wrapper)
        opt_cfg = self.optim_wrapper.get("optimizer", {})
        base_lr = opt_cfg.get("lr", 0.0) if isinstance(opt_cfg, Mapping) else 0.0
        schedule = build.build_lr_schedule(self.param_scheduler, base_lr, epoch_length)
        k = int(self.optim_wrapper.get("accumulative_counts", 1))
        if schedule is not None and k > 1:  # the schedule runs in iterations; the optimizer sees every k-th one
            per_iter = schedule
            schedule = lambda count: per_iter(count * k + (k - 1))  # noqa: E731
        self.tx, amp, accumulate, _ = build.build_optimizer(self.optim_wrapper, self.model, schedule,
                                                            sharded=self.sharded)
        self._create_state()
        self._train_step = make_train_step(self.model, self.tx, compile=self.compile, amp=amp, donate=True,
                                           dynamic_batch=_ragged(self.train_dataloader))

    def _scale_lr(self, optim_wrapper: Mapping) -> Mapping:
        """``auto_scale_lr``, the linear scaling rule: ``lr * ranks * batch_size * accumulation / base_batch_size``."""
        cfg = self.auto_scale_lr
        if not cfg or not cfg.get("enable", True):
            return optim_wrapper
        if "base_batch_size" not in cfg:
            raise ConfigError("auto_scale_lr: missing 'base_batch_size' (the batch size the lr was tuned for)")
        batch_size = getattr(self.train_dataloader, "batch_size", None)
        if not batch_size:
            raise ConfigError("auto_scale_lr needs a train_dataloader with a batch_size")
        opt_cfg = dict(optim_wrapper.get("optimizer", {}))
        if "lr" not in opt_cfg:
            raise ConfigError("auto_scale_lr: optim_wrapper.optimizer has no 'lr' to scale")
        real = self.world_size * batch_size * int(optim_wrapper.get("accumulative_counts", 1))
        ratio = real / cfg["base_batch_size"]
        self.logger.info(f"LR is set based on batch size of {cfg['base_batch_size']} and the current batch size is "
                         f"{real}. Scaling the original LR by {ratio}.")
        self.auto_scale_lr = {}  # scaled once, even if training is built again
        return {**optim_wrapper, "optimizer": {**opt_cfg, "lr": opt_cfg["lr"] * ratio}}

    def _create_state(self) -> None:
        if self.state is not None:
            return
        tx = self.tx or build.build_optimizer(
            {"optimizer": {"type": "SGD", "lr": 0.0}}, self.model)[0]
        state = TrainState.create(self.model, tx, seed=self.rank_seed)
        extras = {}
        params = dict(state["params"].items())
        for hook in self.hooks:
            extras.update(hook.extra_state(params))
        if extras:
            state = TrainState({**dict(state.unlock_().items()), **extras}, batch_size=[])
            state.lock_()
        self.state = state
        if self.load_from:
            self._load_weights(self.load_from)
        if not self.sharded:  # ranks may have initialised their models differently: all start from rank 0's state
            dist.broadcast_(flatten(state.exclude("rng"))[1])

    def _eval_state(self) -> TrainState:
        if self.eval_params_key == "params":
            return self.state
        view = TrainState({**dict(self.state.items()), "params": self.state[self.eval_params_key]}, batch_size=[])
        return view

    # -- loops ---------------------------------------------------------------------------------------------------

    def train(self) -> nn.Module:
        """Trains for ``train_cfg``'s length, validating every ``val_interval``; returns the trained model."""
        if self.train_cfg is None:
            raise ConfigError("train() needs train_cfg (by_epoch=True + max_epochs, or by_epoch=False + max_iters)")
        self._build_training()
        if self.resume_from:
            self._resume()
        self.logger.info(f"Checkpoints will be saved to {self.checkpoint_dir}.")
        self.call_hook("before_run")
        self.call_hook("before_train")
        previous = self._install_signal_handlers()
        try:
            if self.by_epoch:
                self._train_epochs()
            else:
                self._train_iters()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self._signal_vote is not None:  # a collective still in flight when the process exits aborts it
                self._signal_vote[0].wait()
                self._signal_vote = None
            self._sync_model()
        self.call_hook("after_train")
        self.call_hook("after_run")
        return self.model

    def _train_epochs(self) -> None:
        while self.epoch < self.max_epochs and not self.stop_training:
            self.call_hook("before_train_epoch")
            for batch_idx, batch in self._train_pass():
                self._run_train_iter(batch_idx, batch)
                if self.stop_training:
                    break
            else:
                self._batches_done = 0
                self.epoch += 1
                self.call_hook("after_train_epoch")
            if self.stop_training:
                break
            cfg = self.train_cfg
            if self.val_dataloader is not None and self.epoch >= cfg["val_begin"] and (
                self.epoch % cfg["val_interval"] == 0 or self.epoch == self.max_epochs
            ):
                self.val()

    def _train_iters(self) -> None:
        cfg = self.train_cfg
        self.call_hook("before_train_epoch")
        while self.iter < self.max_iters and not self.stop_training:
            for batch_idx, batch in self._train_pass():
                self._run_train_iter(batch_idx, batch)
                if self.val_dataloader is not None and self.iter >= cfg["val_begin"] and (
                    self.iter % cfg["val_interval"] == 0 or self.iter == self.max_iters
                ):
                    self.val()
                if self.iter >= self.max_iters or self.stop_training:
                    break
            else:
                self._batches_done = 0
        self.call_hook("after_train_epoch")

    def _train_pass(self):
        """``(batch_idx, batch)`` over one pass of the train loader; after a resume, from the saved position."""
        loader, point = self.train_dataloader, self._resume_point
        self._resume_point = None
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):  # DefaultSampler, DistributedSampler
            loader.sampler.set_epoch(self.epoch if self.by_epoch else self.iter // len(loader))
        if point is None:
            self._epoch_start_rng = capture_rng(loader)
            return self._timed(loader)
        if point["batch"] == 0:
            restore_rng(point["rng"], loader)
            self._epoch_start_rng = point["rng"]
            return self._timed(loader)
        self._epoch_start_rng = point["rng_epoch_start"]
        source, how = resume_position(loader, point["batch"], point["rng_epoch_start"], point["rng"])
        self.logger.info(f"Resuming the data loader at batch {point['batch']} of {len(loader)} (skipped by {how})")
        return self._timed(source, start=point["batch"])

    def _timed(self, loader, start: int = 0):
        """``(index, batch)`` pairs, timing ``data_time``: the wait for each batch (MMEngine's IterTimerHook)."""
        self._tick = time.perf_counter()
        for index, batch in enumerate(loader, start):
            self.timing["data_time"] = time.perf_counter() - self._tick
            yield index, batch

    def _end_iter_timer(self) -> None:
        """``time``: the whole iteration, batch loading included."""
        now = time.perf_counter()
        self.timing["time"] = now - self._tick
        self._tick = now

    def _run_train_iter(self, batch_idx: int, batch: Any) -> None:
        self.call_hook("before_train_iter", batch_idx=batch_idx, data_batch=batch)
        with self._naming_collective_failures(
                f"the train step at iteration {self.iter + 1} ({self.describe_iter(self.iter + 1)})"):
            self.state, metrics = self._train_step(self.state, _to_device(batch, self.device))
        self.iter += 1
        self._batches_done = batch_idx + 1
        self._end_iter_timer()
        self.call_hook("after_train_iter", batch_idx=batch_idx, data_batch=batch, outputs=metrics)
        if self._signal_received():
            self._checkpoint_and_exit()

    def val(self) -> dict[str, Any]:
        """Runs the validation loop; returns the metrics."""
        return self._evaluate("val", self.val_dataloader, self.val_evaluator)

    def test(self) -> dict[str, Any]:
        """Runs the test loop; returns the metrics."""
        return self._evaluate("test", self.test_dataloader, self.test_evaluator)

    def _evaluate(self, mode: str, loader: Any, evaluator: Evaluator | None) -> dict[str, Any]:
        if loader is None or evaluator is None:
            raise ConfigError(f"{mode}() needs {mode}_dataloader and {mode}_evaluator")
        self._create_state()
        if self._eval_step is None:
            self._eval_step = make_eval_step(self.model, compile=self.compile, dynamic_batch=_ragged(loader))
        self.call_hook(f"before_{mode}")
        self.call_hook(f"before_{mode}_epoch")
        state = self._eval_state()
        with forked_rng(self.train_dataloader):  # evaluating must not change the next epoch's shuffle
            for batch_idx, batch in self._timed(loader):
                self.call_hook(f"before_{mode}_iter", batch_idx=batch_idx, data_batch=batch)
                outputs = self._eval_step(state, _to_device(batch, self.device))
                evaluator.process(data_samples=outputs, data_batch=batch)
                self._end_iter_timer()
                self.call_hook(f"after_{mode}_iter", batch_idx=batch_idx, data_batch=batch, outputs=outputs)
        with self._naming_collective_failures(f"gathering the {mode} results"):
            metrics = evaluator.evaluate(len(loader.dataset) if hasattr(loader, "dataset") else len(loader))
        self.last_metrics = metrics
        self.call_hook(f"after_{mode}_epoch", metrics=metrics)
        self.call_hook(f"after_{mode}")
        self._sync_model()
        return metrics

    @contextlib.contextmanager
    def _naming_collective_failures(self, during: str):
        """Turns a failed collective (a rank died or hung) into a `DistributedError` saying where it happened."""
        try:
            yield
        except RuntimeError as exc:
            if self.world_size > 1 and dist.is_collective_failure(exc):
                raise dist.DistributedError(
                    f"rank {self.rank}: a collective failed during {during}: another rank died or stopped "
                    f"responding (see its log; collectives time out after env_cfg.dist_cfg.timeout). "
                    f"{type(exc).__name__}: {exc}") from exc
            raise

    def _sync_model(self) -> None:
        """Points the model at the current state's weights (compiled steps do not bind it)."""
        if self.state is not None and not self.sharded:
            from funceng.binding import ModuleBinding

            params, buffers = self.state["params"], self.state["buffers"]
            ModuleBinding(self.model, list(params.keys()), list(buffers.keys())).bind(
                list(params.values()), list(buffers.values()))

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "iter": self.iter, "batch": self._batches_done, "by_epoch": self.by_epoch,
            "world_size": self.world_size, "samples": self._batches_done * self._global_batch_size(),
            "seed": self.seed, "rng": capture_rng(self.train_dataloader), "rng_epoch_start": self._epoch_start_rng,
            "hooks": {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(self.hooks)},
            "config": _jsonable({"train_cfg": self.train_cfg, "optim_wrapper": self.optim_wrapper,
                                 "param_scheduler": self.param_scheduler, "compile": self.compile}),
        }

    def save_checkpoint(self, name: str, update_last: bool = True) -> Path:
        """Saves the TrainState as ``work_dir/name`` atomically; ``last_checkpoint`` then names it.

        In a data-parallel run every rank holds the same state and rank 0 alone writes it; a sharded state is
        written by all ranks, each its rows. Either way the checkpoint does not depend on the number of ranks.
        """
        if self.sharded:
            path = ckpt.save_state(self.state, self.checkpoint_dir / name, extra=self._checkpoint_extra(),
                                   shards=shard_layout(self.model, self.state))
        elif self.rank == 0:
            path = ckpt.save_state(self.state, self.checkpoint_dir / name, extra=self._checkpoint_extra())
        else:
            return self.checkpoint_dir / name
        if update_last and self.rank == 0:
            last = self.checkpoint_dir / "last_checkpoint"
            tmp = last.with_name(".last_checkpoint.tmp")
            with open(tmp, "w") as f:
                f.write(str(path))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, last)
        return path

    def _load(self, path: str | os.PathLike) -> tuple[TrainState, dict[str, Any]]:
        """A checkpoint's state: whole, or this rank's rows of it for a sharded model."""
        return ckpt.load_state(path, shards=checkpoint_shard_layout(self.model) if self.sharded else None)

    def _load_weights(self, path: str | os.PathLike) -> None:
        loaded, _ = self._load(path)
        for part in ("params", "buffers"):
            if set(loaded[part].keys()) != set(self.state[part].keys()):
                raise ckpt.CheckpointError(
                    f"load_from={path}: its {part} do not match the model's "
                    f"(missing {sorted(set(self.state[part].keys()) - set(loaded[part].keys()))}, "
                    f"unexpected {sorted(set(loaded[part].keys()) - set(self.state[part].keys()))})")
            self.state[part].update_(loaded[part])
        self.logger.info(f"Load checkpoint from {path}")

    def _resume_candidates(self) -> list[Path]:
        """``last_checkpoint``'s target first, then every other checkpoint in work_dir, newest first."""
        candidates = []
        last = self.checkpoint_dir / "last_checkpoint"
        if last.exists():
            candidates.append(Path(last.read_text().strip()))
        found = []
        for path in self.checkpoint_dir.iterdir():
            if path.is_dir() and not path.name.startswith(".") and (path / "meta.json").exists():
                try:
                    found.append((int(ckpt.read_meta(path)["extra"].get("iter", -1)), path.name, path))
                except (ckpt.CheckpointError, KeyError, TypeError, ValueError):
                    found.append((-1, path.name, path))
        candidates += [p for _, _, p in sorted(found, reverse=True) if p not in candidates]
        return candidates

    def _global_batch_size(self) -> int:
        return (getattr(self.train_dataloader, "batch_size", None) or 0) * self.world_size

    def _resumed_batches(self, extra: dict[str, Any]) -> int:
        """Batches of the current pass already trained on, for this run's ranks: a checkpoint records how many
        samples of the pass were consumed, so a run may resume on a different number of ranks."""
        batches = int(extra.get("batch", 0))
        saved_world, samples, per_step = extra.get("world_size", 1), extra.get("samples"), self._global_batch_size()
        if saved_world == self.world_size or not samples or not per_step:
            return batches
        if samples % per_step:
            self.logger.warning(
                f"The checkpoint was written by {saved_world} ranks after {samples} samples of the epoch, which is "
                f"not a whole number of this run's global batches ({per_step}); resuming at batch "
                f"{samples // per_step}, so the rest of this epoch's data differs from the original run.")
        else:
            self.logger.info(f"Resuming a {saved_world}-rank run on {self.world_size} rank(s) at sample {samples} "
                             "of the epoch.")
        return samples // per_step

    def _resume(self) -> None:
        if self.resume_from is True:  # rank 0's view of work_dir: all ranks resume the same checkpoint
            candidates = dist.broadcast_object(self._resume_candidates() if self.rank == 0 else None)
            if not candidates:
                self.logger.info("resume=True but work_dir has no checkpoint: training from scratch.")
                return
        else:
            candidates = [Path(self.resume_from)]
        for i, path in enumerate(candidates):
            try:
                loaded, extra = self._load(path)
                error = None
            except ckpt.CheckpointError as exc:
                error = f"rank {self.rank}: {exc}" if self.world_size > 1 else str(exc)
            failures = [e for e in dist.gather_objects(error) if e]
            if not failures:
                break
            if i + 1 == len(candidates):
                raise ckpt.CheckpointError("; ".join(failures))
            self.logger.warning(f"Cannot resume from {path}: {failures[0]}. Falling back to {candidates[i + 1]}.")
        expected, _ = flatten(self.state)
        got, _ = flatten(loaded)
        if expected != got:
            raise ckpt.CheckpointError(
                f"resume={path}: the checkpoint's state does not match this run's model and optimizer: "
                f"{describe_difference(expected, got)}")
        self.state.update_(loaded)
        self.epoch, self.iter = int(extra["epoch"]), int(extra["iter"])
        self._batches_done = self._resumed_batches(extra)
        self._resume_point = {"batch": self._batches_done, "rng": extra["rng"],
                              "rng_epoch_start": extra.get("rng_epoch_start") or extra["rng"]}
        for i, hook in enumerate(self.hooks):
            hook_state = extra.get("hooks", {}).get(f"{i}:{type(hook).__name__}")
            if hook_state:
                hook.load_state_dict(hook_state)
        self.logger.info(f"resumed epoch: {self.epoch}, iter: {self.iter} from {path}")

    # -- signals -------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM / SIGINT finish the current iteration, save a checkpoint and exit (see `_checkpoint_and_exit`)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._signal = signum

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _signal_received(self) -> bool:
        """Whether to stop for a signal. Ranks vote with a non-blocking all-reduce started one iteration earlier,
        so all of them stop after the same iteration (their collectives must pair up) and none waits for the vote.
        """
        if self.world_size == 1:
            return self._signal is not None
        received = False
        if self._signal_vote is not None:
            work, vote = self._signal_vote
            work.wait()
            received = bool(vote.item())
            self._signal = self._signal or int(vote.item()) or None
        vote = torch.tensor([self._signal or 0])
        work = torch.distributed.all_reduce(vote, torch.distributed.ReduceOp.MAX, group=dist.cpu_group(),
                                            async_op=True)
        self._signal_vote = (work, vote)
        return received

    def _checkpoint_and_exit(self) -> None:
        name = signal.Signals(self._signal).name
        path = self.save_checkpoint(f"iter_{self.iter}")
        dist.barrier()  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
        self.logger.info(f"Received {name}: saved checkpoint {path} at iteration {self.iter}; "
                         "resume with resume=True. Exiting.")
        self._sync_model()
        raise SystemExit(128 + self._signal)

    def __del__(self):
        logger = getattr(self, "logger", None)
        if logger is not None:
            close_logger(logger)
        scalars = getattr(self, "scalars", None)
        if scalars is not None:
            scalars.close()
