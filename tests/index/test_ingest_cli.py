"""Documents in through the CLI: chunking, metadata, add/upsert/delete/compact/info, tune/eval, --auto, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_embed.cli import main
from mosaic_embed.config import IndexConfig
from mosaic_embed.index.ingest import auto_config
from mosaic_embed.index.store import VectorStore
from tests.helpers import TOPICS, write_beir

WORDS = " ".join(f"{t} {body}" for t, body in TOPICS.items()).split()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from mosaic_embed.encode import build_encoder, save_encoder
    from tests.helpers import tiny_mosaic

    root = tmp_path_factory.mktemp("enc")
    save_encoder(build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=48, device="cpu"),
                 root / "encoder")
    return root / "encoder"


def write_docs(path, n=12, long_every=4, start=0, lang="en"):
    with open(path, "w") as f:
        for i in range(start, start + n):
            words = 150 if i % long_every == 0 else 12
            text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))
            f.write(json.dumps({"_id": f"doc{i}", "title": f"title {i}", "text": text, "lang": lang,
                                "year": 2000 + i, "tags": ["a", str(i)]}) + "\n")
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_build_from_input_chunks_and_keeps_ids_and_metadata(encoder, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    store_dir = tmp_path / "store"
    result = run("index", "build", "--input", docs, "--model", encoder, "--out", store_dir, "--device", "cpu",
                 "--set", "chunk_overlap=8")
    assert result.exit_code == 0, result.output
    store = VectorStore(store_dir)
    rows = store.db.execute('SELECT doc_id, chunk, text, metadata, start, "end" FROM documents ORDER BY id').fetchall()
    source = {json.loads(line)["_id"]: json.loads(line) for line in docs.read_text().splitlines()}
    assert {r[0] for r in rows} == set(source) and store.manifest["outputs"]["documents"] == 12
    tok = store.encoder(device="cpu").tokenizer
    for doc_id, rec in source.items():
        chunks = [r for r in rows if r[0] == doc_id]
        assert [c[1] for c in chunks] == list(range(len(chunks)))
        meta = json.loads(chunks[0][3])
        assert meta == {"lang": "en", "year": rec["year"], "tags": rec["tags"], "title": rec["title"]}
        if len(rec["text"].split()) > 100:
            assert len(chunks) >= 3
            spans = [(c[4], c[5]) for c in chunks]
            assert spans[0][0] == 0 and spans[-1][1] == len(rec["text"])
            assert all(a2 < b1 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))  # overlapping windows
            for c in chunks:
                assert c[2] == f"{rec['title']} {rec['text'][c[4]:c[5]]}"
                assert len(tok(c[2])["input_ids"]) <= 48  # title + chunk fit the encoder: nothing is cut off
        else:
            assert len(chunks) == 1 and chunks[0][2] == f"{rec['title']} {rec['text']}"
    # a chunk's own text finds that chunk first
    text = rows[1][2]
    (res,) = store.search_texts([text], k=1, mode="dense")
    assert (res.hits[0].id, res.hits[0].chunk) == (rows[1][0], rows[1][1])


def test_cli_add_upsert_delete_info_and_search(encoder, tmp_path):
    store_dir = tmp_path / "store"
    assert run("index", "build", "--input", write_docs(tmp_path / "a.jsonl"), "--model", encoder, "--out", store_dir,
               "--device", "cpu", "--recipe", "hnsw", "--set", "compact_fraction=0.9").exit_code == 0
    n0 = VectorStore(store_dir).manifest["outputs"]["documents"]
    more = write_docs(tmp_path / "b.jsonl", n=3, start=100, lang="de")
    result = run("index", "add", store_dir, "--input", more, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert VectorStore(store_dir).manifest["outputs"]["documents"] == n0 + 3
    result = run("index", "add", store_dir, "--input", more, "--device", "cpu")
    assert result.exit_code == 2 and "'doc100' (chunk 0) is already in the store" in result.output and "upsert" in result.output
    changed = write_docs(tmp_path / "c.jsonl", n=2, start=100, lang="fr", long_every=1)  # doc100, doc101 now long
    result = run("index", "upsert", store_dir, "--input", changed, "--device", "cpu")
    assert result.exit_code == 0, result.output
    store = VectorStore(store_dir)
    langs = dict(store.db.execute("SELECT doc_id, json_extract(metadata, '$.lang') FROM documents").fetchall())
    assert langs["doc100"] == "fr" and langs["doc102"] == "de"
    assert store.db.execute("SELECT count(*) FROM documents WHERE doc_id = 'doc100'").fetchone()[0] >= 3
    result = run("index", "search", "--store", store_dir, "--query", "storm rain", "--where", 'lang = "fr"', "-k", "3",
                 "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert out[0]["complete"] and out[0]["hits"] and all(h["metadata"]["lang"] == "fr" for h in out[0]["hits"])
    result = run("index", "search", "--store", store_dir, "--query", "storm", "--mode", "lexical", "--device", "cpu")
    assert result.exit_code == 0 and "query: storm" in result.output
    result = run("index", "delete", store_dir, "--where", 'lang = "fr"')
    assert result.exit_code == 0 and "chunks deleted" in result.output
    result = run("index", "delete", store_dir, "--ids", "doc0,doc1", "--ids", "doc2")
    assert result.exit_code == 0
    result = run("index", "info", store_dir, "--json")
    info = json.loads(result.stdout)
    assert info["tombstones"] > 0 and info["documents"] == 12 + 3 - 2 - 3 and info["index_type"] == "IndexHNSWFlat"
    result = run("index", "compact", store_dir)
    assert result.exit_code == 0 and "0 tombstones left" in result.output
    result = run("index", "info", store_dir)
    assert result.exit_code == 0 and "tombstones  0" in result.output and "default mode dense" in result.output
    # bad filters and a missing store are one clear line each
    result = run("index", "search", "--store", store_dir, "--query", "x", "--where", "lang = ")
    assert result.exit_code == 2 and "expected a value" in result.output
    result = run("index", "delete", tmp_path / "nope", "--ids", "x")
    assert result.exit_code == 2 and "no store here" in result.output and not (tmp_path / "nope").exists()


def test_tune_and_eval_through_the_store(encoder, tmp_path):
    beir = write_beir(tmp_path / "beir")
    store_dir = tmp_path / "store"
    assert run("index", "build", "--input", beir / "corpus.jsonl", "--model", encoder, "--out", store_dir,
               "--device", "cpu").exit_code == 0
    result = run("index", "eval", store_dir, "--beir", beir, "--out", tmp_path / "eval.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert set(doc["modes"]) == {"dense", "lexical", "hybrid"} and doc["n_queries"] == 6
    result = run("index", "tune", store_dir, "--beir", beir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    fusion = VectorStore(store_dir).fusion
    scores = fusion.tuned["scores"]
    assert fusion.tuned["best"] >= max(scores["dense"], scores["lexical"])
    result = run("index", "eval", store_dir, "--beir", beir, "--out", tmp_path / "eval2.json", "--device", "cpu")
    doc = json.loads((tmp_path / "eval2.json").read_text())
    default = doc["modes"][doc["default_mode"]]["ndcg@10"]
    assert default >= max(doc["modes"]["dense"]["ndcg@10"], doc["modes"]["lexical"]["ndcg@10"]) - 1e-9
    result = run("index", "tune", store_dir, "--queries", beir / "queries.jsonl", "--device", "cpu")
    assert result.exit_code == 2 and "--qrels" in result.output


@pytest.mark.parametrize("content, msg", [
    (b"", "no records"),
    (b'{"_id": "a", "body": "x"}\n', "field 'text' missing"),
    (b'{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "'a' was already given on line 1"),
    (b'{"_id": "a", "text": "x"}\nnot json\n', ":2:"),
    (b"\xff\xfe\x00binary", "docs.jsonl"),
])
def test_bad_input_names_the_file_and_leaves_nothing(encoder, tmp_path, content, msg):
    bad = tmp_path / "docs.jsonl"
    bad.write_bytes(content)
    result = run("index", "build", "--input", bad, "--model", encoder, "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 2 and msg in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_auto_chooses_by_size_and_memory(encoder, tmp_path):
    cfg = IndexConfig()
    assert auto_config(cfg, 50_000, 384, 8)[0].factory == "Flat"
    hnsw, why = auto_config(cfg, 2_000_000, 384, 16)
    assert hnsw.factory == "HNSW32,Flat" and "fit" in why
    ivfpq, why = auto_config(cfg, 50_000_000, 768, 16)
    assert ivfpq.factory.startswith("IVF") and ",PQ" in ivfpq.factory and "HNSW would need" in why
    assert 768 % int(ivfpq.factory.split("PQ")[1]) == 0
    with pytest.raises(ValueError, match="shard the corpus"):
        auto_config(cfg, 10_000_000_000, 768, 4)
    result = run("index", "build", "--input", write_docs(tmp_path / "d.jsonl"), "--model", encoder, "--out",
                 tmp_path / "s", "--auto", "--memory", "1", "--device", "cpu")
    assert result.exit_code == 0 and "--auto: Flat (exact)" in result.output
    result = run("index", "build", "--input", tmp_path / "d.jsonl", "--out", tmp_path / "t", "--auto")
    assert result.exit_code != 0 and "--memory" in result.output
    np.testing.assert_equal(len(VectorStore(tmp_path / "s")) > 12, True)


def test_adding_with_another_encoder_is_refused(encoder, tmp_path):
    from mosaic_embed.encode import build_encoder, save_encoder
    from tests.helpers import tiny_mosaic

    store_dir = tmp_path / "store"
    assert run("index", "build", "--input", write_docs(tmp_path / "a.jsonl", n=3), "--model", encoder, "--out",
               store_dir, "--device", "cpu").exit_code == 0
    other = tmp_path / "other"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b", seed=3), "mean", True, max_seq_len=48, device="cpu"), other)
    result = run("index", "add", store_dir, "--input", write_docs(tmp_path / "b.jsonl", n=2, start=50), "--model",
                 other, "--device", "cpu")
    assert result.exit_code == 2 and "is not the encoder that built" in result.output
    assert VectorStore(store_dir).manifest["outputs"]["documents"] == 3


def test_max_chunks_truncates_documents(encoder, tmp_path):
    store_dir = tmp_path / "store"
    result = run("index", "build", "--input", write_docs(tmp_path / "d.jsonl", n=8), "--model", encoder, "--out",
                 store_dir, "--device", "cpu", "--set", "max_chunks=1")
    assert result.exit_code == 0, result.output
    store = VectorStore(store_dir)
    rows = store.db.execute("SELECT doc_id, chunk, start FROM documents").fetchall()
    assert len(rows) == 8 and {r[1] for r in rows} == {0} and {r[2] for r in rows} == {0}
    result = run("index", "build", "--input", tmp_path / "d.jsonl", "--model", encoder, "--out", tmp_path / "x",
                 "--set", "max_chunks=0")
    assert result.exit_code == 2 and "max_chunks must be >= 1" in result.output
