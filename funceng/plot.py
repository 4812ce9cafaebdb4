"""Curves of a run: ``funceng plot WORK_DIR`` renders loss, lr and validation metrics to PNG files; for a population
(`funceng.runner.population_run`) each chart has one curve per member."""

from __future__ import annotations

import json
import re
from pathlib import Path

MEMBER_KEY = re.compile(r"member_(\d+)/(.+)")  # a population member's scalar: "member_3/loss"


def newest_run(work_dir: str | Path) -> Path:
    """The newest ``<timestamp>/`` run folder of a work_dir that trained (else the newest with any scalars)."""
    runs = sorted(p.parent.parent for p in Path(work_dir).glob("*/vis_data/scalars.json"))
    if not runs:
        raise FileNotFoundError(f"{work_dir} has no <timestamp>/vis_data/scalars.json: has a run been logged there?")
    trained = [r for r in runs if '"loss"' in (r / "vis_data" / "scalars.json").read_text()]
    return (trained or runs)[-1]


def plot_run(work_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Writes ``train_loss.png``, ``lr.png`` and one ``val_<metric>.png`` per metric; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = newest_run(work_dir)
    records = [json.loads(line) for line in (run / "vis_data" / "scalars.json").read_text().splitlines() if line]
    train = [r for r in records if "loss" in r and "iter" in r]
    val = [r for r in records if "iter" not in r]
    series: dict[str, tuple[str, dict[str, list[tuple[float, float]]]]] = {}  # chart -> (x label, curves)
    for key in ("loss", "lr"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            series["train_loss" if key == "loss" else "lr"] = ("iteration", {key: points})
    for records, prefix, xlabel in ((train, "train", "iteration"), (val, "val", "epoch or iteration")):
        for key in sorted({k for r in records for k in r if MEMBER_KEY.fullmatch(k)}, key=_member_order):
            index, name = MEMBER_KEY.fullmatch(key).groups()
            chart = f"{prefix}_{name.replace('/', '_')}_members"
            series.setdefault(chart, (xlabel, {}))[1][f"member {index}"] = [
                (r["step"], r[key]) for r in records if key in r
            ]
    metric_keys = sorted({k for r in val for k in r} - {"step", "time", "data_time", "best_member"})
    for key in (k for k in metric_keys if not MEMBER_KEY.fullmatch(k)):
        series[f"val_{key.replace('/', '_')}"] = (
            "epoch or iteration",
            {key: [(r["step"], r[key]) for r in val if key in r]},
        )
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (xlabel, curves) in series.items():
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, points in curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
        if len(curves) > 1:
            ax.legend(fontsize="x-small", ncol=max(1, len(curves) // 8))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.set_title(f"{name} — {run.name}")
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _member_order(key: str) -> tuple[str, int]:
    index, name = MEMBER_KEY.fullmatch(key).groups()
    return name, int(index)
