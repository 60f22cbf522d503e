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


def _study(tmp_path, runs, name="pareto.json"):
    from mosaic_embed.plot import PARETO_KIND

    p = tmp_path / name
    p.write_text(json.dumps({"kind": PARETO_KIND, "runs": runs}))
    return p


def _study_run(name, minutes_acc, seeds=(1, 2, 3)):
    """minutes_acc: {minutes: {task: [metric per seed]}}"""
    points = [{"minutes": m, "tokens": int(m * 1e6), "task": task, "seed": seed, "metric": v,
               "checkpoint": f"ck-{m}"}
              for m, tasks in minutes_acc.items() for task, vals in tasks.items() for seed, v in zip(seeds, vals, strict=True)]
    return {"name": name, "lr": 1e-3, "tokens_per_s": 1e6, "points": points}


def test_study_series_means_over_seeds_and_tasks():
    from mosaic_embed.plot import MEAN_OF_TASKS, study_series

    run = _study_run("m", {6.0: {"a": [0.8, 0.9, 1.0], "b": [0.5, 0.5, 0.5]}, 3.0: {"a": [0.7, 0.7, 0.7],
                                                                                     "b": [0.6, 0.6, 0.6]}})
    s = study_series(run)
    assert [x for x, _, _ in s["a"]] == [0.05, 0.1]  # hours, sorted
    assert s["a"][1][1] == pytest.approx(90.0) and s["a"][1][2] == pytest.approx(10.0)  # sample std x100
    assert s["b"][1] == (0.1, pytest.approx(50.0), pytest.approx(0.0))
    # the mean of tasks: mean of the task means, spread sqrt(sum std^2) / n_tasks (glue_metrics.glue_average)
    assert s[MEAN_OF_TASKS][1] == (0.1, pytest.approx(70.0), pytest.approx(5.0))
    assert s[MEAN_OF_TASKS][0] == (0.05, pytest.approx(65.0), pytest.approx(0.0))


def test_plot_study_file_runs_and_rejects_bad_points(tmp_path):
    from click.testing import CliRunner

    from mosaic_embed.cli import main

    mosaic = _study_run("mosaic", {1.0: {"a": [0.7, 0.72, 0.71], "b": [0.9, 0.91, 0.9]},
                                   2.0: {"a": [0.75, 0.76, 0.74], "b": [0.93, 0.92, 0.94]}})
    bert = _study_run("bert", {1.1: {"a": [0.6, 0.61, 0.6], "b": [0.88, 0.87, 0.88]}})
    path = _study(tmp_path, [mosaic, bert])
    r = CliRunner().invoke(main, ["plot", "pareto", str(path), "--out", str(tmp_path / "p"), "--run", "mosaic"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["plot", "pareto", str(path), "--out", str(tmp_path / "p"), "--run", "bart"])
    assert r.exit_code == 2 and "no run named 'bart'" in r.output, r.output
    r = CliRunner().invoke(main, ["plot", "pareto", str(path), "--out", str(tmp_path / "p"), "--label", "x"])
    assert r.exit_code == 2 and "labels its runs itself" in r.output, r.output

    partial = _study_run("partial", {1.0: {"a": [0.7, 0.7, 0.7], "b": [0.9, 0.9, 0.9]}, 2.0: {"a": [0.8, 0.8, 0.8]}})
    with pytest.raises(ValueError, match="partial.json: run 'partial' checkpoint 'ck-2.0' has tasks \\['a'\\]"):
        plot_pareto([_study(tmp_path, [partial], "partial.json")], tmp_path / "x")
    broken = _study_run("broken", {1.0: {"a": [0.7, 0.7, 0.7]}})
    del broken["points"][1]["metric"]
    with pytest.raises(ValueError, match="run 'broken' point 1 lacks metric"):
        plot_pareto([_study(tmp_path, [broken], "broken.json")], tmp_path / "x")
    with pytest.raises(ValueError, match="without runs"):
        plot_pareto([_study(tmp_path, [], "empty.json")], tmp_path / "x")
