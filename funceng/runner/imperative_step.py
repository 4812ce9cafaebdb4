"""MMEngine's imperative training: an overridden ``BaseModel.train_step(data, optim_wrapper)``, and optimizer
wrappers given as objects around ``torch.optim`` optimizers.

The wrappers' ``torch.optim`` optimizers are translated, group by group, into funceng's functional optimizer
(same class, same hyperparameters), which the state is built for; each wrapper is then bound
(`funceng.optim.imperative.OptimWrapper.bind`) so that its ``step`` updates its own groups of the state in place.
`ImperativeTrainStep` has the ``(state, batch) -> (state, metrics)`` shape of a pure step, so the loops,
checkpoints and resume work unchanged; it runs eagerly, as MMEngine's does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from funceng import binding, optim, tree
from funceng.errors import ConfigError
from funceng.loss import parse_loss
from funceng.optim.constructors import build_optim_wrapper, is_wrapper_object
from funceng.optim.imperative import BoundUpdate, OptimWrapperDict
from funceng.registry import OPTIMIZERS, keyword_parameters
from funceng.runner.log import log_frozen
from funceng.runner.optim_wrapper import IMPLEMENTATION_OPTIONS, injectable
from funceng.runner.param_scheduler import ScheduledHyperparams, TrainLength, schedule_tables, train_length
from funceng.state import trainable_names


def overrides_train_step(model: nn.Module) -> bool:
    """Whether ``model`` defines its own ``train_step`` (MMEngine's way to write a GAN)."""
    from funceng.model import BaseModel

    return isinstance(model, BaseModel) and type(model).train_step is not BaseModel.train_step


def trains_imperatively(model: nn.Module, optim_wrapper: Any) -> bool:
    """Whether the Runner trains by calling ``model.train_step`` (see the module docstring): the model overrides
    it, or the optimizer comes as wrapper objects or from a constructor other than the default one."""
    constructor = optim_wrapper.get("constructor") if isinstance(optim_wrapper, Mapping) else None
    custom = constructor not in (None, "DefaultOptimWrapperConstructor")
    return overrides_train_step(model) or is_wrapper_object(optim_wrapper) or custom


class WrapperOptimizer:
    """The functional optimizer for optimizer wrapper objects: one `optim.partition` group per ``torch.optim``
    param group, labelled ``"<wrapper>/<index>"``; parameters in no group are left unchanged (``"unoptimized"``)."""

    def __init__(self, optim_wrapper: Any, model: nn.Module, param_scheduler: Any, length: TrainLength):
        self.wrappers = dict(optim_wrapper) if isinstance(optim_wrapper, OptimWrapperDict) else {"": optim_wrapper}
        by_id = {id(p): name for name, p in model.named_parameters()}
        self.transforms: dict[str, optim.GradientTransformation] = {"unoptimized": optim.set_to_zero()}
        self.labels: dict[str, str] = {name: "unoptimized" for name in by_id.values()}
        self.groups: dict[str, list[tuple[str, dict]]] = {}
        self.hyperparams: dict[str, ScheduledHyperparams] = {}
        for wname, wrapper in self.wrappers.items():
            where = f"optim_wrapper[{wname!r}]" if wname else "optim_wrapper"
            optimizer = wrapper._optimizer
            if optimizer is None:
                raise ConfigError(f"{where}: an OptimWrapper object needs a torch.optim optimizer")
            if optimizer.state:
                raise ConfigError(
                    f"{where}: the torch.optim optimizer has already stepped; its state cannot move into the "
                    "funceng state. Pass a fresh optimizer"
                )
            factory = OPTIMIZERS.resolve(type(optimizer), f"{where}.optimizer")
            self.groups[wname] = []
            schedulers = _schedulers_of(param_scheduler, wname, list(self.wrappers))
            tables = schedule_tables(
                schedulers, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups], length
            )
            labels = [f"{wname}/{index}" if wname else str(index) for index in range(len(optimizer.param_groups))]
            if tables.plateaus:
                raise ConfigError(
                    f"{where}: ReduceOnPlateau schedulers need a config dict optim_wrapper (the Runner's compiled "
                    "step), not optimizer wrapper objects or an overridden train_step"
                )
            self.hyperparams[wname] = hyperparams = ScheduledHyperparams(tables, labels, _device_of(optimizer))
            names = injectable(factory, hyperparams.injected, type(optimizer).__name__)
            injected = optim.inject_hyperparams(factory, names)
            for index, (label, group) in enumerate(zip(labels, optimizer.param_groups)):
                kwargs = _hyperparameters(optimizer, group, factory, f"{where}.optimizer.param_groups[{index}]")
                self.transforms[label] = injected(**{**kwargs, "lr": group["lr"]})
                for p in group["params"]:
                    if id(p) not in by_id:
                        raise ConfigError(f"{where}: its optimizer holds a parameter that is not the model's")
                    self.labels[by_id[id(p)]] = label
                self.groups[wname].append((label, {k: v for k, v in group.items() if k != "params"}))
        self.tx = optim.partition(self.transforms, self.labels)
        self.names_by_label = {
            label: [n for n, lab in self.labels.items() if lab == label] for label in self.transforms
        }

    def unoptimized(self) -> tuple[str, ...]:
        return tuple(name for name, label in self.labels.items() if label == "unoptimized")

    def bind(self, runner: Any) -> Any:
        """Binds every wrapper to ``runner``'s state; returns what the model's ``train_step`` receives."""
        trainable = set(trainable_names(runner.model))  # the state has optimizer state for these only
        for wname, wrapper in self.wrappers.items():
            labels = [label for label, _ in self.groups[wname]]
            names = [n for n, label in self.labels.items() if label in labels and n in trainable]
            wrapper.bind(
                runner.model,
                BoundUpdate(
                    names,
                    lambda grads, labels=labels, wname=wname: self._update(runner.state, grads, labels, wname),
                    lambda runner=runner, wname=wname: self._current(runner, wname),
                    [g for _, g in self.groups[wname]],
                ),
            )
        return self.wrappers[""] if "" in self.wrappers else OptimWrapperDict(**self.wrappers)

    def _update(self, state: Any, grads: dict[str, torch.Tensor], labels: list[str], wname: str) -> None:
        """Applies each label's transform to its parameters' gradients, writing into ``state`` in place, with the
        hyperparameters its schedulers give this iteration."""
        with torch.no_grad():
            self.hyperparams[wname].write(state["step"], state["opt_state"])
            for label in labels:
                names = [n for n in self.names_by_label[label] if n in grads]
                if not names:
                    continue
                params = {n: state["params"][n] for n in names}
                template, leaves = tree.flatten(state["opt_state"][label])
                opt_state = tree.unflattener(template)(leaves)
                updates = optim.update_in_place(self.transforms[label], {n: grads[n] for n in names}, opt_state, params)
                optim.apply_updates(params, updates)

    def _current(self, runner: Any, wname: str) -> list[dict]:
        hyperparams, step = self.hyperparams[wname], runner.lr_step()
        return [hyperparams.group_values(runner.state, index, step) for index in range(len(self.groups[wname]))]


