"""Pareto plots: GLUE accuracy vs pretraining time, one curve per run, error bars over finetuning seeds.

Reads the ``results.json`` files of ``mosaic-embed glue --checkpoints ...`` (one point per checkpoint, each
with its pretraining wall-clock time) and draws one panel per task score plus the GLUE average, x =
pretraining hours, y = score x100, error bars = the std over seeds. This is the paper's way of comparing
architectures: which reaches a given accuracy in less pretraining time (Portes et al. 2023, Fig. 1).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_bytes, read_json

AVERAGE = "GLUE average"


def load_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` written by ``run_glue``; anything else is an error naming the file."""
    from .train.glue import RESULTS_KIND

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != RESULTS_KIND or not data.get("points"):
        raise ValueError(f"{path}: not a mosaic-embed glue results file (no '{RESULTS_KIND}' points)")
    return data


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
                labels: Sequence[str] | None = None) -> list[Path]:
    """Draw ``out.png`` and ``out.svg`` (``out`` without suffix, or with .png/.svg); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    if not results_paths:
        raise ValueError("plot pareto: give at least one results.json")
    if labels is not None and len(labels) != len(results_paths):
        raise ValueError(f"plot pareto: {len(labels)} labels for {len(results_paths)} results files")
    runs = []
    for i, path in enumerate(results_paths):
        data = load_results(path)
        label = labels[i] if labels else data.get("run") or Path(path).parent.name
        runs.append((label, pareto_series(data, str(path))))
    panels: list[str] = []
    for _, series in runs:
        for k in series:
            if k not in panels:
                panels.append(k)
    panels.sort(key=lambda k: (k != AVERAGE,))  # the average first, tasks in run order
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    # at least 7 inches wide so that the title fits above a single panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 4.2 * ncols), 3.3 * nrows + 0.4), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, series in runs:
            pts = series.get(panel)
            if not pts:
                continue
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("pretraining time (h)")
        ax.set_ylabel("dev score ×100")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(title or "GLUE dev score vs pretraining time (error bars: std over seeds)", fontsize="medium")
    fig.tight_layout()
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".png", ".svg") else out
    written = []
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
        written.append(atomic_write_bytes(stem.parent / f"{stem.name}.{fmt}", buf.getvalue()))
    plt.close(fig)
    return written
