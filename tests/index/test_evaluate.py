"""Retrieval metrics against hand-computed values; exact search against numpy brute force."""

import math

import numpy as np
import pytest

from mosaic_embed.index.evaluate import evaluate_run, exact_search, mrr_at_k, ndcg_at_k, recall_at_k


def test_ndcg_hand_computed():
    qrels = {"a": 1, "b": 2, "c": 0}
    ranked = ["x", "b", "c", "a"]
    # DCG = 2/log2(3) + 1/log2(5); ideal = 2/log2(2) + 1/log2(3)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / 1 + 1 / math.log2(3)
    assert ndcg_at_k(ranked, qrels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, qrels, 1) == 0.0
    assert ndcg_at_k(["b", "a"], qrels, 10) == pytest.approx(1.0)


def test_recall_and_mrr_hand_computed():
    qrels = {"a": 1, "b": 1, "c": 1, "z": 0}
    ranked = ["z", "q", "a"] + [f"n{i}" for i in range(200)] + ["b"]
    assert recall_at_k(ranked, qrels, 10) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, qrels, 1000) == pytest.approx(2 / 3)
    assert mrr_at_k(ranked, qrels, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, qrels, 2) == 0.0


def test_evaluate_run_averages_and_counts_missing_queries():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}}
    run = {"q1": ["d1", "d2"]}  # q2 missing -> zeros; q3 has no relevant doc -> not scored
    m = evaluate_run(run, qrels)
    assert m["ndcg@10"] == pytest.approx(0.5) and m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@100"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate_run(run, {"q": {"d": 0}})


def test_exact_search_matches_bruteforce():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    scores, idx = exact_search(queries, docs, 10)
    ref = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, ref, 1), rtol=1e-5)
    with pytest.raises(ValueError):
        exact_search(queries, docs[:, :8], 5)


def test_torch_exact_search_matches_faiss_in_blocks():
    from mosaic_embed.index.evaluate import torch_exact_search

    rng = np.random.default_rng(1)
    docs = rng.standard_normal((1000, 16)).astype(np.float32)
    docs[500] = docs[3]  # an exact tie
    queries = np.concatenate([rng.standard_normal((30, 16)).astype(np.float32), docs[3:4]])
    ref_s, ref_i = exact_search(queries, docs, 10)
    s, i = torch_exact_search(queries, docs, 10, "cpu", block_docs=128, block_queries=7)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    assert [set(r) for r in i] == [set(r) for r in ref_i]  # FAISS orders exact ties arbitrarily
    assert np.all(i[:-1] == ref_i[:-1])
    tie = list(i[-1]).index(3)
    assert i[-1, tie + 1] == 500  # ours: the lower index first
    s, i = exact_search(queries, docs[:5], 10, device="cpu")
    assert i.shape == (31, 5)
