"""The benchmark scripts run end to end at tiny sizes on CPU (their GPU figures come from the device)."""

from __future__ import annotations

import json

import pytest

from mosaic_embed.encode import PACKED
from tests.encode.conftest import encoders  # noqa: F401, F811  (the shared fixture)
from tests.helpers import write_beir


def load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_throughput_benchmark_runs_at_tiny_size(tmp_path):
    bench = load_benchmark("encode_throughput")
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": " ".join(f"word{i}x{j}" for j in range(150 + i))}) + "\n")
    texts = bench.make_texts(corpus, 40, seed=1)
    assert len(texts) == 40 and all(8 <= len(t.split()) <= 200 for t in texts)
    out = tmp_path / "r.json"
    result = bench.main(["--tiny", "--n", "16", "--warmup", "4", "--peak-size", "64", "--device", "cpu",
                         "--corpus", str(corpus), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["speedup"] == pytest.approx(result["ours"]["sentences_per_s"] / result["baseline"]["sentences_per_s"])
    assert saved["ours"]["path"] == PACKED and saved["baseline"]["attn_impl"] == "sdpa"
    assert saved["ours"]["tokens"] > 16 * 8 and saved["n_texts"] == 16


def test_retrieval_news_benchmark_merges_systems(encoders, tmp_path):  # noqa: F811
    pytest.importorskip("bm25s")  # a dev extra (the BM25 baseline): absent where only the runtime is installed
    bench = load_benchmark("retrieval_news")
    beir = write_beir(tmp_path / "news")
    out = tmp_path / "r.json"
    bench.main(["--systems", "bm25", "--data", str(beir), "--out", str(out)])
    bench.main(["--systems", "mosaic+pairs", "--encoder", str(encoders["mosaic-mean"]), "--data", str(beir),
                "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["ndcg@10"]) == {"bm25", "mosaic+pairs"} and set(doc["recall@100"]) == {"bm25", "mosaic+pairs"}
    assert doc["details"]["bm25"]["ndcg@10"] == doc["ndcg@10"]["bm25"]
    assert set(doc["alibi_extrapolation"]["mosaic+pairs"]) == {"128", "256", "512"}
    assert [r["system"] for r in doc["runs"]] == ["bm25", "mosaic+pairs"]
    assert doc["gpu_minutes"]["bm25"] == 0.0


def test_index_bench_runs_at_tiny_size(tmp_path):
    bench = load_benchmark("index_bench")
    out = tmp_path / "index.json"
    doc = bench.main(["--n", "800", "--dim", "16", "--queries", "30", "--clusters", "12", "--repeats", "1",
                      "--work", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == doc["rows"] and len(doc["rows"]) == 5
    for row in doc["rows"]:
        assert set(row) >= {"factory", "recommended", "build_s", "qps", "raw_faiss_qps", "overhead", "recall@10"}
        assert row["qps"] > 0 and row["raw_faiss_qps"] > 0
        assert row["overhead"] == pytest.approx(1 - row["qps"] / row["raw_faiss_qps"], abs=1e-3)
    flat = next(r for r in doc["rows"] if r["factory"] == "Flat")
    assert flat["recall@10"] == 1.0 and flat["recommended"]
    sq8 = next(r for r in doc["rows"] if r["factory"].startswith("SQ8"))
    assert sq8["recall@10"] >= 0.9  # rescored with the float vectors
    assert not list((tmp_path / "work").iterdir())  # the stores are removed after measuring


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from mosaic_embed.config import IndexConfig
    from mosaic_embed.encode import build_encoder, save_encoder
    from mosaic_embed.index.ingest import build_from_input
    from tests.helpers import tiny_mosaic

    root = tmp_path_factory.mktemp("bench_store")
    save_encoder(build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=48, device="cpu"),
                 root / "encoder")
    beir = write_beir(root / "news")
    store = build_from_input(beir / "corpus.jsonl", root / "store", IndexConfig(), root / "encoder")
    return {"root": root, "beir": beir, "encoder": root / "encoder", "store": store}


def test_serve_load_runs_at_tiny_size(tiny_store, tmp_path):
    bench = load_benchmark("serve_load")
    out = tmp_path / "serve.json"
    doc = bench.main(["--store", str(tiny_store["store"]), "--clients", "2,3", "--seconds", "2", "--max-requests",
                      "15", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == doc["rows"]
    assert [(r["clients"], r["batching"]) for r in doc["rows"]] == [(2, True), (3, True), (2, False), (3, False)]
    for row in doc["rows"]:
        assert row["errors"] == 0 and 0 < row["requests"] <= 15 and row["p99_ms"] >= row["p50_ms"] > 0
    assert set(doc["batching_gain"]) == {"2", "3"} and doc["device"].startswith("cpu")


def test_store_news_runs_at_tiny_size(tiny_store, tmp_path):
    import gzip

    bench = load_benchmark("store_news")
    beir = tiny_store["beir"]
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    with gzip.open(beir / "train_pairs.jsonl.gz", "wt") as f:
        for doc in corpus:
            f.write(json.dumps({"query": (doc["title"] or "cat") + " story", "positive": doc["text"]}) + "\n")
    out = tmp_path / "news.json"
    doc = bench.main(["--data", str(beir), "--model", str(tiny_store["encoder"]), "--val", "8", "--device", "cpu",
                      "--work", str(tmp_path / "work"), "--out", str(out)])
    assert set(doc) >= {"dense", "lexical", "hybrid", "default", "default_mode", "hybrid_ge_best_single"}
    assert doc["details"]["validation_queries"] == 8 and doc["details"]["test_queries"] == 6
    fusion = doc["details"]["fusion"]
    assert fusion["tuned"]["best"] >= max(fusion["tuned"]["scores"]["dense"], fusion["tuned"]["scores"]["lexical"])
    assert json.loads(out.read_text())["dense"] == doc["dense"]
