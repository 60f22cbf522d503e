"""The Encoder (encode/packed.py): packed MosaicBERT path == sentence-transformers, token budgets, compile
fallback, other backbones, lengths; the eval-retrieval and train-encoder CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mosaic_embed  # noqa: F401
from mosaic_embed.cli import main
from mosaic_embed.encode import (
    FALLBACK,
    PACKED,
    Encoder,
    build_encoder,
    load_embeddings,
    plan_window,
    save_encoder,
)
from tests.encode.conftest import TEXTS, write_docs
from tests.helpers import tiny_mosaic, write_beir


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


def test_compiled_encoder_layers_trace_as_one_graph(encoders, monkeypatch):
    """``compile=True`` answers the kernel dispatch before anything is traced: a layer of the packed path is
    then one graph (a dispatch question first asked inside the trace would break it)."""
    import torch

    from mosaic_embed.kernels import dispatch

    monkeypatch.setattr(dispatch, "_resolved", {})  # a process that has not asked anything yet
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu", compile=True)
    assert dispatch._resolved  # answered at load
    layer = enc.backbone.encoder.layers[0]
    hidden = torch.randn(9, enc.backbone.config.hidden_size)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer._orig_mod if hasattr(layer, "_orig_mod") else layer.forward)(
        hidden, None, cu, 5)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


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


def test_cli_embed_and_eval_retrieval(encoders, tmp_path):
    runner = CliRunner()
    docs = write_docs(tmp_path / "docs.jsonl", n=9)
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
    from tests.helpers import write_pairs_jsonl

    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=12, negatives=True)
    r = CliRunner().invoke(main, ["train-encoder", "--recipe", "tiny", "--model",
                                  str(encoders["mosaic-mean"].parent / "mosaic-mean-backbone"),
                                  "--pairs", str(pairs), "--out", str(tmp_path / "enc"), "--loss", "cached_mnrl",
                                  "--set", "mini_batch_size=2"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["outputs"]["columns"] == ["anchor", "positive", "negative"]
    assert manifest["config"]["loss"] == "cached_mnrl" and manifest["outputs"]["steps"] == 3



def _with_prompts_and_projection(encoders, tmp_path, dense_activation=None):
    """The mosaic-mean encoder with query/document prompts, a default prompt and a Dense projection 32 -> 24."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(str(encoders["mosaic-mean"]), device="cpu")
    torch.manual_seed(0)
    dense = models.Dense(32, 24, bias=True, activation_function=dense_activation or torch.nn.Identity())
    modules = list(st)
    model = SentenceTransformer(modules=[*modules[:2], dense, modules[2]], device="cpu",
                                prompts={"query": "query: ", "passage": "passage: ", "other": "topic: "},
                                default_prompt_name="other")
    save_encoder(model, tmp_path / "enc")
    return SentenceTransformer(str(tmp_path / "enc"), device="cpu"), tmp_path / "enc"


def test_packed_path_runs_dense_modules_and_applies_prompts_as_sentence_transformers(encoders, tmp_path):
    """Prompts as encode_query / encode_document / encode apply them (a 'passage' prompt is a document
    prompt; no prompt_name = the default prompt), and the folder's Dense + Normalize run after pooling."""
    import torch

    st, folder = _with_prompts_and_projection(encoders, tmp_path, torch.nn.Tanh())
    enc = Encoder.load(folder, device="cpu")
    assert enc.path_used == PACKED and enc.dim == 24 and enc.normalize
    np.testing.assert_allclose(enc.encode(TEXTS, prompt_name="query"), st.encode_query(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS, prompt_name="document"), st.encode_document(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS), st.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS, prompt_name="other"), st.encode(TEXTS, prompt_name="other"),
                               atol=1e-5)
    assert not np.allclose(enc.encode(TEXTS[:3], prompt_name="query"), enc.encode(TEXTS[:3], prompt_name="document"))
    with pytest.raises(ValueError, match=r"prompt_name 'nope': the encoder .* defines the prompts .*'other', 'passage'"):
        enc.encode(TEXTS, prompt_name="nope")
    d = enc.describe()
    assert d["prompts"]["query"] == "query: " and d["default_prompt_name"] == "other" and d["dim"] == 24


