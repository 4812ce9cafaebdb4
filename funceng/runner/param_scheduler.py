"""MMEngine's ``param_scheduler`` dicts as tables of hyperparameter values, one value per iteration (or per epoch
when every scheduler counts epochs), that the compiled train step indexes with its step counter.

The tables come from stepping MMEngine's rules (`funceng.runner.scheduler_rules`) exactly as MMEngine's
``ParamSchedulerHook`` does: schedulers built in config order, each stepping once when built, the iteration-based
ones after every iteration and the epoch-based ones after every epoch, each moving the param group's *current*
value. So the values are MMEngine's, bit for bit, including chained schedulers, ``end`` defaults, ``last_step``
and ``convert_to_iter_based``. Reading a table inside the step is a pure function of the step number: a new value
never recompiles. ``ReduceOnPlateau*`` depends on validation metrics instead (`funceng.runner.plateau`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from funceng.errors import ConfigError, check_keys
from funceng.registry import PARAM_SCHEDULERS as SCHEDULERS
from funceng.registry import keyword_parameters, type_name
from funceng.runner import compat
from funceng.runner.scheduler_rules import ReduceOnPlateau, Rule

INF = 10**9  # MMEngine's "no end"
COMMON_KEYS = {"type", "begin", "end", "by_epoch", "convert_to_iter_based", "last_step", "verbose"}
Group = dict[str, Any]


@dataclass(frozen=True)
class TrainLength:
    """The train loop the schedulers run in: iterations per epoch, and its length."""

    epoch_length: int
    max_iters: int
    max_epochs: int  # 1 for an iteration-based loop, as MMEngine's IterBasedTrainLoop says
    by_epoch: bool


def train_length(loop: Any, loader: Any) -> TrainLength:
    """The `TrainLength` of a train loop over ``loader`` (a custom loop without ``max_epochs`` counts as one)."""
    return TrainLength(len(loader), loop.max_iters, getattr(loop, "max_epochs", None) or 1, loop.by_epoch)


class Scheduler:
    """One built scheduler: MMEngine's ``_ParamScheduler`` bookkeeping around a `Rule`."""

    def __init__(self, rule: Rule, param: str, begin: int, end: int, by_epoch: bool, last_step: int, groups: list):
        self.rule, self.param, self.begin, self.end, self.by_epoch = rule, param, begin, end, by_epoch
        self.use_betas = param == "momentum" and "momentum" not in groups[0] and "betas" in groups[0]
        if param == "momentum" and not self.use_betas and "momentum" not in groups[0]:
            raise ConfigError("a momentum scheduler needs an optimizer with 'momentum' or 'betas'")
        if self.use_betas:
            for group in groups:
                group["momentum"] = group["betas"][0]
        if param not in groups[0]:
            known = sorted(k for k, v in groups[0].items() if isinstance(v, (int, float)) and k != "params")
            raise ConfigError(f"the optimizer has no hyperparameter {param!r} to schedule; it has {known}")
        if last_step != -1 and any(f"initial_{param}" not in group for group in groups):
            raise ConfigError(
                f"last_step={last_step}: resuming a scheduler by step needs 'initial_{param}' in the param "
                "groups, set by an earlier scheduler with last_step=-1 (MMEngine's rule too)"
            )
        rule.setup(groups, param, begin, end)
        if last_step == -1:
            for group in groups:
                group.setdefault(f"initial_{param}", group[param])
        self.base = [group[f"initial_{param}"] for group in groups]
        self.last_step, self.global_step = last_step, -1
        if not isinstance(rule, ReduceOnPlateau):
            self.step(groups)

    def step(self, groups: list[Group]) -> None:
        self.global_step += 1
        if self.begin <= self.global_step < self.end:
            self.last_step += 1
            values = [self.rule.value(self.last_step, g[self.param], b, g) for g, b in zip(groups, self.base)]
            for group, value in zip(groups, values):
                group[self.param] = value
        if self.use_betas:
            for group in groups:
                group["betas"] = (group["momentum"], group["betas"][1])

    @property
    def key(self) -> tuple[str, int | None]:
        """Where the value lives in a param group: ``("betas", 0)`` for the Adam family's momentum."""
        return ("betas", 0) if self.use_betas else (self.param, None)


def build_schedulers(cfgs: Any, groups: list[Group], length: TrainLength) -> list[Scheduler]:
    """The schedulers ``param_scheduler`` configures, built in order on ``groups`` (which they modify)."""
    if not cfgs:
        return []
    cfgs = [cfgs] if isinstance(cfgs, Mapping) else list(cfgs)
    return [_build(cfg, f"param_scheduler[{i}]", groups, length) for i, cfg in enumerate(cfgs)]


