"""Pareto plots: GLUE accuracy vs pretraining time, one curve per run, error bars over finetuning seeds.

Reads two kinds of files and draws one panel per task score plus an average panel, x = pretraining time,
y = score x100, error bars = the spread over seeds. This is the paper's way of comparing architectures:
which reaches a given accuracy in less pretraining time (Portes et al. 2023, Fig. 1).

- the ``results.json`` of ``mosaic-embed glue --checkpoints ...`` (one point per checkpoint, each with its
  pretraining wall-clock time): one curve per file, the average panel is the GLUE average;
- a Pareto study file (``benchmarks/pareto/run.py``, kind ``mosaic_embed.pareto``): ``{"runs": [{"name",
  "points": [{"minutes", "tokens", "task", "seed", "metric"}, ...]}, ...]}``, one curve per run (``runs``
  picks some), the average panel is the mean of the tasks.

Averages over tasks use :func:`~mosaic_embed.train.glue_metrics.glue_average`: the mean of the tasks'
seed means, its spread propagated from each task's seed std (seeds of different tasks are independent
runs, not pairs). The time axis is in minutes when every point is under two hours, else in hours.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_bytes, read_json

AVERAGE = "GLUE average"
MEAN_OF_TASKS = "mean of tasks"
#: The kind of a Pareto study file (benchmarks/pareto/run.py writes it).
PARETO_KIND = "mosaic_embed.pareto"

Series = dict[str, list[tuple[float, float, float]]]  # panel -> [(hours, mean x100, std x100)] by hours


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` written by ``run_glue``, or a Pareto study file; anything else is an error naming
    the file."""
    from .train.glue import RESULTS_KIND

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    data = read_json(path)
    if isinstance(data, dict) and data.get("kind") == PARETO_KIND:
        if not isinstance(data.get("runs"), list) or not data["runs"]:
            raise ValueError(f"{path}: a Pareto study file without runs")
        return data
    if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND or not data.get("points"):
        raise ValueError(f"{path}: not a mosaic-embed glue results file (no '{RESULTS_KIND}' points) "
                         f"nor a Pareto study file (kind '{PARETO_KIND}')")
    return data


_POINT_KEYS = ("minutes", "task", "seed", "metric")


def study_series(run: dict[str, Any], source: str = "") -> Series:
    """One run of a Pareto study file as ``{panel: [(hours, mean x100, std x100), ...]}``.

    Points are grouped by checkpoint (their ``checkpoint`` key, else their ``minutes``); each task's panel
    has the mean and sample std over seeds, :data:`MEAN_OF_TASKS` the mean over tasks (``glue_average``).
    A checkpoint that lacks a task the run has elsewhere is an error: its mean would not be comparable.
    """
    from .train.glue_metrics import glue_average, mean_std

    name = run.get("name", "?")
    points = run.get("points")
    if not isinstance(points, list) or not points:
        raise ValueError(f"{source}: run {name!r} has no points")
    groups: dict[Any, dict[str, Any]] = {}
    for i, p in enumerate(points):
        missing = [k for k in _POINT_KEYS if not isinstance(p, dict) or k not in p]
        if missing:
            raise ValueError(f"{source}: run {name!r} point {i} lacks {', '.join(missing)}")
        if not isinstance(p["minutes"], int | float) or not isinstance(p["metric"], int | float):
            raise ValueError(f"{source}: run {name!r} point {i}: minutes and metric must be numbers")
        g = groups.setdefault(p.get("checkpoint", p["minutes"]), {"minutes": [], "tasks": {}})
        g["minutes"].append(float(p["minutes"]))
        g["tasks"].setdefault(str(p["task"]), []).append(float(p["metric"]))
    tasks = sorted({t for g in groups.values() for t in g["tasks"]})
    series: Series = {}
    for key, g in groups.items():
        if sorted(g["tasks"]) != tasks:
            raise ValueError(f"{source}: run {name!r} checkpoint {key!r} has tasks {sorted(g['tasks'])}, "
                             f"the run has {tasks}")
        if max(g["minutes"]) - min(g["minutes"]) > 1e-6:
            raise ValueError(f"{source}: run {name!r} checkpoint {key!r} has points at different minutes")
        hours = g["minutes"][0] / 60.0
        avg = glue_average(g["tasks"])
        series.setdefault(MEAN_OF_TASKS, []).append((hours, 100 * avg["mean"], 100 * avg["std"]))
        for task in tasks:
            s = mean_std(g["tasks"][task])
            series.setdefault(task, []).append((hours, 100 * s["mean"], 100 * s["std"]))
    return {k: sorted(v) for k, v in series.items()}