def test_fallback_path_applies_prompts_once(encoders, tmp_path):
    """Through sentence-transformers (a BERT backbone) the prompt is ST's own argument: no double prompt."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(encoders["bert"]), device="cpu", prompts={"query": "q: "}, default_prompt_name="query")
    save_encoder(st, tmp_path / "bert")
    enc = Encoder.load(tmp_path / "bert", device="cpu")
    assert enc.path_used == FALLBACK
    np.testing.assert_allclose(enc.encode(TEXTS[:6]), st.encode(TEXTS[:6]), atol=1e-6)
    np.testing.assert_allclose(enc.encode(TEXTS[:6], prompt_name="document"), st.encode_document(TEXTS[:6]), atol=1e-6)


def test_truncate_dim_keeps_leading_dimensions_renormalised(encoders):
    full = Encoder.load(encoders["mosaic-mean"], device="cpu")
    short = Encoder.load(encoders["mosaic-mean"], device="cpu", truncate_dim=8)
    ref = full.encode(TEXTS)[:, :8]
    got = short.encode(TEXTS)
    assert got.shape == (len(TEXTS), 8) and short.describe()["truncate_dim"] == 8
    np.testing.assert_allclose(got, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    from mosaic_embed.config import ConfigError

    with pytest.raises(ConfigError, match="truncate_dim 64: this encoder makes 32-d vectors"):
        Encoder.load(encoders["mosaic-mean"], device="cpu", truncate_dim=64)


def test_embed_and_store_use_document_and_query_prompts(encoders, tmp_path):
    """embed (documents) and index search (queries) apply the encoder's own prompts and the truncation the
    store records, so a store's queries are embedded as its documents were."""
    from mosaic_embed.config import EmbedConfig, EncodeConfig, IndexConfig
    from mosaic_embed.encode import embed_file
    from mosaic_embed.index.ingest import build_from_embeddings
    from mosaic_embed.index.store import VectorStore

    st, folder = _with_prompts_and_projection(encoders, tmp_path)
    docs = write_docs(tmp_path / "docs.jsonl", n=7)
    out = embed_file(EmbedConfig(model=folder, input=docs, out=tmp_path / "emb", dtype="float32", title_field=None,
                                 encode=EncodeConfig(device="cpu", truncate_dim=16)), show_progress=False)
    emb, _ = load_embeddings(out)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines() if line.strip()]
    ref = st.encode_document(texts)[:, :16]
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    store = VectorStore(build_from_embeddings(out, tmp_path / "store", IndexConfig()))
    enc = store.encoder(device="cpu")
    assert enc.dim == 16
    q = st.encode_query(["storm news"])[:, :16]
    np.testing.assert_allclose(enc.encode(["storm news"], prompt_name="query"),
                               q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-5)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    (result,) = store.search_texts(["storm news"], k=1, encoder=enc, mode="dense")
    assert result.hits[0].id == f"doc{int(np.argmax(emb @ q[0]))}"


@pytest.mark.gpu
def test_reference_model_of_a_packed_encoder_is_clean_on_gpu(tmp_path):
    """The packed path casts the backbone to bf16; the ``st`` reference (hard-negative mining uses it) must
    still run: a folder with a Dense projection after pooling, loaded through sentence-transformers."""
    from sentence_transformers import SentenceTransformer, models

    backbone = tiny_mosaic(tmp_path / "b")
    st = build_encoder(backbone, "mean", False, max_seq_len=48, device="cpu")
    st = SentenceTransformer(modules=[*st, models.Dense(32, 16), models.Normalize()], device="cpu")
    save_encoder(st, tmp_path / "enc")
    enc = Encoder.load(tmp_path / "enc", device="cuda")
    assert enc.path_used == PACKED and enc.dim == 16
    got, ref = enc.encode(TEXTS), enc.st.encode(TEXTS)
    cos = (got * ref).sum(1)
    assert cos.min() > 0.99, cos.min()