def _schedulers_of(param_scheduler: Any, wrapper: str, wrappers: list[str]) -> Any:
    """The schedulers of one wrapper: MMEngine's ``param_scheduler`` is one list for every optimizer, or a dict
    keyed by the wrappers' names."""
    if isinstance(param_scheduler, Mapping) and "type" not in param_scheduler:
        unknown = set(param_scheduler) - set(wrappers)
        if unknown:
            raise ConfigError(f"param_scheduler: {sorted(unknown)} name no optimizer wrapper; they are {wrappers}")
        return param_scheduler.get(wrapper)
    return param_scheduler


def _device_of(optimizer: torch.optim.Optimizer) -> torch.device:
    return next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))


def _hyperparameters(optimizer: torch.optim.Optimizer, group: Mapping, factory: Callable, where: str) -> dict:
    """The group's hyperparameters that ``factory`` takes; any other one must have torch's default value."""
    accepted = keyword_parameters(factory) or set()
    defaults = {
        name: p.default
        for name, p in inspect.signature(type(optimizer).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    kwargs = {}
    for key, value in group.items():
        if key in ("params", "lr", "initial_lr") or key in IMPLEMENTATION_OPTIONS:
            continue
        if key in accepted:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in defaults and value != defaults[key]:
            raise ConfigError(
                f"{where}: {type(optimizer).__name__}({key}={value!r}) is not supported by funceng's "
                f"{type(optimizer).__name__}; it takes {sorted(accepted)}"
            )
    return kwargs


def build_imperative_training(runner: Any, loader: Any) -> None:
    """An overridden ``train_step``, or optimizer wrapper objects: see `funceng.runner.imperative_step`."""
    if runner.sharded:
        raise ConfigError("an overridden train_step or optimizer wrapper objects cannot train a sharded model")
    wrappers = runner.optim_wrapper
    if not is_wrapper_object(wrappers):
        wrappers = build_optim_wrapper(runner.model, wrappers)
    if isinstance(wrappers, OptimWrapperDict) and not overrides_train_step(runner.model):
        raise ConfigError(
            f"optim_wrapper holds several optimizers, so {type(runner.model).__name__} must override "
            "train_step(data, optim_wrapper) to say which loss each one minimises"
        )
    setup = WrapperOptimizer(wrappers, runner.model, runner.param_scheduler, train_length(runner.train_loop, loader))
    log_frozen(runner, setup.unoptimized(), why="being in no optimizer's param groups")
    runner.create_state(setup.tx)
    for hyperparams in setup.hyperparams.values():
        hyperparams.locate(runner.state["opt_state"])
    bound = setup.bind(runner)
    if runner.compile not in (False, "auto"):  # "auto" is the default: only an explicit request is worth a warning
        runner.logger.warning(
            f"{type(runner.model).__name__}.train_step runs eagerly, as in MMEngine, because "
            + ("it is overridden" if overrides_train_step(runner.model) else "optim_wrapper is an object")
            + " (compile applies to validation and testing; a config dict optim_wrapper compiles training)"
        )
    runner.train_loop.train_step = ImperativeTrainStep(runner.model, bound, runner)
    runner.optim_wrapper_cfg, runner.optim_wrapper = runner.optim_wrapper, bound


class ImperativeTrainStep:
    """``(state, batch) -> (state, metrics)`` by calling ``model.train_step(batch, optim_wrapper)`` on the model
    bound to the state: the wrappers' ``step`` writes the new parameters and optimizer state into the state."""

    def __init__(self, model: nn.Module, optim_wrapper: Any, runner: Any = None):
        self.model, self.optim_wrapper, self.runner = model, optim_wrapper, runner
        self._counting = False

    def __call__(self, state: Any, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        if not self._counting and self.runner is not None:  # after a resume: accumulation windows continue
            self.optim_wrapper.initialize_count_status(self.model, self.runner.iter, self.runner.max_iters)
            self._counting = True
        binding.bind(self.model, state["params"], state["buffers"])
        self.model.train()
        outputs = self.model.train_step(batch, self.optim_wrapper)
        with torch.no_grad():
            state["step"].add_(1)
        return state, logged_values(outputs, type(self.model).__name__)


def logged_values(outputs: Any, model_name: str) -> dict[str, torch.Tensor]:
    """What ``train_step`` returned, as metrics with a ``"loss"`` entry (the sum of the ``*loss*`` entries when
    it has none), every value a detached 0-d tensor."""
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"{model_name}.train_step must return a dict of values to log (MMEngine's log_vars), got "
            f"{type(outputs).__name__}"
        )
    metrics = {k: torch.as_tensor(v).detach().float().mean() for k, v in outputs.items()}
    if "loss" not in metrics:
        try:
            metrics["loss"] = parse_loss(metrics)[0]
        except KeyError:
            raise KeyError(
                f"{model_name}.train_step returned {sorted(outputs)}: no entry named or containing 'loss', which "
                "funceng needs to stop a run whose loss becomes non-finite"
            ) from None
    return metrics
