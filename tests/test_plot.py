"""Pareto plot: series from results files, PNG + SVG written, bad input rejected with the file named."""

import json

import pytest

from mosaic_embed.plot import AVERAGE, pareto_series, plot_pareto
from mosaic_embed.train.glue import RESULTS_KIND


def _point(hours, rte, sst2, std=0.01):
    def task(mean):
        return {"summary": {"score": {"mean": mean, "std": std, "n": 3}}}

    return {"model": f"ck-{hours}", "pretrain": {"wall_clock_s": hours * 3600},
            "tasks": {"rte": task(rte), "sst2": task(sst2)},
            "glue_average": {"mean": (rte + sst2) / 2, "std": std, "tasks": 2}}


def _results(tmp_path, name, points):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"kind": RESULTS_KIND, "run": name, "points": points}))
    return p


def test_series_sorted_by_hours_and_scaled():
    s = pareto_series({"points": [_point(2.0, 0.7, 0.9), _point(0.5, 0.6, 0.8)]})
    assert s["rte"] == [(0.5, pytest.approx(60.0), pytest.approx(1.0)), (2.0, pytest.approx(70.0), pytest.approx(1.0))]
    assert s[AVERAGE][0] == (0.5, pytest.approx(70.0), pytest.approx(1.0))


def test_plot_writes_png_and_svg(tmp_path):
    a = _results(tmp_path, "mosaic", [_point(0.5, 0.6, 0.8), _point(1.0, 0.65, 0.85)])
    b = _results(tmp_path, "bert", [_point(1.0, 0.55, 0.8), _point(3.0, 0.66, 0.86)])
    png, svg = plot_pareto([a, b], tmp_path / "pareto")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]


def test_plot_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        plot_pareto([tmp_path / "missing.json"], tmp_path / "x")
    bad = tmp_path / "bad.json"
    bad.write_text('{"points": []}')
    with pytest.raises(ValueError, match="bad.json: not a mosaic-embed glue results file"):
        plot_pareto([bad], tmp_path / "x")
    p = _point(1.0, 0.6, 0.8)
    p["pretrain"]["wall_clock_s"] = None
    nt = _results(tmp_path, "notime", [p])
    with pytest.raises(ValueError, match="notime.json: point 0 .* no pretraining time"):
        plot_pareto([nt], tmp_path / "x")
