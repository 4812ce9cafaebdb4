"""The Runner training a population (`funceng.population`): ``train_cfg=dict(..., population=dict(seeds=[0, 1, 2,
3], grid=dict(lr=[1e-3, 1e-2])))`` trains one member per (seed, grid point), all in one vmapped step.

- Members: every seed crossed with every point of ``grid`` (a dict of lists: their Cartesian product), or, without
  a grid, ``seeds`` zipped with per-member lists (``population=dict(seeds=[0, 1], lr=[1e-3, 1e-2])``);
  ``members=N`` alone means seeds ``seed, seed + 1, ...`` of ``randomness.seed``.
- A member's hyperparameter replaces the optimizer's configured value: every param group's value is scaled by
  ``member / configured`` (``lr_mult`` ratios kept), and a schedule's values too (`make_population_step`'s
  ``hyperparam_scales``).
- The log shows the members' mean loss with its min and max; the scalars file has each member's loss, so
  ``funceng plot`` draws one curve per member. Validation evaluates every member; the metrics returned (and
  ``save_best``) are the best member's, with ``best_member`` and each member's values beside them.
- Checkpoints hold the whole population and resume exactly; `Runner.save_weights` writes the best member's.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from funceng import population
from funceng.errors import ConfigError
from funceng.evaluator import metric_rule
from funceng.population_step import make_population_step
from funceng.runner.hooks import CheckpointHook, EMAHook
from funceng.runner.imperative_step import trains_imperatively
from funceng.runner.log import MEMBER_PREFIX, log_frozen
from funceng.runner.optim_wrapper import build_optimizer, config_facade, optimizer_kwargs

if TYPE_CHECKING:
    from funceng.runner.runner import Runner


@dataclass
class PopulationPlan:
    seeds: list[int]
    values: dict[str, list[float]]  # per-member hyperparameters, in member order

    @property
    def members(self) -> int:
        return len(self.seeds)

    def describe(self, index: int) -> str:
        values = ", ".join(f"{name}={column[index]:g}" for name, column in self.values.items())
        return f"member {index} (seed={self.seeds[index]}{', ' + values if values else ''})"


def parse_plan(cfg: Mapping[str, Any], seed: int) -> PopulationPlan:
    """The members ``train_cfg.population`` describes; ``seed``: the run's, for ``members=N``."""
    cfg = dict(cfg)
    grid = dict(cfg.pop("grid", None) or {})
    members = cfg.pop("members", None)
    seeds = cfg.pop("seeds", None)
    if seeds is None and members is None:
        raise ConfigError("train_cfg.population: give seeds=[...] or members=N")
    if seeds is None:
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ConfigError(f"train_cfg.population.members must be a positive int, got {members!r}")
        seeds = [seed + i for i in range(members)]
    seeds = [int(s) for s in seeds]
    for name, column in {**grid, **cfg}.items():
        if not isinstance(column, (list, tuple)) or not all(isinstance(v, (int, float)) for v in column):
            raise ConfigError(f"train_cfg.population.{name}: expected a list of numbers, got {column!r}")
    if grid:
        names = list(grid)
        points = list(itertools.product(seeds, *(grid[n] for n in names)))
        seeds = [p[0] for p in points]
        values = {n: [float(p[1 + i]) for p in points] for i, n in enumerate(names)}
    else:
        values = {n: [float(v) for v in column] for n, column in cfg.items()}
    for name, column in values.items():
        if grid and name in cfg:
            raise ConfigError(f"train_cfg.population: {name!r} is given both in grid and as a per-member list")
        if len(column) != len(seeds):
            raise ConfigError(f"train_cfg.population.{name} has {len(column)} values for {len(seeds)} members")
    if members is not None and members != len(seeds):
        raise ConfigError(f"train_cfg.population: members={members} but the seeds and grid give {len(seeds)}")
    return PopulationPlan(seeds, values)


SWEEPABLE = ("lr", "momentum", "weight_decay")  # the numeric hyperparameters funceng's optimizers keep as tensors


def _configured(optim_wrapper: Mapping[str, Any], factory: Any, name: str) -> float:
    """The optimizer's configured value of hyperparameter ``name``, which a member's value replaces."""
    if name not in SWEEPABLE:
        raise ConfigError(f"train_cfg.population: {name!r} cannot differ per member; a population sweeps {SWEEPABLE}")
    given = optim_wrapper["optimizer"].get(name)
    if given is None:
        default = inspect.signature(factory).parameters.get(name)
        given = default.default if default is not None else None
    if not isinstance(given, (int, float)):
        raise ConfigError(f"train_cfg.population: the optimizer has no numeric hyperparameter {name!r} to sweep")
    return float(given)