def _build(cfg: Mapping, where: str, groups: list[Group], length: TrainLength) -> Scheduler:
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ConfigError(f"{where}: expected dict(type=..., ...); supported types: {SCHEDULERS.names()}")
    rule_class = SCHEDULERS.resolve(cfg["type"], f"{where}.type")
    name = type_name(cfg["type"])
    if not (isinstance(rule_class, type) and issubclass(rule_class, Rule)):
        raise ConfigError(f"{where}.type: {name} is not one of MMEngine's parameter schedulers")
    own = (keyword_parameters(rule_class) or set()) | ({"param_name"} if rule_class.param is None else set())
    check_keys(f"{where} ({name})", cfg, COMMON_KEYS | own)
    param = rule_class.param or cfg.get("param_name")
    if not param:
        raise ConfigError(f"{where} ({name}): missing 'param_name' (the hyperparameter to schedule, e.g. 'lr')")
    if cfg.get("verbose"):
        compat.ignored("param_scheduler.verbose")
    by_epoch = cfg.get("by_epoch", True)
    convert = cfg.get("convert_to_iter_based", False)
    plateau = issubclass(rule_class, ReduceOnPlateau)
    if convert and (not by_epoch or plateau):
        raise ConfigError(f"{where}: convert_to_iter_based needs by_epoch=True and a scheduler that steps by epoch")
    if plateau and not by_epoch:
        raise ConfigError(f"{where} ({name}): ReduceOnPlateau steps after validation epochs only (by_epoch=True)")
    if by_epoch and not convert and not plateau and not length.by_epoch:
        raise ConfigError(
            f"{where} ({name}): by_epoch=True in an iteration-based loop never steps (MMEngine steps it after each "
            "epoch, and an IterBasedTrainLoop has none): set by_epoch=False, or convert_to_iter_based=True"
        )
    begin = cfg.get("begin", 0)
    end = cfg.get("end", length.max_epochs if by_epoch else length.max_iters)
    args = {k: v for k, v in cfg.items() if k not in COMMON_KEYS | {"param_name"}}
    if convert:
        scale = length.epoch_length
        begin, end = int(begin * scale), int(end * scale) if end != INF else end
        for arg in rule_class.epoch_args:
            if args.get(arg) is not None:
                value = args[arg]
                args[arg] = [v * scale for v in value] if isinstance(value, (list, tuple)) else value * scale
        by_epoch = False
    if end <= begin:
        raise ConfigError(f"{where} ({name}): end ({end}) must be greater than begin ({begin})")
    last_step = cfg.get("last_step", -1)
    if not isinstance(last_step, int) or last_step < -1:
        raise ConfigError(f"{where}.last_step: expected an int >= -1, got {last_step!r}")
    try:
        rule = rule_class(**args)
        return Scheduler(rule, param, begin, end, by_epoch, last_step, groups)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from None


@dataclass
class Tables:
    """Each scheduled hyperparameter's value in each param group: ``values[key][group][tick]``, a tick being an
    iteration (or an epoch when ``per_epoch``). ``key`` is ``(name, index)``, e.g. ``("lr", None)`` or
    ``("betas", 0)``. ``plateaus``: the schedulers fed by validation metrics."""

    per_epoch: bool
    epoch_length: int
    values: dict[tuple[str, int | None], list[list[float]]] = field(default_factory=dict)
    plateaus: list[Scheduler] = field(default_factory=list)

    def tick(self, iteration: int) -> int:
        return iteration // self.epoch_length if self.per_epoch else iteration

    def value(self, key: tuple[str, int | None], group: int, iteration: int) -> float:
        """The value iteration ``iteration`` (0-based) trains with."""
        column = self.values[key][group]
        return column[min(self.tick(iteration), len(column) - 1)]

    def device_tables(self, device: torch.device) -> dict[tuple[str, int | None], Tensor]:
        """``values`` as float64 tensors of shape ``[groups, ticks]`` on ``device``."""
        return {key: torch.tensor(v, dtype=torch.float64, device=device) for key, v in self.values.items()}

    def index(self, step: Tensor, ticks: int) -> Tensor:
        """The tick that the 0-d int64 ``step`` (iterations done) falls in, clamped to the table."""
        tick = torch.div(step, self.epoch_length, rounding_mode="floor") if self.per_epoch else step
        return torch.clamp(tick, 0, ticks - 1)


