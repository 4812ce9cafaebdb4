"""Metrics (`BaseMetric`) and the `Evaluator` that runs several of them, with MMEngine's interface."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from funceng.dist import collect_results
from funceng.errors import ConfigError
from funceng.registry import EVALUATOR, METRICS


class BaseMetric(metaclass=ABCMeta):
    """Accumulates per-batch results in ``self.results`` (``process``) and reduces them (``compute_metrics``).

    ``compute_metrics`` receives every rank's results in distributed runs. ``prefix`` is prepended to the
    metric names as ``"prefix/name"``. Every subclass is registered under its class name, so a config may name
    it as ``type="Accuracy"`` (two metrics of the same name make that name ambiguous: pass the class).
    ``collect_device`` and ``collect_dir`` are accepted for MMEngine compatibility and have no effect (results
    are gathered in memory over the CPU process group); the Runner logs them as ignored
    (`funceng.runner.compat`).
    """

    default_prefix: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        METRICS.register(cls, implicit=True)

    def __init__(self, collect_device: str = "cpu", prefix: str | None = None, collect_dir: str | None = None):
        self.collect_device, self.collect_dir = collect_device, collect_dir
        self.prefix = prefix or self.default_prefix
        self.results: list[Any] = []

    @abstractmethod
    def process(self, data_batch: Any, data_samples: Any) -> None:
        """Appends whatever ``compute_metrics`` needs from one batch to ``self.results``."""

    @abstractmethod
    def compute_metrics(self, results: list[Any]) -> dict[str, Any]:
        """The metrics, as ``{name: value}``, from all results."""

    def evaluate(self, size: int) -> dict[str, float]:
        """Gathers the results of every rank, computes the metrics, clears ``self.results``."""
        results = collect_results(self.results, size)
        metrics = self.compute_metrics(results)
        self.results.clear()
        if not isinstance(metrics, dict):
            raise TypeError(
                f"{type(self).__name__}.compute_metrics must return a dict of metric values, "
                f"got {type(metrics).__name__}"
            )
        return {self._name(key): _scalar(value) for key, value in metrics.items()}

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value
    return value


class Evaluator:
    """Runs several metrics over the same predictions; their metric names must not collide."""

    def __init__(self, metrics: BaseMetric | dict | Sequence[BaseMetric | dict], where: str = "evaluator"):
        if isinstance(metrics, (BaseMetric, dict)):
            metrics = [metrics]
        self.metrics = [build_metric(m, f"{where}[{i}]") for i, m in enumerate(metrics)]

    def process(self, data_samples: Any, data_batch: Any = None) -> None:
        for metric in self.metrics:
            metric.process(data_batch, data_samples)

    def offline_evaluate(self, data_samples: Sequence, data: Sequence | None = None, chunk_size: int = 1) -> dict:
        """MMEngine's ``Evaluator.offline_evaluate``: the metrics of saved predictions (and their inputs), fed to
        ``process`` ``chunk_size`` samples at a time."""
        if data is not None and len(data) != len(data_samples):
            raise ValueError(f"offline_evaluate: {len(data_samples)} data_samples but {len(data)} data items")
        for start in range(0, len(data_samples), chunk_size):
            chunk = list(data_samples[start : start + chunk_size])
            self.process(chunk, None if data is None else list(data[start : start + chunk_size]))
        return self.evaluate(len(data_samples))

    def evaluate(self, size: int) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for metric in self.metrics:
            for name, value in metric.evaluate(size).items():
                if name in merged:
                    raise ValueError(
                        f"metric name {name!r} is produced by more than one metric "
                        f"({', '.join(type(m).__name__ for m in self.metrics)}); give them distinct prefixes"
                    )
                merged[name] = value
        return merged


EVALUATOR.register(Evaluator)


def build_metric(cfg: BaseMetric | dict, where: str = "evaluator") -> BaseMetric:
    """A metric object, or one built from ``dict(type=MetricClass or its name, **kwargs)``."""
    if isinstance(cfg, BaseMetric):
        return cfg
    metric = METRICS.build(cfg, where)
    if not isinstance(metric, BaseMetric):
        raise ConfigError(f"{where}: {type(metric).__name__} is not a BaseMetric subclass")
    return metric


GREATER_KEYS = ("acc", "top", "ar@", "auc", "precision", "map", "mdice", "miou", "macc", "aacc")  # MMEngine's
LESS_KEYS = ("loss",)


def metric_rule(name: str, rule: str | None = None) -> str:
    """Whether a higher (``"greater"``) or lower (``"less"``) value of metric ``name`` is better: ``rule`` if
    given, else inferred from the name as MMEngine infers it (``acc``, ``top``, ``mAP``, ``mIoU``, ... are
    greater, ``loss`` is less); any other name needs ``rule``."""
    if rule not in (None, "greater", "less"):
        raise ConfigError(f"rule for {name!r} must be 'greater' or 'less', got {rule!r}")
    if rule is not None:
        return rule
    lowered = name.lower()
    for keys, inferred in ((GREATER_KEYS, "greater"), (LESS_KEYS, "less")):
        if any(key in lowered for key in keys):
            return inferred
    raise ConfigError(
        f"cannot tell whether a higher or a lower {name!r} is better: give rule='greater' or rule='less' (MMEngine "
        f"infers 'greater' for names containing {list(GREATER_KEYS)} and 'less' for {list(LESS_KEYS)})"
    )


def improvement(value: float, best: float, rule: str) -> float:
    """How much better ``value`` is than ``best`` under ``rule`` (negative when worse)."""
    return value - best if rule == "greater" else best - value