def build_training(runner: Runner, length: Any, device: torch.device, dynamic_batch: bool) -> None:
    """Builds the optimizer (the swept hyperparameters kept in the state), the population state and its step."""
    plan: PopulationPlan = runner.train_loop.population
    if trains_imperatively(runner.model, runner.optim_wrapper):
        raise ConfigError(
            "train_cfg.population: this model trains imperatively (its own train_step, or several optimizers), "
            "which cannot be vmapped over members; a population needs the functional step"
        )
    factory = optimizer_kwargs(runner.optim_wrapper)[0]
    configured = {name: _configured(runner.optim_wrapper, factory, name) for name in plan.values}
    setup = build_optimizer(
        runner.optim_wrapper, runner.model, runner.param_scheduler, length, runner.sharded, device, plan.values
    )
    log_frozen(runner, setup.frozen)
    if setup.hyperparams.tables.plateaus:
        raise ConfigError("train_cfg.population: ReduceOnPlateau schedulers are not supported with a population")
    if runner.sharded or runner.world_size > 1:
        raise ConfigError("train_cfg.population: a population trains in one process (no launcher, no sharding)")
    if any(isinstance(h, EMAHook) for h in runner.hooks):
        raise ConfigError("train_cfg.population: EMAHook is not supported with a population")
    if runner.load_from:
        raise ConfigError("train_cfg.population: load_from is not supported with a population")
    state = population.create(runner.model, setup.tx, seeds=plan.seeds)
    if setup.init_scale is not None:
        state["loss_scale"]["scale"].fill_(setup.init_scale)
    scheduled = {name for name, _ in setup.hyperparams.tables.values}  # plateaus were refused above
    scales = {}
    for name, column in plan.values.items():
        if configured[name] == 0:
            if name in scheduled or runner.optim_wrapper.get("paramwise_cfg"):
                raise ConfigError(
                    f"train_cfg.population: sweeping {name} from a configured 0 cannot keep its "
                    "schedule or paramwise multipliers; configure a non-zero value"
                )
            population.set_hyperparams(state, **{name: column})
            continue
        factors = torch.tensor(column, dtype=torch.float64) / configured[name]
        if name in scheduled:
            scales[name] = factors
        else:
            population.scale_hyperparams(state, **{name: factors})
    runner.state = state
    setup.hyperparams.locate(state["opt_state"])
    step = make_population_step(
        runner.model,
        setup.tx,
        runner.loss_fn,
        members=plan.members,
        hyperparam_scales=scales or None,
        compile=runner.compile,
        amp=setup.amp,
        dynamic_batch=dynamic_batch,
        schedule=setup.hyperparams.write,
    )
    runner.train_loop.train_step = RunnerStep(step)
    runner.optim_wrapper_cfg = runner.optim_wrapper
    runner.optim_wrapper = config_facade(runner, runner.optim_wrapper, setup.hyperparams)
    runner.best_member = 0
    runner.logger.info(
        f"Training a population of {plan.members} members in one step: "
        + "; ".join(plan.describe(i) for i in range(plan.members))
    )


class RunnerStep:
    """The population step as the loops and hooks see it: the mean loss (and its min and max) for the log line,
    each member's loss for the scalars file."""

    def __init__(self, step: Any):
        self.step = step

    def __call__(self, state: Any, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        state, metrics = self.step(state, batch)
        loss = metrics["loss"]
        outputs = {"loss": loss.mean(), "loss_min": loss.min(), "loss_max": loss.max()}
        for key, value in metrics.items():
            if key not in ("loss", "lr", "grad_norm"):
                outputs[key] = value.float().mean()
        for index, value in enumerate(loss.unbind()):
            outputs[f"{MEMBER_PREFIX}{index}/loss"] = value
        return state, outputs


def evaluate(loop: Any, state: Any) -> dict[str, Any]:
    """Every member evaluated over ``loop``'s loader (one pass over the data); returns the best member's metrics
    with ``best_member`` and each member's values (``member_<i>/<metric>``)."""
    runner = loop.runner
    n = population.size(state)
    evaluators = getattr(loop, "member_evaluators", None)
    if evaluators is None or len(evaluators) != n:
        evaluators = loop.member_evaluators = [copy.deepcopy(loop.evaluator) for _ in range(n)]
    results = loop.evaluate_states([population.member(state, i, copy=False) for i in range(n)], evaluators)
    key, rule = _ranking(runner, results[0])
    values = [float(r[key]) for r in results]
    best = (max if rule == "greater" else min)(range(n), key=values.__getitem__)
    runner.best_member = best
    plan = runner.train_loop.population if runner.train_loop is not None else None
    who = plan.describe(best) if plan is not None else f"member {best}"
    runner.logger.info(
        f"Members' {key}: " + " ".join(f"{i}:{v:.4f}" for i, v in enumerate(values)) + f"; best is {who}"
    )
    metrics = {**results[best], "best_member": best}
    for index, result in enumerate(results):
        metrics.update({f"{MEMBER_PREFIX}{index}/{k}": v for k, v in result.items()})
    return metrics


def _ranking(runner: Runner, metrics: Mapping[str, Any]) -> tuple[str, str]:
    """The metric members are ranked by: ``save_best``'s (with its rule) when set, else the first one."""
    hook = next((h for h in runner.hooks if isinstance(h, CheckpointHook) and h.save_best), None)
    key = hook.save_best if hook is not None and hook.save_best != "auto" else next(iter(metrics))
    try:
        return key, metric_rule(key, hook.rule if hook is not None else None)
    except ConfigError as error:
        raise ConfigError(f"ranking the population's members by {key!r}: {error} (CheckpointHook's rule)") from None


def shown_member(runner: Runner) -> Any:
    """The state the model shows and `Runner.save_weights` writes: the runner's state, or of a population the best
    member's (views of its rows)."""
    if population.size(runner.state) is None:
        return runner.state
    return population.member(runner.state, getattr(runner, "best_member", 0), copy=False)
