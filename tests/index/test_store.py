"""The FAISS vector store: approximate indexes against brute force, round trips, and bad input."""

import json

import faiss
import numpy as np
import pytest

from mosaic_embed.config import ConfigError, IndexConfig, load_config
from mosaic_embed.encode import load_embeddings
from mosaic_embed.index.ingest import build_from_embeddings, build_store
from mosaic_embed.index.store import VectorStore


def clustered(n, dim, n_clusters=20, seed=0):
    """Vectors around random centres: the structure real embeddings have (uniform noise makes ANN meaningless)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = centres[rng.integers(0, n_clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return x.astype(np.float32)


def exact_top_k(x, q, k):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(xn)
    return flat.search(qn, k)


@pytest.mark.parametrize(
    "factory, params, min_recall",
    [("Flat", "", 1.0), ("HNSW32,Flat", "efSearch=256", 0.98), ("IVF16,Flat", "nprobe=8", 0.9)],
)
def test_recall_against_brute_force(tmp_path, factory, params, min_recall):
    x, q, k = clustered(2000, 24), clustered(50, 24, seed=1), 10
    ids = [f"doc{i}" for i in range(len(x))]
    cfg = IndexConfig(factory=factory, search_params=params, train_size=2000)
    store = VectorStore(build_store(x, ids, tmp_path / "store", cfg))
    _, exact_rows = exact_top_k(x, q, k)
    hits = [r.hits for r in store.search(q, k, with_text=False)]
    recall = np.mean([len({h.key for h in hs} & set(er)) / k for hs, er in zip(hits, exact_rows, strict=True)])
    assert recall >= min_recall
    if factory == "Flat":  # exact search also gives the exact scores (cosine similarity)
        exact_scores, _ = exact_top_k(x, q, k)
        np.testing.assert_allclose([[h.score for h in hs] for hs in hits], exact_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_rescored_candidates_get_exact_scores(tmp_path, metric):
    """SQ8 codes find the candidates; the kept float vectors (rescored by FAISS's by-index kernels) give the
    exact cosine of each hit, under either metric, and the exact top 10."""
    x, q, k = clustered(2000, 24), clustered(50, 24, seed=1), 10
    cfg = IndexConfig(factory="SQ8", metric=metric, rescore=4)
    store = VectorStore(build_store(x, [f"doc{i}" for i in range(len(x))], tmp_path / "store", cfg))
    results = store.search(q, k, with_text=False)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for r, qv in zip(results, qn, strict=True):
        keys = np.array([h.key for h in r.hits])
        np.testing.assert_allclose([h.score for h in r.hits], xn[keys] @ qv, rtol=1e-5, atol=1e-5)
    _, exact_rows = exact_top_k(x, q, k)
    recall = np.mean([len({h.key for h in r.hits} & set(er)) / k for r, er in zip(results, exact_rows, strict=True)])
    assert recall >= 0.98


def test_round_trip_with_texts_and_memmap(tmp_path):
    x = clustered(300, 16)
    np.save(tmp_path / "emb.npy", x.astype(np.float16))
    emb = np.load(tmp_path / "emb.npy", mmap_mode="r")
    ids = [f"d{i}" for i in range(300)]
    texts = [f"text of document {i} ü" for i in range(300)]
    cfg = load_config(IndexConfig, "tiny")
    path = build_store(emb, ids, tmp_path / "store", cfg, texts=texts, source={"encoder": "enc/"})
    store = VectorStore(path)
    assert len(store) == 300 and store.dim == 16
    assert store.document(123).text == texts[123]
    (hit,) = store.search(x[7], k=1)[0].hits
    assert (hit.id, hit.key, hit.text) == ("d7", 7, texts[7])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["stage"] == "index" and manifest["outputs"]["count"] == 300
    assert manifest["outputs"]["next_id"] == 300 and manifest["generation"] == "gen-00000001"
    assert manifest["config"]["factory"] == "IVF8,Flat"


def test_bad_inputs_name_the_problem_and_leave_nothing(tmp_path):
    x = clustered(50, 8)
    out = tmp_path / "store"
    with pytest.raises(ValueError, match="49 ids for 50"):
        build_store(x, [str(i) for i in range(49)], out, IndexConfig())
    with pytest.raises(ValueError, match="'same' \\(chunk 0\\) is already in the store or given twice"):
        build_store(x, ["same"] * 50, out, IndexConfig())
    with pytest.raises(ValueError, match="not a valid FAISS factory"):
        build_store(x, [str(i) for i in range(50)], out, IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(ValueError, match="IVF needs at least"):
        build_store(x, [str(i) for i in range(50)], out, IndexConfig(factory="IVF256,Flat"))
    with pytest.raises(ValueError, match="3 texts for 50"):
        build_store(x, [str(i) for i in range(50)], out, IndexConfig(), texts=["a", "b", "c"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folders left behind either


def test_store_rejects_foreign_folders_and_wrong_query_dims(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        VectorStore(tmp_path)
    path = build_store(clustered(40, 8), [str(i) for i in range(40)], tmp_path / "s", IndexConfig())
    with pytest.raises(ValueError, match="dimension 9"):
        VectorStore(path).search(np.zeros((1, 9), np.float32))
    for k in (0, -1):  # FAISS itself only asserts
        with pytest.raises(ValueError, match=r"k \(--top-k\) must be an integer in \[1, 10000\]"):
            VectorStore(path).search(np.zeros((1, 8), np.float32), k=k)
        with pytest.raises(ValueError, match="--top-k"):
            VectorStore(path).search_texts(["storm"], k=k)  # before any encoder is loaded
    (path / "gen-00000001" / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        VectorStore(path)


def test_index_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'nprobe'"):
        load_config(IndexConfig, overrides=["nprobe=3"])
    with pytest.raises(ConfigError, match="'metric'"):
        load_config(IndexConfig, overrides=["metric=cosine"])


# ---- from `mosaic-embed embed` output, through the CLI ----------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A tiny MosaicBERT encoder, a BEIR-style corpus and its `embed` output."""
    from mosaic_embed.config import EmbedConfig, EncodeConfig
    from mosaic_embed.encode import build_encoder, embed_file, save_encoder
    from tests.helpers import tiny_mosaic, write_beir

    root = tmp_path_factory.mktemp("embedded")
    encoder = root / "encoder"
    save_encoder(build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=48, device="cpu"), encoder)
    beir = write_beir(root / "beir")
    # embedded at 40 tokens, shorter than the encoder's own 48: queries must be cut at 40 too
    cfg = EmbedConfig(model=encoder, input=beir / "corpus.jsonl", out=root / "emb", dtype="float32",
                      encode=EncodeConfig(max_seq_len=40))
    emb = embed_file(cfg, show_progress=False)
    return {"encoder": encoder, "corpus": beir / "corpus.jsonl", "emb": emb, "root": root}


