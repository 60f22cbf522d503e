"""Fusion against hand-computed values; tuning never below the better single retriever; BM25 kept in step."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mosaic_embed.config import IndexConfig
from mosaic_embed.index.hybrid import Fusion, fuse, tune
from mosaic_embed.index.ingest import build_store
from mosaic_embed.index.store import Doc, VectorStore, open_writer


def test_rrf_hand_computed():
    dense = (np.array([10, 20, 30]), np.array([0.9, 0.8, 0.1], np.float32))
    lexical = (np.array([30, 40]), np.array([5.0, 1.0], np.float32))
    keys, scores = fuse(dense, lexical, "rrf", 0.5, k=4, rrf_k=60)
    expect = {10: 0.5 / 61, 20: 0.5 / 62, 30: 0.5 / 63 + 0.5 / 61, 40: 0.5 / 62}
    assert keys.tolist() == [30, 10, 20, 40]  # 20 and 40 tie: the dense rank decides
    np.testing.assert_allclose(scores, [expect[k] for k in keys.tolist()], rtol=1e-6)
    keys, _ = fuse(dense, lexical, "rrf", 1.0, k=3)
    assert keys.tolist() == [10, 20, 30]  # weight 1 = dense alone
    keys, _ = fuse(dense, lexical, "rrf", 0.0, k=2)
    assert keys.tolist() == [30, 40]


def test_weighted_fusion_normalises_each_list():
    dense = (np.array([1, 2, 3]), np.array([0.9, 0.5, 0.1], np.float32))  # -> 1, 0.5, 0
    lexical = (np.array([3, 4]), np.array([12.0, 2.0], np.float32))  # -> 1, 0
    keys, scores = fuse(dense, lexical, "weighted", 0.3, k=4)
    expect = {1: 0.3, 2: 0.15, 3: 0.7, 4: 0.0}
    assert keys.tolist() == [3, 1, 2, 4]
    np.testing.assert_allclose(scores, [expect[k] for k in keys.tolist()], atol=1e-6)
    keys, _ = fuse((np.zeros(0, np.int64), np.zeros(0)), lexical, "weighted", 0.5, k=5)
    assert keys.tolist() == [3, 4]
    with pytest.raises(ValueError, match="fusion method"):
        fuse(dense, lexical, "max", 0.5, k=3)


def test_tune_never_picks_worse_than_the_better_single_retriever():
    rng = np.random.default_rng(0)
    relevant = {q: q * 100 for q in range(40)}

    def runs(hit_rate, noise):
        out = []
        for q in range(40):
            keys = list(rng.choice(np.arange(5000, 9000), size=20, replace=False))
            if rng.random() < hit_rate:
                keys.insert(int(rng.integers(0, noise)), relevant[q])
            keys = np.asarray(keys[:20], np.int64)
            out.append((keys, np.linspace(1, 0, len(keys)).astype(np.float32)))
        return out

    def score(ranked):
        return float(np.mean([1.0 / (list(r).index(relevant[q]) + 1) if relevant[q] in list(r[:10]) else 0.0
                              for q, r in enumerate(ranked)]))

    for dense_rate, lex_rate in ((0.9, 0.1), (0.1, 0.9), (0.6, 0.6)):
        dense, lexical = runs(dense_rate, 3), runs(lex_rate, 3)
        fusion = tune(dense, lexical, score, what="synthetic")
        s = fusion.tuned["scores"]
        assert fusion.tuned["best"] >= max(s["dense"], s["lexical"])
        assert fusion.tuned["best"] == max(s.values())
        if dense_rate > 0.8:
            assert fusion.mode in ("dense", "hybrid")
        if lex_rate > 0.8:
            assert fusion.mode in ("lexical", "hybrid")
        assert Fusion.from_manifest(fusion.to_dict()) == fusion


def test_fusion_settings_are_validated():
    for bad in ({"mode": "sparse"}, {"method": "max"}, {"weight": 1.5}, {"rrf_k": 0}):
        with pytest.raises(ValueError):
            Fusion(**bad)
    assert "not tuned" in Fusion().describe() and Fusion().mode == "dense"


def test_bm25_follows_adds_and_deletes(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["the storm brought rain", "market prices rose", "a film about music", "storm clouds over the river"]
    x = rng.normal(size=(4, 8)).astype(np.float32)
    path = build_store(x, ["a", "b", "c", "d"], tmp_path / "s", IndexConfig(), texts=texts)
    store = VectorStore(path)
    (res,) = store.search_texts(["storms"], k=5, mode="lexical")
    assert {h.id for h in res.hits} == {"a", "d"}  # stemmed: storms ~ storm; no other document shares a term
    assert not res.complete and res.available == 4 and "share a term" in res.note
    with open_writer(path) as w:
        w.delete(doc_ids=["a"])
        w.add(rng.normal(size=(1, 8)), [Doc("e", "storm warning for the coast", {"lang": "en"})])
    store = VectorStore(path)
    (res,) = store.search_texts(["storm"], k=5, mode="lexical")
    assert {h.id for h in res.hits} == {"d", "e"}
    (only,) = store.search_texts(["storm"], k=5, mode="lexical", where='lang = "en"')
    assert [h.id for h in only.hits] == ["e"] and only.available == 1 and only.complete
    # BM25 statistics are those of the live documents only: a rebuilt store from scratch scores the same
    fresh = build_store(np.zeros((4, 8)) + 1, ["b", "c", "d", "e"],
                        tmp_path / "fresh", IndexConfig(), texts=[texts[1], texts[2], texts[3], "storm warning for the coast"])
    (ref,) = VectorStore(fresh).search_texts(["storm"], k=5, mode="lexical")
    assert [(h.id, round(h.score, 5)) for h in ref.hits] == [(h.id, round(h.score, 5)) for h in res.hits]


def test_bm25_does_not_import_jax(tmp_path):
    """bm25s imports and warms jax where it is installed (seconds, and XLA reserves most of a GPU's memory):
    the lexical index imports bm25s without it, scores as usual, and leaves jax importable afterwards."""
    import subprocess
    import sys
    import textwrap

    fake = tmp_path / "site" / "jax"
    fake.mkdir(parents=True)
    marker = tmp_path / "jax_imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (fake / "lax.py").write_text("def top_k(x, k):\n    raise AssertionError('bm25s warmed jax up')\n")
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from mosaic_embed.index.lexical import Lexical, join_tokens, tokenize
        lex = Lexical.build(np.arange(3), [join_tokens(t) for t in tokenize(["rain storm", "cat", "storm news"])])
        keys, scores = lex.search(["storm"], 5)[0]
        print(sorted(keys.tolist()), "jax" in sys.modules)
        import jax  # still importable by the rest of the process
        print(jax.__name__)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(Path(__file__).resolve().parents[2])])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[0,", "2]", "False", "jax"]
    assert marker.exists()  # imported once, by the test's own `import jax`, after bm25s
