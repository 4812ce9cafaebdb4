"""Curves of a run: ``funceng plot WORK_DIR`` renders loss, lr and validation metrics to PNG files; for a population
(`funceng.runner.population_run`) each chart has one curve per member.

Training curves are drawn against iterations, with the epochs marked on a second axis above (integer ticks) in an
epoch-based run; validation curves against epochs (integer ticks) or, in an iteration-based run, iterations. When
validation logs a loss, the training-loss chart shows it too, each validation point at the end of its epoch.
`charts` computes what to draw (tested on its own); `plot_run` draws it with matplotlib (``funceng[vis]``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from funceng.errors import require

MEMBER_KEY = re.compile(r"member_(\d+)/(.+)")  # a population member's scalar: "member_3/loss"
NOT_METRICS = {"step", "time", "data_time", "best_member"}


@dataclass
class Chart:
    """One PNG: ``curves`` maps a label to its ``(x, y)`` points; ``iters_per_epoch`` (epoch-based training
    charts) adds the epoch axis above the iteration axis."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    iters_per_epoch: int | None = None


def newest_run(work_dir: str | Path) -> Path:
    """The newest ``<timestamp>/`` run folder of a work_dir that trained (else the newest with any scalars); given
    a run folder itself, that run."""
    if (Path(work_dir) / "vis_data" / "scalars.json").exists():
        return Path(work_dir)
    runs = sorted(p.parent.parent for p in Path(work_dir).glob("*/vis_data/scalars.json"))
    if not runs:
        raise FileNotFoundError(f"{work_dir} has no <timestamp>/vis_data/scalars.json: has a run been logged there?")
    trained = [r for r in runs if '"loss"' in (r / "vis_data" / "scalars.json").read_text()]
    return (trained or runs)[-1]


def read_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "vis_data" / "scalars.json").read_text().splitlines() if line]


def charts(records: list[dict]) -> list[Chart]:
    """What `plot_run` draws from a run's ``scalars.json`` records."""
    train = [r for r in records if "loss" in r and "iter" in r]
    val = [r for r in records if "iter" not in r]
    by_epoch = any(r.get("epoch") is not None for r in train)
    # an epoch's last iteration is epoch * L; any logged iteration i of epoch e has i <= e * L
    per_epoch = max((math.ceil(r["iter"] / r["epoch"]) for r in train if r.get("epoch")), default=None)
    val_x = "epoch" if by_epoch or not train else "iteration"
    out: list[Chart] = []
    if train:
        loss = Chart("train_loss", "Training loss", "iteration", "loss", iters_per_epoch=per_epoch)
        loss.curves["train"] = [(r["step"], r["loss"]) for r in train]
        for key in sorted(k for k in {k for r in val for k in r} if "loss" in k and not MEMBER_KEY.fullmatch(k)):
            scale = per_epoch if by_epoch and per_epoch else 1  # validation after epoch e: at iteration e * L
            loss.curves[f"val {key}"] = [(r["step"] * scale, r[key]) for r in val if key in r]
            loss.title = "Training and validation loss"
        out.append(loss)
    lrs = [(r["step"], r["lr"]) for r in train if r.get("lr") is not None]
    if lrs:
        out.append(Chart("lr", "Learning rate", "iteration", "lr", {"lr": lrs}, per_epoch))
    for records_, prefix, xlabel in ((train, "train", "iteration"), (val, "val", val_x)):
        members = sorted({k for r in records_ for k in r if MEMBER_KEY.fullmatch(k)}, key=_member_order)
        for key in members:
            index, name = MEMBER_KEY.fullmatch(key).groups()
            chart_name = f"{prefix}_{name.replace('/', '_')}_members"
            if not out or out[-1].name != chart_name:
                what = "Training" if prefix == "train" else "Validation"
                out.append(Chart(chart_name, f"{what} {name}, per member", xlabel, name))
                out[-1].iters_per_epoch = per_epoch if prefix == "train" else None
            out[-1].curves[f"member {index}"] = [(r["step"], r[key]) for r in records_ if key in r]
    metric_keys = sorted({k for r in val for k in r} - NOT_METRICS)
    for key in (k for k in metric_keys if not MEMBER_KEY.fullmatch(k)):
        points = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if points:
            out.append(Chart(f"val_{key.replace('/', '_')}", f"Validation {key}", val_x, key, {key: points}))
    return out


def plot_run(work_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes ``train_loss.png``, ``lr.png`` and one ``val_<metric>.png`` per metric (with a population's
    ``*_members.png``) of a work_dir's newest run, or of the run folder given; returns their paths."""
    matplotlib = require("matplotlib", "vis", "funceng plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = newest_run(work_dir)
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for chart in charts(read_records(run)):
        fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
        for label, points in chart.curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        if len(chart.curves) > 1:
            ax.legend(fontsize="small" if len(chart.curves) < 9 else "x-small", ncol=max(1, len(chart.curves) // 8))
        ax.set_xlabel(chart.xlabel)
        ax.set_ylabel(chart.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if chart.iters_per_epoch:
            per = chart.iters_per_epoch
            top = ax.secondary_xaxis("top", functions=(lambda x, per=per: x / per, lambda e, per=per: e * per))
            top.set_xlabel("epoch")
            top.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(chart.title, fontsize="large")
        fig.suptitle(run.name, fontsize="small", color="0.4", x=0.99, ha="right")
        ax.grid(alpha=0.3)
        if chart.name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        fig.tight_layout()
        path = out / f"{chart.name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _member_order(key: str) -> tuple[str, int]:
    index, name = MEMBER_KEY.fullmatch(key).groups()
    return name, int(index)