def test_store_from_embed_output_returns_the_embedded_texts(embedded, tmp_path):
    from mosaic_embed.encode import iter_texts

    vectors, ids = load_embeddings(embedded["emb"])
    store = VectorStore(build_from_embeddings(embedded["emb"], tmp_path / "store", IndexConfig()))
    texts = list(iter_texts(embedded["corpus"]))
    assert len(store) == len(ids) == len(texts)
    for row in (0, 5, len(ids) - 1):
        (hit,) = store.search(np.asarray(vectors[row]), k=1)[0].hits
        assert (hit.key, hit.id, hit.text) == (row, ids[row], texts[row])  # title + text, as embedded
    assert store.manifest["encoder"]["path"] == str(embedded["encoder"].resolve())
    # Text queries go through the encoder the store names: a document's own text finds that document first.
    (top,) = store.search_texts([texts[3]], k=1, mode="dense")[0].hits
    assert top.key == 3


def test_queries_are_embedded_like_the_documents(embedded, tmp_path):
    """One Encoder with the settings the manifest records (max_seq_len 40 here), not a plain ST at 48."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import Encoder

    store = VectorStore(build_from_embeddings(embedded["emb"], tmp_path / "store", IndexConfig()))
    encoder = store.encoder()
    assert isinstance(encoder, Encoder) and encoder.max_seq_len == 40
    long_query = "the storm brought rain and fire to the city road " * 4
    doc_like = Encoder.load(embedded["encoder"], device="cpu", max_seq_len=40).encode([long_query])
    np.testing.assert_allclose(encoder.encode([long_query]), doc_like, rtol=1e-5, atol=1e-6)
    plain = SentenceTransformer(str(embedded["encoder"]), device="cpu").encode([long_query])  # 48 tokens
    assert not np.allclose(plain, doc_like, atol=1e-3)
    vectors, _ = load_embeddings(embedded["emb"])
    (hit,) = store.search(doc_like, k=1)[0].hits
    assert hit.score == pytest.approx(store.search_texts([long_query], k=1)[0].hits[0].score, abs=1e-5)


def test_store_works_from_another_directory_and_refuses_another_encoder(embedded, tmp_path, monkeypatch):
    import shutil

    from mosaic_embed.encode import build_encoder, save_encoder
    from tests.helpers import tiny_mosaic

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    store_dir = build_from_embeddings(embedded["emb"], tmp_path / "store", IndexConfig())
    assert VectorStore(store_dir).search_texts(["storm news"], k=1)[0].hits
    # the encoder folder replaced by another model of the same dimension: refused, unless forced
    moved = shutil.copytree(embedded["encoder"], tmp_path / "copy")
    assert VectorStore(store_dir).encoder(moved) is not None  # a copy has the same identity
    other = tmp_path / "other"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b", seed=3), "mean", True, max_seq_len=48, device="cpu"), other)
    with pytest.raises(ValueError, match="is not the encoder that built"):
        VectorStore(store_dir).encoder(other)
    assert VectorStore(store_dir).encoder(other, force=True).dim == 32


def test_build_refuses_an_input_changed_after_embedding(embedded, tmp_path):
    """Shuffled input after embed: texts would land on other vectors. Build refuses (or stores ids only)."""
    import shutil

    emb = shutil.copytree(embedded["emb"], tmp_path / "emb")
    corpus = embedded["corpus"]
    original = corpus.read_text()
    try:
        corpus.write_text("\n".join(reversed(original.splitlines())) + "\n")
        with pytest.raises(ValueError, match="changed after it was embedded"):
            build_from_embeddings(emb, tmp_path / "store", IndexConfig())
        assert not (tmp_path / "store").exists()
        ids_only = VectorStore(build_from_embeddings(emb, tmp_path / "ids", IndexConfig(), with_texts=False))
        assert len(ids_only) == 12 and ids_only.lexical is None and ids_only.document(0).text is None
    finally:
        corpus.write_text(original)


def test_non_finite_rows_are_refused_naming_the_row(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    vectors[4, 2] = np.nan
    with pytest.raises(ValueError, match="document 'd4' \\(chunk 0\\) is not finite"):
        build_store(vectors, [f"d{i}" for i in range(6)], tmp_path / "s", IndexConfig())
    assert not (tmp_path / "s").exists()


def test_cli_index_build_and_search(embedded, tmp_path):
    from click.testing import CliRunner

    from mosaic_embed.cli import main

    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(main, ["index", "build", "--embeddings", str(embedded["emb"]), "--out", str(store),
                                  "--recipe", "hnsw"])
    assert result.exit_code == 0, result.output
    assert "12 chunks of 12 documents" in result.output and "HNSW32,Flat" in result.output
    result = runner.invoke(main, ["index", "search", "--store", str(store), "--query", "storm news",
                                  "--query", "market", "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    # result.output interleaves stderr (the attention path announcement); stdout holds the JSON lines.
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [x["query"] for x in lines] == ["storm news", "market"]
    assert all(len(x["hits"]) == 2 and x["hits"][0]["text"] and x["complete"] for x in lines)
    # Bad input: an unknown recipe key and a folder that is no embed output, each named, nothing written.
    result = runner.invoke(main, ["index", "build", "--embeddings", str(embedded["emb"]), "--out",
                                  str(tmp_path / "x"), "--set", "nlist=4"])
    assert result.exit_code == 2 and "unknown key 'nlist'" in result.output
    result = runner.invoke(main, ["index", "build", "--embeddings", str(tmp_path), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "manifest.json" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
