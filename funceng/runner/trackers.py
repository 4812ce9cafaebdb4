"""Experiment trackers as visualizer backends: `WandbVisBackend` (Weights & Biases) and `MLflowVisBackend`.

Each receives what `funceng.runner.visualizer.Visualizer` sends every backend: the scalars of each log line and
validation (``add_scalars``), the run's resolved config once, flattened to ``a.b.c`` keys (``add_config``), and
at the end of the run its artifacts: the ``funceng plot`` PNGs and the best checkpoint's ``manifest.json``
(``add_artifacts``). Each is an optional extra (``pip install 'funceng[wandb]'`` / ``'funceng[mlflow]'``); a
missing package is a `funceng.errors.MissingExtraError` naming the extra when the Runner is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from funceng.errors import ConfigError, MissingExtraError, require
from funceng.registry import VISBACKENDS as VIS_BACKENDS


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim_wrapper.optimizer.lr": 0.1, "param_scheduler.0.type": "LinearLR", ...}``: numbers, strings,
    bools and None as they are, a list of them as its text, other lists by index, and anything else (classes,
    functions, modules, loaders) by a short description."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            flat[name] = str(list(value))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten_config({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
            flat[name] = f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
        else:
            flat[name] = f"<{type(value).__name__}>"
    return flat


def run_artifacts(runner: Any) -> list[Path]:
    """The files a tracker keeps of a finished training run: the ``funceng plot`` PNGs (when matplotlib is
    installed and LocalVisBackend wrote the scalars; otherwise the log says why there are none) and the best
    checkpoint's ``manifest.json``."""
    from funceng.plot import plot_run

    paths: list[Path] = []
    try:
        paths += plot_run(runner.log_dir)  # this run's folder, not whichever run of the work_dir is newest
    except MissingExtraError as exc:
        runner.logger.warning(f"trackers: no plots among the artifacts: {exc}")
    except FileNotFoundError:
        runner.logger.warning(
            "trackers: no plots among the artifacts: plots are drawn from vis_data/scalars.json, which only "
            "LocalVisBackend writes; add dict(type='LocalVisBackend') to visualizer.vis_backends"
        )
    best = runner.checkpointer.best_path
    if best and (manifest := Path(runner.checkpointer.directory) / best / "manifest.json").exists():
        paths.append(manifest)
    return paths


@VIS_BACKENDS.register
class WandbVisBackend:
    """Logs to Weights & Biases: scalars, the config as the run's ``config``, artifacts as files of the run.

    W&B's own step must only grow, and validation is logged by epoch while training is logged by iteration, so
    funceng gives each its own x-axis: training scalars are plotted against ``iter`` (logged with them),
    validation scalars as ``val/<name>`` against ``val_step`` (the epoch, or the iteration in an
    iteration-based run).

    ``init_kwargs`` go to ``wandb.init`` (project, name, entity, tags, ``mode="offline"``, ...); the run's files
    go under ``<save_dir>/wandb``. Without network or an API key, use ``mode="offline"`` (or set
    ``WANDB_MODE=offline``) and ``wandb sync`` later."""

    def __init__(self, save_dir: Path, init_kwargs: Mapping[str, Any] | None = None, commit: bool = True):
        self.wandb = require("wandb", "wandb", "WandbVisBackend")
        kwargs = {"project": "funceng", "dir": str(save_dir), **dict(init_kwargs or {})}
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(**kwargs)
        self.commit = commit
        self.defined: set[str] = set()

    def add_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if "iter" in scalars:  # a training log line, whose step is its iter
            row, axis = dict(scalars), "iter"
        else:  # a validation
            row, axis = {**{f"val/{k}": v for k, v in scalars.items()}, "val_step": step}, "val_step"
        for key in row.keys() - self.defined - {axis}:
            self.run.define_metric(key, step_metric=axis)
            self.defined.add(key)
        self.run.log(row, commit=self.commit)

    def add_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def close(self) -> None:
        self.run.finish()


@VIS_BACKENDS.register
class MLflowVisBackend:
    """Logs to MLflow: scalars as metrics by step, the config as params, artifacts as run artifacts.

    ``tracking_uri``: default ``MLFLOW_TRACKING_URI`` if set, else a file store in ``<work_dir>/mlruns`` (the
    filesystem store, which MLflow 3 keeps in maintenance mode: funceng allows it for this process; give
    ``"sqlite:///mlflow.db"`` or a server's URL for the database backends). ``exp_name`` (default
    ``"funceng"``), ``run_name`` (default: the run's timestamp), ``tags`` and extra ``params`` describe the run.
    """

    def __init__(
        self,
        save_dir: Path,
        exp_name: str = "funceng",
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
    ):
        self.mlflow = require("mlflow", "mlflow", "MLflowVisBackend")
        run_dir = Path(save_dir).parent  # <work_dir>/<timestamp>/vis_data
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.parent / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the user chose or the default
        self.client = self.mlflow.tracking.MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(exp_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(exp_name)
        tags = {str(k): str(v) for k, v in dict(tags or {}).items()}
        run = self.client.create_run(experiment_id, run_name=run_name or run_dir.name, tags=tags)
        self.run_id, self.tracking_uri = run.info.run_id, uri
        if params:
            self.add_config(params)

    def add_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in config.items()]  # MLflow's limit on a param's value
        for start in range(0, len(items), 100):  # and on a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        metrics = [Metric(_metric_name(k), float(v), now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def add_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            folder = "checkpoints" if Path(path).name == "manifest.json" else "plots"
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _metric_name(key: str) -> str:
    """MLflow's metric names allow letters, digits, ``_ - . space / :``; anything else becomes ``_``."""
    allowed = set("_-. /:")
    cleaned = "".join(c if c.isalnum() or c in allowed else "_" for c in key)
    if not cleaned:
        raise ConfigError(f"MLflowVisBackend: scalar name {key!r} has no character MLflow accepts")
    return cleaned
