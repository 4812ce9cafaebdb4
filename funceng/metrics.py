"""Ready-made metrics: `Accuracy`, `TopK`, `Loss`, and `TorchMetric`, which wraps any ``torchmetrics`` metric as a
`funceng.evaluator.BaseMetric`.

Each reads what the eval step returned (``data_samples``) in one of three forms:

- ``(scores, labels)``, as the MMEngine tutorial's model returns from ``mode="predict"``;
- a dict with ``scores`` (or ``pred_score``, ``logits``) and ``labels`` (or ``gt_label``);
- the scores alone (a plain module's ``predict_fn``), with the labels taken from the data batch: its last item
  (a tuple or list) or its ``labels`` / ``label`` / ``gt_label`` / ``y`` entry (a dict).

Distributed runs are handled the MMEngine way: ``process`` keeps per-sample rows on the CPU, `BaseMetric.evaluate`
gathers every rank's rows in dataset order, and the metric is computed once from all of them, with no
collective of its own (a torchmetrics metric's own synchronisation is turned off).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from funceng.errors import ConfigError, require
from funceng.evaluator import BaseMetric

SCORE_KEYS = ("scores", "pred_score", "logits")
LABEL_KEYS = ("labels", "gt_label", "label", "y")
TORCHMETRICS_TASKS = ("classification", "regression", "retrieval", "segmentation", "detection", "text", "image")


def scores_and_labels(data_batch: Any, data_samples: Any, where: str) -> tuple[Tensor, Tensor]:
    """``(scores, labels)`` on the CPU from one batch's eval outputs (see the module's docstring)."""
    if isinstance(data_samples, Mapping):
        scores = _first(data_samples, SCORE_KEYS, f"{where}: the eval outputs")
        labels = _first(data_samples, LABEL_KEYS, f"{where}: the eval outputs")
    elif isinstance(data_samples, (tuple, list)) and len(data_samples) == 2:
        scores, labels = data_samples
    elif isinstance(data_samples, Tensor):
        scores = data_samples
        if isinstance(data_batch, Mapping):
            labels = _first(data_batch, LABEL_KEYS, f"{where}: the data batch")
        elif isinstance(data_batch, (tuple, list)) and len(data_batch) >= 2:
            labels = data_batch[-1]
        else:
            raise TypeError(f"{where}: the eval step returned scores alone and the data batch holds no labels")
    else:
        raise TypeError(
            f"{where}: expected (scores, labels), a dict with scores and labels, or the scores alone; "
            f"got {type(data_samples).__name__}"
        )
    return torch.as_tensor(scores).detach().float().cpu(), torch.as_tensor(labels).detach().cpu()


def _first(mapping: Mapping, keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in mapping:
            return mapping[key]
    raise KeyError(f"{where} have none of {list(keys)}; keys: {sorted(mapping)}")


class TopK(BaseMetric):
    """Top-k accuracies in percent, ``{"top1": ..., "top5": ...}`` for ``k=(1, 5)``."""

    def __init__(self, k: int | Sequence[int] = (1, 5), **kwargs: Any):
        super().__init__(**kwargs)
        self.k = (k,) if isinstance(k, int) else tuple(k)
        if not self.k or any(not isinstance(v, int) or v < 1 for v in self.k):
            raise ConfigError(f"TopK.k: expected positive ints, got {k!r}")

    def process(self, data_batch: Any, data_samples: Any) -> None:
        scores, labels = scores_and_labels(data_batch, data_samples, type(self).__name__)
        if max(self.k) > scores.shape[-1]:
            raise ValueError(f"{type(self).__name__}: k={max(self.k)} but the scores have {scores.shape[-1]} classes")
        ranked = scores.topk(max(self.k), dim=-1).indices
        hits = ranked == labels.reshape(-1, 1)
        self.results.extend({k: bool(row[:k].any()) for k in self.k} for row in hits)

    def compute_metrics(self, results: list[dict[int, bool]]) -> dict[str, float]:
        if not results:
            raise ValueError(f"{type(self).__name__}: no samples were evaluated")
        return {self._key(k): 100.0 * sum(r[k] for r in results) / len(results) for k in self.k}

    def _key(self, k: int) -> str:
        return f"top{k}"


class Accuracy(TopK):
    """Top-1 accuracy in percent, ``{"accuracy": ...}`` (the MMEngine tutorial's metric)."""

    def __init__(self, **kwargs: Any):
        super().__init__(k=1, **kwargs)

    def _key(self, k: int) -> str:
        return "accuracy"


class Loss(BaseMetric):
    """The mean of ``fn(scores, labels)`` over samples, ``{"loss": ...}`` (cross-entropy by default): a
    validation loss, which ``funceng plot`` draws beside the training loss."""

    def __init__(self, fn: Callable[..., Tensor] = F.cross_entropy, name: str = "loss", **kwargs: Any):
        super().__init__(**kwargs)
        self.fn, self.name = fn, name

    def process(self, data_batch: Any, data_samples: Any) -> None:
        scores, labels = scores_and_labels(data_batch, data_samples, type(self).__name__)
        self.results.extend(self.fn(scores, labels, reduction="none").reshape(-1).tolist())

    def compute_metrics(self, results: list[float]) -> dict[str, float]:
        if not results:
            raise ValueError(f"{type(self).__name__}: no samples were evaluated")
        return {self.name: sum(results) / len(results)}


class TorchMetric(BaseMetric):
    """Any ``torchmetrics`` metric as a `BaseMetric` (``pip install 'funceng[metrics]'``).

    ``metric``: a torchmetrics ``Metric`` instance, or its class name (``"MulticlassF1Score"``, looked up in
    ``torchmetrics`` and its task packages, or dotted: ``"classification.MulticlassF1Score"``) built with
    ``**metric_kwargs``. ``name``: the logged name (default: the class name); a metric returning a dict
    logs each entry. ``output_transform(scores, labels) -> (preds, target)`` adapts the outputs (e.g. softmax).
    Each process keeps its samples; the metric is computed once from every rank's samples, in a fresh copy with
    torchmetrics' own synchronisation off, so nothing is counted twice.
    """

    def __init__(
        self,
        metric: Any,
        name: str | None = None,
        output_transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        collect_device: str = "cpu",
        prefix: str | None = None,
        collect_dir: str | None = None,
        **metric_kwargs: Any,
    ):
        super().__init__(collect_device, prefix, collect_dir)
        torchmetrics = require("torchmetrics", "metrics", "TorchMetric")
        if isinstance(metric, str):
            metric = _torchmetrics_class(torchmetrics, metric)(**metric_kwargs)
        elif metric_kwargs:
            raise ConfigError(f"TorchMetric: {sorted(metric_kwargs)} apply only when metric is given by name")
        if not isinstance(metric, torchmetrics.Metric):
            raise ConfigError(f"TorchMetric.metric: expected a torchmetrics.Metric, got {type(metric).__name__}")
        self.template = metric
        self.name = name or type(metric).__name__
        self.output_transform = output_transform

    def process(self, data_batch: Any, data_samples: Any) -> None:
        scores, labels = scores_and_labels(data_batch, data_samples, f"TorchMetric({self.name})")
        if self.output_transform is not None:
            scores, labels = self.output_transform(scores, labels)
        self.results.extend(zip(scores.unbind(0), labels.unbind(0)))  # per sample: gathered in dataset order

    def compute_metrics(self, results: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
        if not results:
            raise ValueError(f"TorchMetric({self.name}): no samples were evaluated")
        metric = copy.deepcopy(self.template).cpu()
        metric.reset()
        metric.sync_on_compute = False  # every rank already holds every rank's samples
        preds, target = (torch.stack(column) for column in zip(*results))
        metric.update(preds, target)
        value = metric.compute()
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        return {self.name: value}


def _torchmetrics_class(torchmetrics: Any, name: str) -> type:
    import importlib

    module_name, _, class_name = name.rpartition(".")
    if module_name:
        places = [f"torchmetrics.{module_name}"]
    else:
        places = ["torchmetrics", *(f"torchmetrics.{task}" for task in TORCHMETRICS_TASKS)]
    for place in places:
        try:
            found = getattr(importlib.import_module(place), class_name, None)
        except ImportError:  # a task package whose own extra dependency is missing
            continue
        if isinstance(found, type) and issubclass(found, torchmetrics.Metric):
            return found
    raise ConfigError(f"TorchMetric.metric: torchmetrics has no metric named {name!r} (looked in {places})")
