"""Curves of a run: ``funceng plot WORK_DIR`` renders loss, lr and validation metrics to PNG files."""

from __future__ import annotations

import json
from pathlib import Path


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
    series: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    for key in ("loss", "lr"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            series["train_loss" if key == "loss" else "lr"] = ("iteration", points)
    metric_keys = sorted({k for r in val for k in r} - {"step", "time", "data_time"})
    for key in metric_keys:
        series[f"val_{key.replace('/', '_')}"] = ("epoch or iteration", [(r["step"], r[key]) for r in val if key in r])
    out = Path(out_dir) if out_dir else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (xlabel, points) in series.items():
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None)
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