def simulate(schedulers: list[Scheduler], groups: list[Group], length: TrainLength) -> Tables:
    """Steps ``schedulers`` (built on ``groups``) through the run as MMEngine's ParamSchedulerHook does, recording
    the values each iteration trains with."""
    stepping = [s for s in schedulers if not isinstance(s.rule, ReduceOnPlateau)]
    plateaus = [s for s in schedulers if isinstance(s.rule, ReduceOnPlateau)]
    keys = list(dict.fromkeys(s.key for s in stepping))
    for plateau in plateaus:
        if any(s.param == plateau.param for s in stepping):
            raise ConfigError(
                f"ReduceOnPlateau on {plateau.param!r} together with another scheduler of {plateau.param!r}: "
                "funceng keeps a plateau's value in the state and cannot chain it with a table; use one of them"
            )
    per_epoch = length.by_epoch and all(s.by_epoch for s in stepping)
    tables = Tables(per_epoch, length.epoch_length, {k: [[] for _ in groups] for k in keys}, plateaus)

    def record() -> None:
        for name, index in keys:
            for column, group in zip(tables.values[(name, index)], groups):
                column.append(float(group[name] if index is None else group[name][index]))

    by_iter = [s for s in stepping if not s.by_epoch]
    by_epoch = [s for s in stepping if s.by_epoch]
    record()
    if per_epoch:
        for _ in range(1, length.max_epochs):
            for scheduler in by_epoch:
                scheduler.step(groups)
            record()
    elif keys:
        for iteration in range(1, length.max_iters):
            for scheduler in by_iter:
                scheduler.step(groups)
            if length.by_epoch and iteration % length.epoch_length == 0:
                for scheduler in by_epoch:
                    scheduler.step(groups)
            record()
    return tables


def schedule_tables(param_scheduler: Any, groups: Sequence[Group], length: TrainLength) -> Tables:
    """The tables of ``param_scheduler`` for optimizer param groups with the hyperparameters ``groups``."""
    groups = [dict(g) for g in groups]
    return simulate(build_schedulers(param_scheduler, groups, length), groups, length)


class ScheduledHyperparams:
    """A run's hyperparameter tables for its optimizer groups, written into the state by the train step.

    ``labels``: the `funceng.optim.partition` label of each group (``[None]`` for one unpartitioned group); each
    group's optimizer is built with `funceng.optim.inject_hyperparams`, so its hyperparameters are tensors of the
    state. `write` is the train step's ``schedule``: it indexes the tables with the step counter, in the graph.
    """

    def __init__(self, tables: Tables, labels: list[str | None], device: torch.device | str | None):
        self.tables, self.labels = tables, labels
        on_device = tables.device_tables(torch.device(device) if device is not None else torch.device("cpu"))
        self.keys = list(on_device)
        # every (key, group) column in one [keys * groups, ticks] table: one gather per step, whatever the count
        self.stacked = torch.cat([on_device[key] for key in self.keys]) if self.keys else None
        self._paths: list[tuple[str, ...]] | None = None

    @property
    def injected(self) -> set[str]:
        """The hyperparameter names each group's optimizer keeps in the state: ``lr`` always, and the scheduled
        ones."""
        return {"lr"} | {name for name, _ in self.tables.values} | {p.param for p in self.tables.plateaus}

    def locate(self, opt_state: Any) -> None:
        """Finds each group's injected hyperparameters in an optimizer state of this run (its structure is fixed
        for the run), once: before a compiled step traces, which must not see this bookkeeping change."""
        from funceng.optim.hyperparams import find_hyperparams

        found = [path for path, _ in find_hyperparams(opt_state)]
        self._paths = []
        for label in self.labels:
            matching = [path for path in found if label is None or label in path]
            if len(matching) != 1:
                raise ValueError(f"param group {label!r}: expected one injected optimizer, found {matching}")
            self._paths.append(matching[0])

    def group_hyperparams(self, opt_state: Any) -> list[Any]:
        """Each group's ``hyperparams`` (a dict of tensors) in ``opt_state``, in group order."""
        if self._paths is None:
            self.locate(opt_state)
        nodes = []
        for path in self._paths:
            node = opt_state
            for key in path:
                node = node[key]
            nodes.append(node["hyperparams"])
        return nodes

    def write(self, step: Tensor, opt_state: Any) -> None:
        """Sets every scheduled hyperparameter to its value at iteration ``step`` (a 0-d int64 tensor): one gather
        from the tables and one foreach copy, no host sync and nothing that depends on the step's value."""
        if self.stacked is None:
            return
        nodes = self.group_hyperparams(opt_state)
        targets = [
            nodes[group][name] if position is None else nodes[group][name][position]
            for name, position in self.keys
            for group in range(len(nodes))
        ]
        tick = self.tables.index(step, self.stacked.shape[1]).reshape(1)
        values = torch.index_select(self.stacked, 1, tick).reshape(-1)
        torch._foreach_copy_(targets, list(values.unbind()))

    def group_values(self, state: Any, group: int, iteration: int) -> dict[str, Any]:
        """Group ``group``'s hyperparameters at ``iteration``: the tables' values, the others as the state holds
        them now (a plateau's); ``{}`` before there is a state."""
        if state is None:
            return {}
        hyperparams = self.group_hyperparams(state["opt_state"])[group]
        values = {name: tuple(v.tolist()) if v.ndim else v.item() for name, v in hyperparams.items()}
        for (name, position), _ in self.tables.values.items():
            value = self.tables.value((name, position), group, iteration)
            if position is None:
                values[name] = value
            else:
                values[name] = tuple(value if i == position else v for i, v in enumerate(values[name]))
        return values
