"""Validation and test loops: one pass of the eval step over a loader, the outputs fed to the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from funceng import dist, population, rng
from funceng.errors import ConfigError
from funceng.evaluator import Evaluator
from funceng.runner import population_run
from funceng.runner.data import is_ragged, to_device
from funceng.runner.loops import LOOPS
from funceng.step import EvalStep, make_eval_step

if TYPE_CHECKING:
    from funceng.runner.runner import Runner


class EvalLoop:
    """One pass of the eval step over a loader, feeding the outputs to the metrics (``mode``: val or test).
    ``fp16=True`` (MMEngine's ValLoop option) runs the forward pass under float16 autocast."""

    def __init__(self, runner: Runner, dataloader: Any, evaluator: Evaluator, mode: str, fp16: bool = False):
        self.runner, self.dataloader, self.evaluator, self.mode = runner, dataloader, evaluator, mode
        self.amp = "fp16" if fp16 else None
        self.timer = runner.timer
        self.eval_step: EvalStep | None = None

    def run(self) -> dict[str, Any]:
        """Evaluates the current state; returns the metrics."""
        runner, mode = self.runner, self.mode
        if self.eval_step is None:
            self.eval_step = make_eval_step(
                runner.model,
                runner.predict_fn,
                compile=runner.compile,
                amp=self.amp,
                dynamic_batch=is_ragged(self.dataloader),
            )
        runner.call_hook(f"before_{mode}")
        runner.call_hook(f"before_{mode}_epoch")
        state = runner.eval_state()
        train_loader = runner.train_loop.dataloader if runner.train_loop is not None else None
        with rng.forked_global(train_loader):  # evaluating must not change the next epoch's shuffle
            if population.size(state) is not None:  # every member (`funceng.runner.population_run`)
                metrics = population_run.evaluate(self, state)
            else:
                metrics = self.evaluate_states([state], [self.evaluator])[0]
        runner.last_metrics = metrics
        runner.call_hook(f"after_{mode}_epoch", metrics=metrics)
        runner.call_hook(f"after_{mode}")
        runner.sync_model()
        return metrics

    def evaluate_states(self, states: list[Any], evaluators: list[Evaluator]) -> list[dict[str, Any]]:
        """One pass over the loader, each batch evaluated by every state and fed to that state's evaluator (the
        iteration hooks see the last state's outputs); returns each evaluator's metrics."""
        runner, mode = self.runner, self.mode
        for batch_idx, batch in self.timer.batches(self.dataloader):
            runner.call_hook(f"before_{mode}_iter", batch_idx=batch_idx, data_batch=batch)
            on_device = to_device(batch, runner.device)
            for state, evaluator in zip(states, evaluators, strict=True):
                outputs = self.eval_step(state, on_device)
                evaluator.process(data_samples=outputs, data_batch=batch)
            self.timer.end_iter()
            runner.call_hook(f"after_{mode}_iter", batch_idx=batch_idx, data_batch=batch, outputs=outputs)
        size = len(self.dataloader.dataset) if hasattr(self.dataloader, "dataset") else len(self.dataloader)
        with dist.naming_collective_failures(f"gathering the {mode} results"):
            return [evaluator.evaluate(size) for evaluator in evaluators]


@LOOPS.register
class ValLoop(EvalLoop):
    def __init__(self, runner: Runner, dataloader: Any, evaluator: Evaluator, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, "val", fp16)


@LOOPS.register
class TestLoop(EvalLoop):
    def __init__(self, runner: Runner, dataloader: Any, evaluator: Evaluator, fp16: bool = False):
        super().__init__(runner, dataloader, evaluator, "test", fp16)


def build_eval_loop(
    runner: Runner, mode: str, cfg: Mapping[str, Any] | None, dataloader: Any, metrics: Any
) -> EvalLoop | None:
    """The ``val_cfg`` / ``test_cfg`` loop (``type``: ``"ValLoop"`` / ``"TestLoop"``; ``fp16``) over
    ``dataloader`` with ``metrics`` (``{mode}_evaluator``); ``None`` without a loader."""
    if dataloader is None:
        return None
    if metrics is None:
        raise ConfigError(
            f"{mode}_dataloader is set but {mode}_evaluator is missing: pass {mode}_evaluator=dict(type=YourMetric) "
            "(a BaseMetric subclass)"
        )
    evaluator = Evaluator(metrics, f"{mode}_evaluator")
    default = ValLoop if mode == "val" else TestLoop
    return LOOPS.build(
        dict(cfg or {}), f"{mode}_cfg", default_type=default, runner=runner, dataloader=dataloader, evaluator=evaluator
    )
