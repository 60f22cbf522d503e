"""Embedding pipeline: packed MosaicBERT path == sentence-transformers, streaming to disk, resume, CLI, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from distributed_helpers import run_cli_torchrun
from encoder_helpers import TOPICS, tiny_bert, tiny_mosaic, write_beir

import mosaic_embed  # noqa: F401
from mosaic_embed.cli import main
from mosaic_embed.encode import FALLBACK, PACKED, Encoder, embed_file, load_embeddings, plan_window
from mosaic_embed.train.contrastive import build_encoder, save_encoder

TEXTS = [f"{t} {body} " * (i % 4 + 1) for i, (t, body) in enumerate(list(TOPICS.items()) * 4)] + ["a", "cat dog"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for name, make, pooling in (("mosaic-mean", tiny_mosaic, "mean"), ("mosaic-cls", tiny_mosaic, "cls"),
                                ("bert", tiny_bert, "mean")):
        backbone = make(root / f"{name}-backbone")
        save_encoder(build_encoder(backbone, pooling, True, max_seq_len=48, device="cpu"), root / name)
        out[name] = root / name
    return out


N_TEXTS = len(TEXTS)


def _docs(path, n=N_TEXTS):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"doc{i}", "title": "t" if i % 3 == 0 else "", "text": TEXTS[i % len(TEXTS)]}) + "\n")
            if i % 5 == 0:
                f.write("\n")  # blank lines are skipped, not records
    return path


@pytest.mark.parametrize("name", ["mosaic-mean", "mosaic-cls"])
def test_packed_path_matches_sentence_transformers(encoders, name):
    enc = Encoder.load(encoders[name], device="cpu")
    assert enc.path_used == PACKED
    ref = enc.st.encode(TEXTS, batch_size=5)
    got = enc.encode(TEXTS, batch_size=5)  # length-sorted packed batches, reordered back
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_token_budget_batches_agree(encoders):
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu")
    ids = enc.tokenize(TEXTS)
    a = enc.embed_tokenized(ids, batch_size=64)
    b = enc.embed_tokenized(ids, batch_size=64, max_tokens=60)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tokenize_flat_matches_the_tokenizer_call(encoders):
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu", max_seq_len=20)
    texts = TEXTS + [" ".join(["storm city road"] * 30), "Café  NAÏVE?!"]
    ids = enc.tokenize(texts)
    flat, lens = enc.tokenize_flat(texts)
    assert lens.tolist() == [len(x) for x in ids] and max(lens) == 20  # truncated like the HF call
    assert flat.tolist() == [t for x in ids for t in x]


def test_plan_window_cuts_by_token_budget():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 40, size=200)
    flat = rng.integers(0, 1000, size=int(lens.sum())).astype(np.int32)
    win = plan_window(flat, lens, batch_size=8, max_tokens=100)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    assert sorted(win.order.tolist()) == list(range(200)) and np.all(np.diff(win.lens) <= 0)
    assert win.tokens.tolist() == [t for i in win.order for t in flat[starts[i]:starts[i] + lens[i]]]
    pos = 0
    for b, (a, e) in enumerate(zip(win.bounds[:-1], win.bounds[1:], strict=True)):
        cu = win.cu[a + b:e + b + 1]
        assert cu[0] == 0 and np.array_equal(np.diff(cu), win.lens[a:e])
        assert cu[-1] <= 100 or e - a == 1  # within budget (batch size not capped by batch_size)
        if e < len(lens):
            assert cu[-1] + win.lens[e] > 100  # greedy: the next sequence would not have fit
        assert win.seg[pos:pos + cu[-1]].tolist() == np.repeat(np.arange(e - a), win.lens[a:e]).tolist()
        pos += cu[-1]
    by_count = plan_window(flat, lens, batch_size=8, max_tokens=None)
    assert np.array_equal(by_count.bounds, np.append(np.arange(0, 200, 8), 200))


def test_token_budget_encoder_matches_sentence_batches(encoders):
    texts = TEXTS * 3
    a = Encoder.load(encoders["mosaic-mean"], device="cpu").encode(texts, batch_size=4, window=16)
    b = Encoder.load(encoders["mosaic-mean"], device="cpu", max_tokens=64).encode(texts, window=16)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_failed_compilation_falls_back_to_eager(encoders):
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu", compile=True)
    assert enc.compiled

    def broken(*args, **kwargs):
        raise RuntimeError("simulated inductor failure")

    for layer in enc.backbone.encoder.layers:
        layer._compiled_call_impl = broken  # what nn.Module.compile installs, failing at its first call
    got = enc.encode(TEXTS[:6])
    assert not enc.compiled
    np.testing.assert_allclose(got, enc.st.encode(TEXTS[:6]), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_packed_path_matches_sentence_transformers_on_gpu(encoders, tmp_path, compile):
    backbone = tiny_mosaic(tmp_path / "b")  # its config pins attn_impl torch: the GPU default is auto
    cfg = json.loads((backbone / "config.json").read_text())
    cfg["attn_impl"] = "auto"
    (backbone / "config.json").write_text(json.dumps(cfg))
    save_encoder(build_encoder(backbone, "mean", True, max_seq_len=48, device="cpu"), tmp_path / "enc")
    enc = Encoder.load(tmp_path / "enc", device="cuda", max_tokens=256, compile=compile)
    texts = TEXTS * 8
    got = enc.encode(texts, window=64)
    ref = enc.st.encode(texts, batch_size=16)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999, cos.min()
    assert enc.compiled == compile


def test_other_backbones_fall_back_to_sentence_transformers(encoders):
    enc = Encoder.load(encoders["bert"], device="cpu")
    assert enc.path_used == FALLBACK
    np.testing.assert_allclose(enc.encode(TEXTS[:5]), enc.st.encode(TEXTS[:5]), rtol=1e-5, atol=1e-6)


def test_max_seq_len_beyond_training_length(encoders):
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu", max_seq_len=200)
    long_text = " ".join(["storm city road"] * 80)
    assert len(enc.tokenize([long_text])[0]) == 200  # beyond max_position_embeddings=128 of the tiny model
    assert np.isfinite(enc.encode([long_text])).all()


def test_embed_file_writes_rows_in_input_order(encoders, tmp_path):
    docs = _docs(tmp_path / "docs.jsonl")
    # on the CPU like the reference below: this checks order and files (a CUDA run's fp32 attention uses tf32)
    out = embed_file(encoders["mosaic-mean"], docs, tmp_path / "emb", window=7, batch_size=4, dtype="float32",
                     device="cpu", show_progress=False)
    emb, ids = load_embeddings(out)
    assert ids == [f"doc{i}" for i in range(len(TEXTS))]
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu")
    texts = [("t " if i % 3 == 0 else "") + TEXTS[i] for i in range(len(TEXTS))]
    np.testing.assert_allclose(emb, enc.encode(texts), rtol=1e-4, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "embed" and manifest["outputs"]["shape"] == [len(TEXTS), 32]


def test_embed_file_resumes_after_interruption(encoders, tmp_path, monkeypatch):
    docs = _docs(tmp_path / "docs.jsonl")
    full = embed_file(encoders["mosaic-mean"], docs, tmp_path / "full", window=5, show_progress=False)
    ref, _ = load_embeddings(full)
    calls = {"n": 0}
    original = Encoder.embed_window

    def dies_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "embed_window", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed_file(encoders["mosaic-mean"], docs, tmp_path / "part", window=5, show_progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(tmp_path / "part")
    calls["n"] = -100  # no more interruptions
    embed_file(encoders["mosaic-mean"], docs, tmp_path / "part", window=5, show_progress=False)
    assert calls["n"] == -100 + 6 - 2  # 26 docs / 5 = 6 windows; 2 were done before the interruption
    got, ids = load_embeddings(tmp_path / "part")
    assert got.dtype == np.float16 and len(ids) == len(TEXTS)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="other settings"):
        embed_file(encoders["mosaic-mean"], docs, tmp_path / "part", window=6, show_progress=False)


def test_embed_file_bad_input_names_line(encoders, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' missing"):
        embed_file(encoders["mosaic-mean"], bad, tmp_path / "emb", show_progress=False)
    assert not (tmp_path / "emb").exists()  # a bad input file leaves no output folder


def test_cli_embed_model_folder_that_is_no_encoder(tmp_path):
    """A shards / GLUE-output / empty folder as --model: exit 2 naming it, before any output exists."""
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "ok"}) + "\n")
    r = CliRunner().invoke(main, ["embed", "--model", str(tmp_path / "shards"), "--input", str(tmp_path / "in.jsonl"),
                                  "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'shards'}: not an encoder folder")
    assert not (tmp_path / "out").exists()


def test_cli_embed_empty_binary_and_non_utf8_inputs(encoders, tmp_path):
    """Exit 2, one error line naming the file, and no output folder (an empty file is not 0 embeddings)."""
    cases = {"empty.jsonl": (b"", "no records"), "blank.jsonl": (b"\n  \n", "no records"),
             "binary.jsonl": (bytes(range(128, 256)) * 4, ": not UTF-8 text (byte 0x80"),
             "latin1.jsonl": (json.dumps({"text": "ok"}).encode() + b"\n" + '{"text": "café"}'.encode("latin-1"),
                              ": not UTF-8 text (byte 0xe9"),
             "corrupt.jsonl.gz": (bytes(range(128, 256)), ": not a readable gzip file")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out-{name}"
        r = CliRunner().invoke(main, ["embed", "--model", str(encoders["mosaic-mean"]), "--input",
                                      str(tmp_path / name), "--out", str(out), "--device", "cpu"])
        last = r.output.strip().splitlines()[-1]  # after the weight-loading progress bar
        assert r.exit_code == 2 and last.startswith(f"error: {tmp_path / name}") and why in last, r.output
        assert not out.exists(), name


def test_cli_embed_and_eval_retrieval(encoders, tmp_path):
    runner = CliRunner()
    docs = _docs(tmp_path / "docs.jsonl", n=9)
    r = runner.invoke(main, ["embed", "--model", str(encoders["mosaic-cls"]), "--input", str(docs),
                             "--out", str(tmp_path / "emb"), "--dtype", "float32", "--window", "4"])
    assert r.exit_code == 0, r.output
    emb, ids = load_embeddings(tmp_path / "emb")
    assert emb.shape == (9, 32) and ids[0] == "doc0"

    beir = write_beir(tmp_path / "beir")
    r = runner.invoke(main, ["eval-retrieval", "--model", str(encoders["mosaic-mean"]), "--beir", str(beir),
                             "--max-seq-len", "64", "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["ndcg@10"] <= 1.0 and metrics["n_queries"] == 6 and metrics["max_seq_len"] == 64
    assert metrics["recall@100"] == 1.0  # 12 documents: everything is in the top 100

    r = runner.invoke(main, ["eval-retrieval", "--model", str(encoders["mosaic-mean"]), "--beir", str(tmp_path)])
    assert r.exit_code == 2 and "error:" in r.output


def test_cli_train_encoder_tiny_recipe(encoders, tmp_path):
    from encoder_helpers import write_pairs_jsonl

    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=12, negatives=True)
    r = CliRunner().invoke(main, ["train-encoder", "--recipe", "tiny", "--model",
                                  str(encoders["mosaic-mean"].parent / "mosaic-mean-backbone"),
                                  "--pairs", str(pairs), "--out", str(tmp_path / "enc"), "--loss", "cached_mnrl",
                                  "--set", "mini_batch_size=2"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["outputs"]["columns"] == ["anchor", "positive", "negative"]
    assert manifest["config"]["loss"] == "cached_mnrl" and manifest["outputs"]["steps"] == 3


def test_embed_under_torchrun_two_ranks_merge_into_one_file(encoders, tmp_path):
    """Two gloo ranks on CPU: windows alternate between ranks, rows land in one memmap in input order."""
    docs = _docs(tmp_path / "docs.jsonl")
    proc = run_cli_torchrun(2, ["embed", "--model", str(encoders["mosaic-mean"]), "--input", str(docs),
                                "--out", str(tmp_path / "emb"), "--window", "4", "--dtype", "float32",
                                "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb, ids = load_embeddings(tmp_path / "emb")
    assert ids == [f"doc{i}" for i in range(N_TEXTS)]
    assert sorted(p.name for p in (tmp_path / "emb" / "progress").iterdir()) == ["rank-0.json", "rank-1.json"]
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu")
    texts = [("t " if i % 3 == 0 else "") + TEXTS[i] for i in range(N_TEXTS)]
    np.testing.assert_allclose(emb, enc.encode(texts), rtol=1e-4, atol=1e-5)


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_throughput_benchmark_runs_at_tiny_size(tmp_path):
    bench = _load_benchmark("encode_throughput")
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


def test_retrieval_news_benchmark_merges_systems(encoders, tmp_path):
    pytest.importorskip("bm25s")  # a dev extra (the BM25 baseline): absent where only the runtime is installed
    bench = _load_benchmark("retrieval_news")
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
