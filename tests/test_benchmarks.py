"""The benchmark scripts run end to end at tiny sizes on CPU (their GPU figures come from the device)."""

from __future__ import annotations

import json

import pytest

from mosaic_embed.encode import PACKED
from tests.encode.conftest import encoders  # noqa: F401, F811  (the shared fixture)
from tests.helpers import TOPICS, write_beir, write_pairs_jsonl


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


def test_retrieval_domain_benchmark_every_system_at_tiny_size(encoders, tmp_path):  # noqa: F811
    """The rows of benchmarks/retrieval_domain.py at toy size on CPU, in two invocations merged into one JSON
    (a re-run row replaces the old one), with the plot. The teacher stands in for MiniLM: a tiny BERT
    sentence-transformers folder. (minilm+pairs and distill-base run the code of mosaic-minilm+pairs and
    distill-small with another model; their full-size configs are checked below.)"""
    pytest.importorskip("bm25s")
    bench = load_benchmark("retrieval_domain")
    beir = write_beir(tmp_path / "news")
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=24)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (topic, body) in enumerate(list(TOPICS.items()) * 4):
            f.write(json.dumps({"text": f"The {topic} story number {i} is here. It says {body} about {topic}. " * 3})
                    + "\n")
    out = tmp_path / "results" / "retrieval_domain.json"
    common = ["--tiny", "--beir", str(beir), "--pairs", str(pairs), "--corpus", str(corpus), "--distill-corpus",
              str(corpus), "--pretrain-corpus", str(corpus), "--teacher", str(encoders["bert"]),
              "--work", str(tmp_path / "work"), "--out", str(out), "--max-seq-len", "48"]
    first = ["bm25", "minilm", "mosaic-minilm", "mosaic-minilm+adapt", "mosaic-minilm+pairs", "scratch",
             "distill-small"]
    bench.main(["--systems", ",".join(first), *common])
    second = ["mosaic-minilm+crop", "mosaic-minilm+simcse", "scratch+crop", "bm25"]
    doc = bench.main(["--systems", ",".join(second), *common])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(doc)) and out.with_suffix(".png").stat().st_size > 1000
    systems = [r["system"] for r in saved["rows"]]
    expected = set(first + second) | {"distill-small+pairs"}
    assert set(systems) == expected and len(systems) == len(expected)  # bm25 ran twice, one row
    keys = {"system", "backbone", "labels", "ndcg@10", "recall@100", "gpu_minutes", "sentences_per_s"}
    for r in saved["rows"]:
        assert keys <= set(r) and r["backbone"] in ("mosaic_bert", "minilm", "bm25")
        assert 0.0 <= r["ndcg@10"] <= 1.0 and 0.0 <= r["recall@100"] <= 1.0 and r["gpu_minutes"] == 0.0
        assert (r["sentences_per_s"] is None) == (r["backbone"] == "bm25")
    by = {r["system"]: r for r in saved["rows"]}
    assert by["mosaic-minilm"]["details"]["path"] == PACKED and by["minilm"]["details"]["path"] != PACKED
    # the converted teacher computes the teacher's vectors: the same quality
    assert by["mosaic-minilm"]["ndcg@10"] == pytest.approx(by["minilm"]["ndcg@10"], abs=1e-6)
    assert [by[s]["labels"] for s in ("distill-small", "distill-small+pairs", "scratch", "scratch+crop")] == [
        False, True, True, False]
    adapt = by["mosaic-minilm+adapt"]["details"]["train"]["pairs"]
    assert adapt["teacher_filter"]["mined"] == 24 and "hard_negatives" in adapt
    assert saved["device"].startswith("cpu") and saved["commit"] and len(saved["runs"]) == 2
    assert set(saved["targets"]) == {"without_labels", "with_labels"}
    assert saved["packed_vs_sentence_transformers"]["same_run"] is True
    with pytest.raises(SystemExit, match="unknown systems"):
        bench.main(["--systems", "nope", *common])


def test_retrieval_domain_full_size_configs_are_valid(tmp_path):
    """What the GPU run will train: every system's full-size stage configs load from the shipped recipes (a
    typo in a recipe or a budget fails here, not on the GPU host)."""
    from mosaic_embed.config import ContrastiveConfig, DistillConfig, PretrainConfig

    bench = load_benchmark("retrieval_domain")
    args = ["--systems", "bm25", "--work", str(tmp_path), "--teacher", str(tmp_path), "--beir", str(tmp_path)]
    run = bench.Run(bench.parse_args(args))
    kinds = {}
    for system in bench.SYSTEMS:
        for cfg in run.configs(system):
            kinds.setdefault(system, []).append(type(cfg).__name__)
            if isinstance(cfg, ContrastiveConfig):  # MiniLM's length; today's scratch pipeline trains at 128
                assert cfg.max_seq_len == (128 if system.startswith("scratch") else 256), system
                assert cfg.precision == "auto", system
            if isinstance(cfg, DistillConfig):
                assert cfg.finetune.pairs and cfg.precision == "auto" and cfg.max_steps > 0
            if isinstance(cfg, PretrainConfig):
                assert cfg.model.preset == "mosaic-bert-small" and cfg.train.max_steps == 1500
    assert kinds["mosaic-minilm+adapt"] == ["ContrastiveConfig"] and kinds["scratch"] == ["PretrainConfig",
                                                                                        "ContrastiveConfig"]
    adapt = run.configs("mosaic-minilm+adapt")[0]
    assert (adapt.mining, adapt.teacher_filter, adapt.hard_negatives) == ("first-sentence", 1, 1)
    assert run.configs("mosaic-minilm+simcse")[0].mining == "simcse"
    assert run.configs("distill-base")[0].student == "mosaic-bert-base"
    changed = bench.Run(bench.parse_args([*args, "--set", "distill-small.max_steps=7"]))
    assert changed.configs("distill-small")[0].max_steps == 7
    with pytest.raises(SystemExit, match="SYSTEM.KEY=VALUE"):
        bench.Run(bench.parse_args([*args, "--set", "nope.max_steps=7"]))



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
