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
    result = bench.main(["--tiny", "--n", "16", "--warmup", "4", "--device", "cpu",
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


def test_startup_benchmark_runs_the_real_cli(tmp_path):
    bench = load_benchmark("startup")
    beir = write_beir(tmp_path / "beir")
    result = bench.main(["--beir", str(beir), "--tiny", "--device", "cpu", "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved == result and len(saved["rows"]) == 7
    by = {r["what"]: r for r in saved["rows"]}
    assert by["mosaic-embed --version"]["seconds"] < 5  # no torch import to print a version
    assert all(r["seconds"] > 0 for r in saved["rows"])
