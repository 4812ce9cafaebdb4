"""`Runner`: MMEngine's training front end as a thin layer over funceng's pure steps.

It turns MMEngine-style arguments into the pieces of a run (`env`: process group, seeds, log; `data`: loaders;
`optim_wrapper` and `param_scheduler`: the optimizer; `loops`; `hooks`; `checkpointer`) and holds what they
share: the model, the `TrainState` and the hooks. The loops do the running.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from funceng import binding, dist, optim
from funceng.config import Config
from funceng.errors import ConfigError, check_keys
from funceng.model import build_model
from funceng.runner import compat, population_run
from funceng.runner.activation_checkpointing import apply_memory_options
from funceng.runner.checkpointer import Checkpointer
from funceng.runner.counters import RunnerCounters, open_message_hub
from funceng.runner.data import build_dataloader, is_ragged, runner_build_dataloader
from funceng.runner.env import RunEnvironment, default_device, dump_config, open_run_log
from funceng.runner.eval_loops import EvalLoop, build_eval_loop
from funceng.runner.hooks import CheckpointHook, EMAHook, Hook, build_hooks
from funceng.runner.hooks.plateau_hook import ReduceOnPlateauHook
from funceng.runner.imperative_step import build_imperative_training, trains_imperatively
from funceng.runner.log import build_log_processor, log_frozen
from funceng.runner.loops import IterTimer, build_train_loop
from funceng.runner.model_functions import check_model_functions
from funceng.runner.model_wrappers import wrap_model
from funceng.runner.optim_wrapper import build_optimizer, config_facade, scale_lr
from funceng.runner.param_scheduler import train_length
from funceng.runner.visualizer import Visualizer
from funceng.sharding import is_sharded
from funceng.state import TrainState
from funceng.step import make_train_step
from funceng.tree import flatten
from funceng.weights import save_weights


class Runner(RunnerCounters):
    """Trains, validates, tests, logs and checkpoints a `BaseModel` from MMEngine-style arguments, or a plain
    ``nn.Module`` given ``loss_fn(model, batch)`` / ``predict_fn(model, batch)`` (the functional API's contract,
    `funceng.runner.model_functions`). ``compile`` is the steps' (``"auto"``: compiled on CUDA, eager on the CPU).
    Use it as a context manager, or call `close`, to close its log and scalar files.
    """

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
        compile: bool | str | dict = "auto",
        experiment_name: str | None = None,
        log_level: str = "INFO",
        cfg: Any = None,
        default_scope: str | None = None,
        env_cfg: Mapping | None = None,
        launcher: str = "none",
        visualizer: Mapping | None = None,
        auto_scale_lr: Mapping | None = None,
        model_wrapper_cfg: Mapping | None = None,
        log_processor: Mapping | None = None,
        checkpoint: Mapping | None = None,
        loss_fn: Any = None,
        predict_fn: Any = None,
    ):
        self.work_dir = Path(work_dir).resolve()
        if self.work_dir.exists() and not self.work_dir.is_dir():
            raise ConfigError(f"work_dir {self.work_dir} exists and is a file; it must be a directory")
        if default_scope is not None:
            compat.ignored("Runner(default_scope)")
        self.cfg = cfg if isinstance(cfg, Config) else Config(cfg)  # Runner.from_cfg passes the config file's
        self.env = RunEnvironment.start(launcher, env_cfg, randomness)
        self.rank, self.world_size, self.seed = self.env.rank, self.env.world_size, self.env.seed
        self.device = default_device()
        self.timer = IterTimer()
        self.timing = self.timer.timing  # the latest iteration's time and data_time, for hooks
        self.train_dataloader = build_dataloader(train_dataloader, "train_dataloader", self.seed, train=True)
        self.val_dataloader = build_dataloader(val_dataloader, "val_dataloader", self.seed, train=False)
        self.test_dataloader = build_dataloader(test_dataloader, "test_dataloader", self.seed, train=False)
        self.optim_wrapper, self.param_scheduler = optim_wrapper, param_scheduler
        self.load_from, self.resume_from = load_from, resume
        self.auto_scale_lr = dict(auto_scale_lr or {})
        check_keys("auto_scale_lr", self.auto_scale_lr, {"base_batch_size", "enable"})
        self.train_cfg, self.compile = train_cfg, self.cfg.get("compile", compile) if compile == "auto" else compile
        self.train_loop = build_train_loop(self, train_cfg, self.train_dataloader, optim_wrapper)
        self.val_loop = build_eval_loop(self, "val", val_cfg, self.val_dataloader, val_evaluator)
        self.test_loop = build_eval_loop(self, "test", test_cfg, self.test_dataloader, test_evaluator)
        self.model = wrap_model(model, model_wrapper_cfg, self.device, self.world_size)
        self.sharded = is_sharded(self.model)
        evaluates = bool(self.val_loop or self.test_loop)  # a plain module needs loss_fn / predict_fn for these
        self.loss_fn, self.predict_fn = check_model_functions(model, loss_fn, predict_fn, bool(train_cfg), evaluates)
        checkpointed = apply_memory_options(self.model, self.cfg, self.compile)
        self.compile = False if checkpointed else self.compile  # "auto" picks eager (said in the log line)
        self.hooks: list[Hook] = build_hooks(default_hooks, custom_hooks)
        if self.sharded and any(isinstance(h, EMAHook) for h in self.hooks):
            raise ConfigError("custom_hooks: EMAHook cannot evaluate an averaged copy of a sharded model")
        out_dir = next((h.out_dir for h in self.hooks if isinstance(h, CheckpointHook) and h.out_dir), None)
        checkpoints = Path(out_dir) / self.work_dir.name if out_dir else self.work_dir
        self.checkpointer = Checkpointer(self, checkpoints, checkpoint)  # checkpoint: async_save, check_finite_params
        compat.note_metrics(m for loop in (self.val_loop, self.test_loop) if loop for m in loop.evaluator.metrics)
        self.timestamp, self.log_dir, self.logger = open_run_log(self.env, self.work_dir, log_level)
        self.experiment_name = experiment_name or self.timestamp
        self.message_hub = open_message_hub(self)
        self.config_sha256 = dump_config(self.cfg, self.work_dir, self.log_dir, self.timestamp, self.rank == 0)
        self.log_processor = build_log_processor(log_processor, self.by_epoch)
        self.scalars = Visualizer.from_cfg(self.log_dir / "vis_data", visualizer, write=self.rank == 0)
        compat.log_ignored(self.logger)
        if checkpointed:
            self.logger.info(
                f'Enabling the "activation_checkpointing" feature for sub-modules: {checkpointed} (eager train step)'
            )
        self.state: TrainState | None = None
        self.eval_params_key = "params"  # which params the eval loops use ("ema" while EMAHook validates)
        self.eval_buffers_key = "buffers"  # and which buffers ("ema_buffers" for EMAHook(update_buffers=True))
        self.last_metrics: dict[str, Any] = {}  # of the latest validation or test

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | Config) -> Runner:
        """A Runner from a config (a `funceng.config.Config` or a dict of its variables). Variables that are not
        Runner arguments are left for the config's own use; one that looks like a misspelt argument is an error.

        ``model`` may be a module or a dict with ``type`` (a class or a registered name) and its arguments.
        """
        config = cfg if isinstance(cfg, Config) else Config(cfg)
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        values = config.to_dict()
        if "data_preprocessor" in values:  # MMEngine's: the model's, unless the model config sets its own
            if not isinstance(values.get("model"), Mapping):
                raise ConfigError("config: data_preprocessor applies to a model given as a dict (type=...)")
            values["model"] = {"data_preprocessor": values.pop("data_preprocessor"), **values["model"]}
        for key in values:  # a typo of an argument; other variables (train_pipeline, data_root) are the config's own
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
            if key not in names and close:
                raise ConfigError(f"config: {key!r} is not a Runner argument (did you mean {close[0]!r}?)")
        kwargs = {k: v for k, v in values.items() if k in names and k != "cfg"}
        if missing := [k for k in ("model", "work_dir") if k not in kwargs]:
            raise ConfigError(f"config: missing {missing}")
        return cls(**{**kwargs, "model": build_model(kwargs["model"]), "cfg": config})

    build_dataloader = staticmethod(runner_build_dataloader)  # MMEngine's Runner.build_dataloader

    def config_summary(self) -> dict[str, Any]:
        """The run's training config, as checkpoints record it."""
        return {
            "train_cfg": self.train_cfg,
            "optim_wrapper": getattr(self, "optim_wrapper_cfg", self.optim_wrapper),
            "param_scheduler": self.param_scheduler,
            "compile": self.compile,
        }

    def train(self) -> nn.Module:
        """Trains for ``train_cfg``'s length, validating every ``val_interval``; returns the trained model."""
        if self.train_loop is None:
            raise ConfigError("train() needs train_cfg (by_epoch=True + max_epochs, or by_epoch=False + max_iters)")
        if self.state is None and callable(getattr(self.model, "init_weights", None)):
            self.model.init_weights()  # MMEngine's init_cfg, after seeding; a resume or load_from then replaces it
        self.load_or_resume()
        self.logger.info(f"Checkpoints will be saved to {self.checkpointer.directory}.")
        return self.train_loop.run()

    def val(self) -> dict[str, Any]:
        """Runs the validation loop; returns the metrics."""
        return self._evaluate("val", self.val_loop)

    def test(self) -> dict[str, Any]:
        """Runs the test loop; returns the metrics."""
        return self._evaluate("test", self.test_loop)

    def _evaluate(self, mode: str, loop: EvalLoop | None) -> dict[str, Any]:
        if loop is None:
            raise ConfigError(f"{mode}() needs {mode}_dataloader and {mode}_evaluator")
        if self.state is None:
            self.load_or_resume()
        self.call_hook("before_run")  # as MMEngine's val() and test()
        metrics = loop.run()
        self.call_hook("after_run")
        return metrics

    def load_or_resume(self) -> None:
        """Builds the state (with the optimizer and train step when training is configured), then loads
        ``load_from``'s weights or resumes from ``resume``. Called by `train`, `val` and `test`."""
        if self.train_loop is not None and self.train_loop.train_step is None and self.train_dataloader is not None:
            self._build_training()
            if self.resume_from:
                self.checkpointer.resume(self.resume_from)
        elif self.state is None:
            self.create_state(optim.sgd(0.0))  # evaluation only: no optimizer state worth having

    def _build_training(self) -> None:
        loader = self.train_dataloader
        if len(loader) == 0:
            raise ConfigError("train_dataloader is empty (length 0): check the dataset, batch_size and drop_last")
        global_batch = (getattr(loader, "batch_size", None) or 0) * self.world_size
        self.optim_wrapper = scale_lr(self.optim_wrapper, self.auto_scale_lr, global_batch, self.logger)
        self.auto_scale_lr = {}  # scaled once
        if trains_imperatively(self.model, self.optim_wrapper) and self.train_loop.population is None:
            build_imperative_training(self, loader)
            return
        length = train_length(self.train_loop, loader)
        device = next(self.model.parameters()).device
        if self.train_loop.population is not None:  # N members in one vmapped step
            return population_run.build_training(self, length, device, is_ragged(loader))
        setup = build_optimizer(self.optim_wrapper, self.model, self.param_scheduler, length, self.sharded, device)
        log_frozen(self, setup.frozen)
        if setup.hyperparams.tables.plateaus:  # fed by validation metrics, between steps
            plateau = ReduceOnPlateauHook(setup.hyperparams.tables.plateaus, setup.hyperparams)
            self.hooks = sorted([*self.hooks, plateau], key=lambda h: h.priority_value)
        self.create_state(setup.tx)
        if setup.init_scale is not None:  # AmpOptimWrapper(loss_scale=...): a resume then restores the saved one
            self.state["loss_scale"]["scale"].fill_(setup.init_scale)
        setup.hyperparams.locate(self.state["opt_state"])  # found once, before a compiled step traces
        self.train_loop.train_step = make_train_step(
            self.model,
            setup.tx,
            self.loss_fn,
            compile=self.compile,
            amp=setup.amp,
            donate=True,
            dynamic_batch=is_ragged(loader),
            schedule=setup.hyperparams.write,
        )
        facade = config_facade(self, self.optim_wrapper, setup.hyperparams)
        self.optim_wrapper_cfg, self.optim_wrapper = self.optim_wrapper, facade

    def create_state(self, tx: Any) -> None:
        """The state for ``tx``: the model's current weights, the hooks' extra tensors, rank 0's values on every
        rank, and ``load_from``'s weights the first time."""
        first = self.state is None
        state = TrainState.create(self.model, tx, seed=self.env.rank_seed)
        extras = {}
        for hook in self.hooks:
            extras.update(hook.extra_state(dict(state["params"].items()), buffers=dict(state["buffers"].items())))
        if extras:
            state = TrainState({**dict(state.unlock_().items()), **extras}, batch_size=[])
            state.lock_()
        self.state = state
        if first and self.load_from:
            self.checkpointer.load_weights(self.load_from)
        if not self.sharded:  # ranks may have initialised their models differently: all start from rank 0's state
            dist.broadcast_(flatten(state.exclude("rng"))[1])

    def eval_state(self) -> TrainState:
        """The state the eval loops use: the current one, with ``eval_params_key``'s params (EMA's, say)."""
        if self.eval_params_key == "params" and self.eval_buffers_key == "buffers":
            return self.state
        swapped = {"params": self.state[self.eval_params_key], "buffers": self.state[self.eval_buffers_key]}
        return TrainState({**dict(self.state.items()), **swapped}, batch_size=[])

    def sync_model(self) -> None:
        """Points the model at the current state's weights (of a population, the best member's); compiled steps
        never touch the module."""
        if self.state is not None and not self.sharded:
            binding.bind(self.model, (shown := population_run.shown_member(self))["params"], shown["buffers"])

    def save_checkpoint(self, name: str, update_last: bool = True) -> Path:
        """Saves the state as checkpoint ``name`` (see `funceng.runner.checkpointer.Checkpointer.save`)."""
        return self.checkpointer.save(name, update_last)

    def save_weights(self, path: str | os.PathLike) -> Path:
        """Writes the model's weights as a ``state_dict``-compatible safetensors file (`funceng.save_weights`)."""
        return save_weights(population_run.shown_member(self), path)

    def call_hook(self, stage: str, **kwargs: Any) -> None:
        for hook in self.hooks:
            getattr(hook, stage)(self, **kwargs)

    def close(self) -> None:
        """Closes the log file and the scalar writers."""
        self.logger.close()
        self.scalars.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
