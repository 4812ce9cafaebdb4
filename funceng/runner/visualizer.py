"""Where scalars go: ``vis_data/scalars.json`` (LocalVisBackend), TensorBoard event files, and the experiment
trackers of `funceng.runner.trackers` (W&B, MLflow), which also get the config and the run's artifacts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from funceng.errors import ConfigError, check_keys, require
from funceng.registry import VISBACKENDS as VIS_BACKENDS
from funceng.runner import compat


@VIS_BACKENDS.register
class LocalVisBackend:
    """JSON lines in ``<save_dir>/scalars.json``, each with its ``step``, as MMEngine's LocalVisBackend."""

    def __init__(self, save_dir: Path):
        save_dir.mkdir(parents=True, exist_ok=True)
        self.path = save_dir / "scalars.json"

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({**scalars, "step": step}) + "\n")

    def close(self) -> None:
        pass


@VIS_BACKENDS.register
class TensorboardVisBackend:
    """TensorBoard event files in ``<save_dir>`` (``pip install 'funceng[vis]'``)."""

    def __init__(self, save_dir: Path):
        summary = require("torch.utils.tensorboard", "vis", "TensorboardVisBackend", package="tensorboard")
        self.writer = summary.SummaryWriter(str(save_dir))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Visualizer:
    """Sends each record of scalars to every backend; non-numeric and ``None`` values are dropped."""

    def __init__(self, save_dir: Path, vis_backends: Sequence[Mapping[str, Any]] | None = None, write: bool = True):
        """``write=False`` (ranks other than 0) checks the config but writes nothing."""
        self.backends = []
        for i, cfg in enumerate(vis_backends or [{"type": "LocalVisBackend"}]):
            where = f"visualizer.vis_backends[{i}]"
            if write:
                self.backends.append(VIS_BACKENDS.build(cfg, where, save_dir=save_dir))
            elif "type" not in cfg:
                raise ConfigError(f"{where}: missing 'type'; known: {VIS_BACKENDS.names()}")
            else:
                VIS_BACKENDS.resolve(cfg["type"], f"{where}.type")

    @classmethod
    def from_cfg(cls, save_dir: Path, cfg: Mapping[str, Any] | None, write: bool = True) -> Visualizer:
        if cfg is not None and not isinstance(cfg, Mapping):
            raise ConfigError(f"visualizer: expected a dict such as dict(vis_backends=[...]), got {cfg!r}")
        cfg = dict(cfg or {})
        check_keys("visualizer", cfg, {"type", "vis_backends", "name"})
        for key in ("type", "name"):
            if key in cfg:
                compat.ignored(f"visualizer.{key}")
        return cls(save_dir, cfg.get("vis_backends"), write)

    def write(self, scalars: dict[str, Any], step: int) -> None:
        numeric = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for backend in self.backends:
            backend.add_scalars(numeric, step)

    def wants(self, method: str) -> bool:
        """Whether a backend takes ``add_config`` or ``add_artifacts`` (the experiment trackers do)."""
        return any(hasattr(backend, method) for backend in self.backends)

    def add_config(self, config: dict[str, Any]) -> None:
        """The run's resolved config, flattened (``{"optim_wrapper.optimizer.lr": 0.1}``), to the trackers."""
        for backend in self.backends:
            if hasattr(backend, "add_config"):
                backend.add_config(config)

    def add_artifacts(self, paths: Sequence[Path]) -> None:
        """Files of the run (plots, the best checkpoint's manifest) to the trackers."""
        for backend in self.backends:
            if hasattr(backend, "add_artifacts"):
                backend.add_artifacts(paths)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
