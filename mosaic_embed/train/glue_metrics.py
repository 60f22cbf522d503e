"""GLUE metrics and the GLUE average. The metrics themselves are scikit-learn's and SciPy's.

Metrics take ``predictions`` and ``labels`` as 1-D arrays: class ids for accuracy/F1/Matthews, real
values for Pearson/Spearman. All return floats in the metric's natural scale (accuracy in [0, 1]);
tables multiply by 100. A constant prediction gives a correlation of 0 (SciPy would return NaN), the
value GLUE's scorer reports for it.

The GLUE average (:func:`glue_average`) follows the MosaicBERT reference code (mosaicml/examples,
``examples/benchmarks/bert/glue.py``, which produced the paper's GLUE tables): a task's score is the
mean of the metrics it tracks over all its evaluation sets -- MNLI = (matched acc + mismatched acc) / 2
as ONE task, QQP and MRPC = (accuracy + F1) / 2, CoLA = Matthews corr., STS-B = Spearman corr.,
accuracy for QNLI, RTE and SST-2 -- averaged over seeds; the GLUE score is the unweighted mean of the
eight task scores. ``style="leaderboard"`` differs only in STS-B, scored (Pearson + Spearman) / 2 as on
the GLUE leaderboard (which also includes WNLI; neither style does, as the paper leaves it out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in length")
    if p.size == 0:
        raise ValueError("no examples to score")
    return p, y


def accuracy(predictions, labels) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(*reversed(_pair(predictions, labels))))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class ``positive``; 0 when there is no positive at all."""
    from sklearn.metrics import f1_score

    p, y = _pair(predictions, labels)
    return float(f1_score(y, p, pos_label=positive, average="binary", labels=[positive], zero_division=0.0))


def matthews(predictions, labels) -> float:
    """Matthews correlation coefficient (multiclass form; 0 for a constant prediction)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _pair(predictions, labels)
    return float(matthews_corrcoef(y, p))


def _correlation(fn, predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if p.size < 2 or np.all(p == p[0]) or np.all(y == y[0]):
        return 0.0  # undefined for a constant series
    return float(fn(p, y)[0])


def pearson(predictions, labels) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, labels)


def spearman(predictions, labels) -> float:
    """Spearman's rho (ties get their average rank)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, labels)


METRIC_FNS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(names: Sequence[str], predictions, labels) -> dict[str, float]:
    """``{name: value}`` for each metric name (see ``METRIC_FNS``)."""
    unknown = [n for n in names if n not in METRIC_FNS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {list(METRIC_FNS)}")
    return {n: METRIC_FNS[n](predictions, labels) for n in names}


def task_score(split_metrics: Mapping[str, Mapping[str, float]], score_metrics: Sequence[str]) -> float:
    """One seed's task score: the mean of ``score_metrics`` over every evaluation split.

    ``split_metrics`` = ``{"dev_matched": {"accuracy": .8}, "dev_mismatched": {"accuracy": .82}}``.
    """
    values = [m[name] for m in split_metrics.values() for name in score_metrics]
    if not values:
        raise ValueError("no metric values to score")
    return float(np.mean(values))


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def glue_average(task_scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Unweighted mean over tasks of each task's seed-mean score, with its spread.

    ``task_scores`` = ``{task: [score of seed 1, seed 2, ...]}``. Tasks run different numbers of seeds,
    so the spread is propagated rather than taken over "seed i of every task": std = sqrt(sum_t s_t^2) / n
    with s_t the seed std of task t, i.e. the spread of an average of one run per task, treating the
    tasks as independent.
    """
    if not task_scores:
        raise ValueError("no tasks to average")
    stats = [mean_std(v) for v in task_scores.values()]
    n = len(stats)
    return {
        "mean": float(np.mean([s["mean"] for s in stats])),
        "std": float(np.sqrt(sum(s["std"] ** 2 for s in stats)) / n),
        "tasks": n,
    }
