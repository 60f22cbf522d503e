"""GLUE metrics against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest

from mosaic_embed.train.glue_metrics import (
    accuracy,
    compute_metrics,
    f1,
    glue_average,
    matthews,
    mean_std,
    pearson,
    spearman,
    task_score,
)

P = [1, 1, 0, 1, 0, 0, 1, 0]
Y = [1, 0, 0, 1, 1, 0, 1, 0]
# TP = 3 (idx 0, 3, 6), FP = 1 (idx 1), FN = 1 (idx 4), TN = 3 (idx 2, 5, 7)


def test_accuracy():
    assert accuracy(P, Y) == 6 / 8


def test_f1():
    # 2*3 / (2*3 + 1 + 1) = 0.75
    assert f1(P, Y) == pytest.approx(0.75)
    assert f1([0, 0], [0, 0]) == 0.0


def test_matthews_binary():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 - 1) / sqrt(4*4*4*4) = 0.5
    assert matthews(P, Y) == pytest.approx(0.5)
    assert matthews([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction


def test_matthews_multiclass():
    # p=[0,1,2,2], y=[0,1,1,2]: c=3, s=4, pred counts (1,1,2), true counts (1,2,1)
    # (3*4 - (1*1 + 1*2 + 2*1)) / sqrt((16 - 6)(16 - 6)) = 7 / 10
    assert matthews([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.7)


def test_pearson():
    # x=[1,2,3,4], y=[2,4,5,9]: dx=[-1.5,-.5,.5,1.5], dy=[-3,-1,0,4]
    # sum dxdy = 4.5+.5+0+6 = 11; sum dx^2 = 5; sum dy^2 = 26 -> 11/sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))


def test_spearman_with_ties():
    # x=[1,2,2,3] ranks [1,2.5,2.5,4]; y=[10,20,30,40] ranks [1,2,3,4]
    # dr=[-1.5,0,0,1.5], dy=[-1.5,-.5,.5,1.5]: sum = 4.5; sum dr^2 = 4.5; sum dy^2 = 5 -> 4.5/sqrt(22.5)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 5, 9], [-3, 0, 100]) == pytest.approx(1.0)  # monotone, not linear


def test_compute_metrics_and_errors():
    m = compute_metrics(["accuracy", "f1"], P, Y)
    assert m == {"accuracy": 0.75, "f1": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["auc"], P, Y)
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1, 0], [1])


def test_task_score_and_glue_average():
    # MNLI: (m + mm) / 2 is ONE task score
    assert task_score({"dev_matched": {"accuracy": 0.8}, "dev_mismatched": {"accuracy": 0.9}}, ["accuracy"]) \
        == pytest.approx(0.85)
    # MRPC: (acc + F1) / 2
    assert task_score({"dev": {"accuracy": 0.8, "f1": 0.9}}, ["accuracy", "f1"]) == pytest.approx(0.85)
    ms = mean_std([0.5, 0.7])
    assert ms["mean"] == pytest.approx(0.6) and ms["std"] == pytest.approx(math.sqrt(0.02)) and ms["n"] == 2
    # mean of task means: (0.6 + 0.9) / 2; std = sqrt(0.02 + 0) / 2
    g = glue_average({"rte": [0.5, 0.7], "sst2": [0.9]})
    assert g["mean"] == pytest.approx(0.75) and g["std"] == pytest.approx(math.sqrt(0.02) / 2) and g["tasks"] == 2