def _curves(path: str | Path, label: str | None, runs: Sequence[str] | None) -> list[tuple[str, Series]]:
    """The curves one results file contributes: one for a GLUE results file, one per (chosen) run of a study."""
    data = load_results(path)
    if data.get("kind") != PARETO_KIND:
        if runs:
            raise ValueError(f"{path}: --run picks runs of a Pareto study file; this is a GLUE results file")
        return [(label or data.get("run") or Path(path).parent.name, pareto_series(data, str(path)))]
    if label is not None:
        raise ValueError(f"{path}: a Pareto study file labels its runs itself (their 'label' or 'name')")
    by_name = {r.get("name"): r for r in data["runs"]}
    unknown = sorted(set(runs or ()) - set(by_name))
    if unknown:
        raise ValueError(f"{path}: no run named {unknown[0]!r}; runs: {sorted(by_name)}")
    chosen = [by_name[n] for n in runs] if runs else data["runs"]
    return [(r.get("label") or r["name"], study_series(r, str(path))) for r in chosen]


def pareto_series(results: dict[str, Any], source: str = "") -> dict[str, list[tuple[float, float, float]]]:
    """``{panel: [(hours, mean x100, std x100), ...]}`` sorted by hours, for one run's results."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for i, p in enumerate(results["points"]):
        seconds = p.get("pretrain", {}).get("wall_clock_s")
        if seconds is None:
            raise ValueError(f"{source}: point {i} ({p.get('model')}) has no pretraining time "
                             "(no checkpoint_meta.json / manifest timing in its model folder)")
        hours = float(seconds) / 3600.0
        if "glue_average" in p:
            g = p["glue_average"]
            series.setdefault(AVERAGE, []).append((hours, 100 * g["mean"], 100 * g["std"]))
        for name, t in p["tasks"].items():
            s = t["summary"]["score"]
            series.setdefault(name, []).append((hours, 100 * s["mean"], 100 * s["std"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_pareto(results_paths: Sequence[str | Path], out: str | Path, title: str | None = None,
                labels: Sequence[str] | None = None, runs: Sequence[str] | None = None) -> list[Path]:
    """Draw ``out.png`` and ``out.svg`` (``out`` without suffix, or with .png/.svg); returns both paths.

    ``labels``: one per GLUE results file (a study file labels its own runs); ``runs``: the runs of study
    files to draw (default all)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    if not results_paths:
        raise ValueError("plot pareto: give at least one results file")
    if labels is not None and len(labels) != len(results_paths):
        raise ValueError(f"plot pareto: {len(labels)} labels for {len(results_paths)} results files")
    curves: list[tuple[str, Series]] = []
    for i, path in enumerate(results_paths):
        curves += _curves(path, labels[i] if labels else None, runs)
    panels: list[str] = []
    for _, series in curves:
        for k in series:
            if k not in panels:
                panels.append(k)
    panels.sort(key=lambda k: (k not in (AVERAGE, MEAN_OF_TASKS),))  # the average first, tasks in run order
    in_minutes = all(x < 2.0 for _, series in curves for pts in series.values() for x, _, _ in pts)
    scale, unit = (60.0, "min") if in_minutes else (1.0, "h")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # at least 7 inches wide so that the title fits above a single panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 4.2 * ncols), 3.3 * nrows + 0.4), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, series in curves:
            pts = series.get(panel)
            if not pts:
                continue
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar([x * scale for x in xs], ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel(f"pretraining time ({unit})")
        ax.set_ylabel("dev score ×100")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # one legend under the panels: inside a panel it hides the points it names
    handles, names = axes.flat[0].get_legend_handles_labels()
    ncol = min(4, len(names)) or 1
    legend_rows = math.ceil(len(names) / ncol)
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    fig.suptitle(title or "dev score vs pretraining time (error bars: spread over seeds)", fontsize="medium")
    fig.tight_layout(rect=(0, 0.06 * legend_rows / nrows, 1, 1))
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".png", ".svg") else out
    written = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
        written.append(atomic_write_bytes(stem.parent / f"{stem.name}.{fmt}", buf.getvalue()))
    plt.close(fig)
    return written
