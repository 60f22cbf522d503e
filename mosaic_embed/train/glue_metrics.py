"""GLUE metrics and the GLUE average, in plain numpy (no sklearn/scipy at run time).

Metrics take ``predictions`` and ``labels`` as 1-D arrays: class ids for accuracy/F1/Matthews, real
values for Pearson/Spearman. All return floats in the metric's natural scale (accuracy in [0, 1]);
tables multiply by 100.

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
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions, labels, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews(predictions, labels) -> float:
    """Matthews correlation coefficient (multiclass form of Gorodkin 2004; the binary phi for 2 classes).

    MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c correct predictions,
    s examples, p_k / t_k the predicted / true counts of class k. 0 when a denominator is 0 (constant output).
    """
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    s = float(p.size)
    c = float(np.sum(p == y))
    pk = np.array([np.sum(p == k) for k in classes], dtype=np.float64)
    tk = np.array([np.sum(y == k) for k in classes], dtype=np.float64)
    denom = np.sqrt((s * s - pk @ pk) * (s * s - tk @ tk))
    return float((c * s - pk @ tk) / denom) if denom > 0 else 0.0


def pearson(predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    pc, yc = p - p.mean(), y - y.mean()
    denom = np.sqrt((pc @ pc) * (yc @ yc))
    return float(pc @ yc / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    p, y = _pair(predictions, labels)
    return pearson(_ranks(p.astype(np.float64)), _ranks(y.astype(np.float64)))


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
