"""Store writes: random add/delete/upsert sequences against an in-memory model, crash safety (kill -9), locks,
stale temp folders, tombstones and honest shortfalls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mosaic_embed.artifacts import FolderLockedError
from mosaic_embed.config import IndexConfig
from mosaic_embed.index.ingest import build_store
from mosaic_embed.index.store import Doc, VectorStore, open_writer

DIM = 12
ROOT = Path(__file__).resolve().parents[2]


def unit(rng, n):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def all_docs(store: VectorStore) -> dict[str, tuple]:
    rows = store.db.execute("SELECT id, doc_id, text, metadata FROM documents").fetchall()
    return {r[1]: (r[0], r[2], json.loads(r[3])) for r in rows}


def check_against_model(store: VectorStore, model: dict, exact: bool, rng) -> None:
    """The store holds exactly the model's documents, and search over them matches brute force."""
    docs = all_docs(store)
    assert set(docs) == set(model)
    for doc_id, (_, text, meta) in docs.items():
        assert (text, meta) == (model[doc_id][1], model[doc_id][2])
    assert store.index.ntotal == len(store) + len(store.tombstones)
    if not model:
        assert store.search(unit(rng, 1), k=3)[0].hits == []
        return
    ids = sorted(model)
    vecs = np.stack([model[i][0] for i in ids])
    q = unit(rng, 4)
    k = min(5, len(ids))
    results = store.search(q, k=k)
    for qi, res in enumerate(results):
        assert res.complete and len(res.hits) == k and res.available == len(ids)
        truth = [ids[j] for j in np.argsort(-(vecs @ q[qi]), kind="stable")[:k]]
        got = [h.id for h in res.hits]
        if exact:
            assert got == truth
            np.testing.assert_allclose([h.score for h in res.hits], np.sort(vecs @ q[qi])[::-1][:k], atol=1e-5)
        else:
            assert len(set(got) & set(truth)) >= k - 1
    # every document finds itself first (the ids the store hands out are stable across generations)
    for doc_id in rng.choice(ids, size=min(3, len(ids)), replace=False):
        assert store.search(model[doc_id][0], k=1)[0].hits[0].id == doc_id


@pytest.mark.parametrize("factory, params, rescore, exact", [
    ("Flat", "", 0, True),
    ("HNSW16,Flat", "efSearch=64", 0, False),
    ("IVF4,Flat", "nprobe=4", 0, True),
    ("SQ8", "", 4, True),
])
def test_random_operations_match_an_in_memory_model(tmp_path, factory, params, rescore, exact):
    rng = np.random.default_rng(7)
    cfg = IndexConfig(factory=factory, search_params=params, rescore=rescore, train_size=500, compact_fraction=0.5,
                      exact_limit=0)
    model: dict[str, tuple] = {}
    x = unit(rng, 120)
    ids = [f"d{i}" for i in range(120)]
    metas = [{"n": i, "lang": ["en", "de"][i % 2]} for i in range(120)]
    texts = [f"text {i}" for i in range(120)]
    path = build_store(x, ids, tmp_path / "s", cfg, texts=texts, metadata=metas)
    model.update({i: (v, t, m) for i, v, t, m in zip(ids, x, texts, metas, strict=True)})
    next_new = 120
    seen_keys: dict[str, int] = {i: k for i, (k, _, _) in all_docs(VectorStore(path)).items()}
    ever = set(seen_keys.values())
    for _ in range(25):
        op = rng.choice(["add", "delete", "delete_where", "upsert", "compact"], p=[0.3, 0.25, 0.15, 0.25, 0.05])
        with open_writer(path) as w:
            if op == "add":
                n = int(rng.integers(1, 15))
                new = [f"d{next_new + i}" for i in range(n)]
                next_new += n
                v = unit(rng, n)
                w.add(v, [Doc(d, f"text {d}", {"n": int(d[1:]), "lang": "fr"}) for d in new])
                model.update({d: (v[i], f"text {d}", {"n": int(d[1:]), "lang": "fr"}) for i, d in enumerate(new)})
            elif op == "delete" and model:
                gone = list(rng.choice(sorted(model), size=min(len(model), int(rng.integers(1, 10))), replace=False))
                assert w.delete(doc_ids=gone + ["no-such-doc"]) == len(gone)
                for d in gone:
                    del model[d]
            elif op == "delete_where":
                cut = int(rng.integers(0, 200))
                gone = [d for d, (_, _, m) in model.items() if m["lang"] == "de" and m["n"] < cut]
                assert w.delete(where=f'lang = "de" and n < {cut}') == len(gone)
                for d in gone:
                    del model[d]
            elif op == "upsert" and model:
                old = list(rng.choice(sorted(model), size=min(len(model), 3), replace=False))
                new = [f"d{next_new}"]
                next_new += 1
                v = unit(rng, len(old) + 1)
                docs = [Doc(d, f"new {d}", {"n": -1, "lang": "en"}) for d in old + new]
                w.upsert(v, docs)
                model.update({d.doc_id: (v[i], d.text, d.metadata) for i, d in enumerate(docs)})
            elif op == "compact":
                w.compact()
        store = VectorStore(path)
        check_against_model(store, model, exact, rng)
        keys = {i: k for i, (k, _, _) in all_docs(store).items()}
        for doc_id, key in keys.items():  # keys are stable; an upserted document gets a new one, never a reused one
            assert key == seen_keys.get(doc_id) or key not in ever
        seen_keys.update(keys)
        ever.update(keys.values())
        if factory.startswith("HNSW"):
            assert store.info()["tombstones"] == len(store.tombstones)
            assert len(store.tombstones) <= 0.5 * store.index.ntotal + 15
        else:
            assert len(store.tombstones) == 0
        gens = sorted(p.name for p in path.iterdir() if p.name.startswith("gen-"))
        assert len(gens) <= 2 and store.generation == gens[-1]
    assert not [p for p in path.iterdir() if p.name.startswith(".gen-")]


def test_hnsw_deletes_are_tombstones_until_compacted(tmp_path):
    rng = np.random.default_rng(0)
    x = unit(rng, 60)
    path = build_store(x, [f"d{i}" for i in range(60)], tmp_path / "s",
                       IndexConfig(factory="HNSW8,Flat", compact_fraction=0.9, exact_limit=0), texts=["t"] * 60)
    with open_writer(path) as w:
        w.delete(doc_ids=[f"d{i}" for i in range(10)])
    store = VectorStore(path)
    assert (len(store), store.index.ntotal, len(store.tombstones)) == (50, 60, 10)
    assert "index compact" in store.info()["tombstones_note"]
    for i in range(10):  # a tombstoned document is never returned, not even for its own vector
        assert all(h.id != f"d{i}" for h in store.search(x[i], k=50)[0].hits)
    res = store.search(x[0], k=60)[0]
    assert res.complete and len(res.hits) == 50 and res.available == 50
    with open_writer(path) as w:
        w.compact()
    store = VectorStore(path)
    assert (len(store), store.index.ntotal, len(store.tombstones)) == (50, 50, 0)
    assert store.search(x[20], k=1)[0].hits[0].id == "d20"


def test_a_shortfall_is_reported_never_silent(tmp_path, monkeypatch):
    """An approximate index that cannot find enough matches says so (here: IVF held at 1 probe)."""
    import mosaic_embed.index.store as store_mod

    rng = np.random.default_rng(1)
    centres = unit(rng, 4) * 10
    x = np.concatenate([centres[i] + unit(rng, 30) for i in range(4)])
    metas = [{"group": i // 30} for i in range(120)]
    path = build_store(x, [f"d{i}" for i in range(120)], tmp_path / "s",
                       IndexConfig(factory="IVF4,Flat", search_params="nprobe=1", exact_limit=0), metadata=metas)
    store = VectorStore(path)
    q = centres[0:1] / 10
    res = store.search(q, k=10, where="group = 3")[0]
    assert res.complete and len(res.hits) == 10  # the search widened nprobe until it found the matches
    monkeypatch.setattr(store_mod, "max_effort", lambda index, ntotal: 1)
    res = store.search(q, k=10, where="group = 3")[0]
    assert not res.complete and len(res.hits) < 10 and res.available == 30
    assert "found" in res.note and "matching documents" in res.note
    res = store.search(q, k=500)[0]  # more than the store holds: all 120, and that is complete
    assert res.available == 120


def test_second_writer_is_refused_and_readers_keep_working(tmp_path):
    rng = np.random.default_rng(0)
    path = build_store(unit(rng, 20), [f"d{i}" for i in range(20)], tmp_path / "s", IndexConfig(), texts=["a"] * 20)
    with open_writer(path) as w:
        w.delete(doc_ids=["d0"])
        with pytest.raises(FolderLockedError, match="being written by another process"), open_writer(path):
            pass
        assert len(VectorStore(path)) == 20  # the reader sees the last published generation
    assert len(VectorStore(path)) == 19


def test_lock_contention_between_processes(tmp_path):
    rng = np.random.default_rng(0)
    path = build_store(unit(rng, 20), [f"d{i}" for i in range(20)], tmp_path / "s", IndexConfig(), texts=["a"] * 20)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mosaic_embed.index.store import open_writer
        with open_writer({str(path)!r}) as w:
            w.delete(doc_ids=["d1"])
            print("holding", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "holding"
        from click.testing import CliRunner

        from mosaic_embed.cli import main

        result = CliRunner().invoke(main, ["index", "delete", str(path), "--ids", "d2"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output
        assert len(VectorStore(path)) == 20
    finally:
        holder.kill()
        holder.wait()
    # the holder died with the lock held: the next writer takes the stale lock over and cleans up
    assert (path / ".writer.lock").exists() and [p for p in path.iterdir() if p.name.startswith(".gen-")]
    with open_writer(path) as w:
        w.delete(doc_ids=["d2"])
    assert len(VectorStore(path)) == 19
    assert not [p for p in path.iterdir() if p.name.startswith(".")]


CHILD = """
import sys, numpy as np
from mosaic_embed.index.store import Doc, open_writer
path, start, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(start)
with open_writer(path) as w:
    for b in range(0, n, batch):
        x = rng.normal(size=(batch, 12)).astype("float32")
        w.add(x, [Doc(f"n{start + b + i}", "added text", {"b": b}) for i in range(batch)])
        print("staged", b, flush=True)
print("committed", flush=True)
"""


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat"])
def test_kill_9_mid_add_leaves_the_previous_store_readable(tmp_path, factory):
    rng = np.random.default_rng(0)
    cfg = IndexConfig(factory=factory)
    path = build_store(unit(rng, 50), [f"d{i}" for i in range(50)], tmp_path / "s", cfg, texts=["old"] * 50)
    before = set(all_docs(VectorStore(path)))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outcomes = []
    for trial, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.6, 1.0)):
        child = subprocess.Popen([sys.executable, str(script), str(path), str(1000 * (trial + 1)), "400", "100"],
                                 stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().startswith("staged")  # it is inside the transaction
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out = child.stdout.read()
        child.wait()
        store = VectorStore(path)  # always readable: the old contents or the new, never a mix
        docs = set(all_docs(store))
        added = {f"n{1000 * (trial + 1) + i}" for i in range(400)}
        assert docs in (before, before | added), f"trial {trial}: a torn store"
        outcomes.append("committed" in out or docs == before | added)
        before = docs
        check = store.search(unit(rng, 1), k=5)[0]
        assert check.complete and len(check.hits) == 5
    assert not all(outcomes), "no trial was killed before its commit"
    # the next writer removes what the killed ones left behind
    with open_writer(path) as w:
        w.delete(doc_ids=["d0"])
    leftovers = [p.name for p in path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert len([p for p in path.iterdir() if p.name.startswith("gen-")]) <= 2


def test_a_writer_killed_while_publishing_leaves_no_manifest_temp_file(tmp_path):
    """kill -9 between writing the new manifest's temporary file and renaming it (seen once in CI's kill test):
    readers keep the published manifest, and the next writer removes the half-written file."""
    rng = np.random.default_rng(0)
    path = build_store(unit(rng, 10), [f"d{i}" for i in range(10)], tmp_path / "s", IndexConfig(), texts=["x"] * 10)
    (path / ".manifest.json.k1ll3d.tmp").write_text('{"generation": "gen-000')  # cut off mid-write
    assert len(all_docs(VectorStore(path))) == 10
    with open_writer(path) as w:
        w.delete(doc_ids=["d0"])
    assert [p.name for p in path.iterdir() if p.name.startswith(".")] == []
    assert len(all_docs(VectorStore(path))) == 9


def test_a_killed_build_leaves_nothing_forever(tmp_path):
    """A build killed before its first commit: the folder holds only a temp generation and a dead lock; the next
    build into it cleans both up."""
    path = tmp_path / "s"
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("open_writer(path)", "open_writer(path, IndexConfig(), fresh=True)").replace(
        "from mosaic_embed.index.store import", "from mosaic_embed.config import IndexConfig\nfrom mosaic_embed.index.store import"))
    child = subprocess.Popen([sys.executable, str(script), str(path), "0", "100000", "1000"], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().startswith("staged")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [p for p in path.iterdir() if p.name.startswith(".gen-")]
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        VectorStore(path)
    rng = np.random.default_rng(0)
    build_store(unit(rng, 10), [f"d{i}" for i in range(10)], path, IndexConfig(), texts=["x"] * 10)
    assert sorted(p.name for p in path.iterdir()) == ["gen-00000001", "manifest.json"]


def test_rebuild_keeps_ids_growing_and_tuned_fusion(tmp_path):
    from mosaic_embed.index.hybrid import Fusion
    from mosaic_embed.index.store import set_fusion

    rng = np.random.default_rng(0)
    path = build_store(unit(rng, 10), [f"d{i}" for i in range(10)], tmp_path / "s", IndexConfig(), texts=["x"] * 10)
    set_fusion(path, Fusion(mode="hybrid", method="weighted", weight=0.3, tuned={"on": "test"}))
    build_store(unit(rng, 5), [f"e{i}" for i in range(5)], path, IndexConfig(), texts=["y"] * 5)
    store = VectorStore(path)
    assert set(all_docs(store)) == {f"e{i}" for i in range(5)}
    assert min(k for k, _, _ in all_docs(store).values()) == 10  # keys are never reused
    assert store.fusion.mode == "hybrid" and store.fusion.weight == 0.3


def test_writes_validate_before_publishing(tmp_path):
    rng = np.random.default_rng(0)
    path = build_store(unit(rng, 10), [f"d{i}" for i in range(10)], tmp_path / "s", IndexConfig(), texts=["x"] * 10)
    gen = VectorStore(path).generation
    bad = [
        (lambda w: w.add(unit(rng, 1), [Doc("d3", "dup", {})]), "already in the store"),
        (lambda w: w.add(unit(rng, 2), [Doc("n1", "a", {}), Doc("n1", "b", {})]), "given twice"),
        (lambda w: w.add(np.zeros((1, DIM + 1)), [Doc("n2", "a", {})]), "dimension 13"),
        (lambda w: w.add(np.full((1, DIM), np.nan), [Doc("n3", "a", {})]), "not finite"),
        (lambda w: w.add(unit(rng, 1), [Doc("n4", "a", {"x": float("nan")})]), "not plain JSON"),
        (lambda w: w.add(unit(rng, 1), [Doc("", "a", {})]), "non-empty string"),
        (lambda w: w.delete(where="lang = "), "expected a value"),
    ]
    for fn, msg in bad:
        with pytest.raises(ValueError, match=msg), open_writer(path) as w:
            fn(w)
        assert VectorStore(path).generation == gen and len(VectorStore(path)) == 10
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileNotFoundError, match="no store here"), open_writer(tmp_path / "none"):
        pass
    assert not (tmp_path / "none").exists()


def test_exact_store_searched_with_torch_matches_faiss(tmp_path):
    """The GPU path without faiss-gpu (run here on torch's CPU device): same keys and scores as FAISS Flat."""
    rng = np.random.default_rng(5)
    path = build_store(unit(rng, 300), [f"d{i}" for i in range(300)], tmp_path / "s", IndexConfig(), texts=["t"] * 300)
    with open_writer(path) as w:  # keys are no longer rows: the id map must be followed
        w.delete(doc_ids=[f"d{i}" for i in range(0, 300, 3)])
    q = unit(rng, 9)
    ref = VectorStore(path).search(q, k=7)
    got = VectorStore(path, exact_device="cpu").search(q, k=7)
    assert [[h.id for h in r.hits] for r in got] == [[h.id for h in r.hits] for r in ref]
    np.testing.assert_allclose([[h.score for h in r.hits] for r in got], [[h.score for h in r.hits] for r in ref],
                               atol=1e-5)
    with pytest.raises(ValueError, match="only an exact inner-product store"):
        VectorStore(build_store(unit(rng, 50), [f"d{i}" for i in range(50)], tmp_path / "h",
                                IndexConfig(factory="HNSW8,Flat")), exact_device="cpu")


def test_shards_built_apart_merge_into_the_store_built_whole(tmp_path):
    from click.testing import CliRunner

    from mosaic_embed.cli import main
    from mosaic_embed.index.shards import merge_stores

    rng = np.random.default_rng(2)
    x = unit(rng, 900)
    ids = [f"d{i}" for i in range(900)]
    texts = [f"doc {i} {'storm' if i % 3 else 'market'}" for i in range(900)]
    cfg = IndexConfig(factory="IVF16,Flat", search_params="nprobe=16", train_size=300, exact_limit=0)
    template = build_store(x[:300], ids[:300], tmp_path / "template", cfg, texts=texts[:300])
    trained = VectorStore(template).index
    whole = build_store(x, ids, tmp_path / "whole", cfg, texts=texts, trained=trained)
    parts = []
    for i, (a, b) in enumerate(((0, 400), (400, 650), (650, 900))):
        parts.append(build_store(x[a:b], ids[a:b], tmp_path / f"shard{i}", cfg, texts=texts[a:b], trained=trained,
                                 first_key=a))
    merged = VectorStore(merge_stores(tmp_path / "merged", parts))
    ref = VectorStore(whole)
    assert len(merged) == 900 and merged.index.ntotal == 900 and merged.manifest["outputs"]["next_id"] == 900
    q = unit(rng, 10)
    for a, b in zip(merged.search(q, k=10), ref.search(q, k=10), strict=True):
        assert [(h.id, h.key) for h in a.hits] == [(h.id, h.key) for h in b.hits]
    (lex,) = merged.search_texts(["market"], k=5, mode="lexical")
    assert lex.hits and all("market" in h.text for h in lex.hits)
    # overlapping key ranges, or a shard trained apart, are refused and leave nothing
    clash = build_store(x[:10], [f"e{i}" for i in range(10)], tmp_path / "clash", cfg, texts=["t"] * 10,
                        trained=trained, first_key=395)
    with pytest.raises(ValueError, match="also in another shard"):
        merge_stores(tmp_path / "bad", [parts[0], clash])
    other = build_store(x[:300], ids[:300], tmp_path / "other", IndexConfig(factory="IVF16,Flat", train_size=300,
                                                                             seed=5), texts=texts[:300])
    with pytest.raises(ValueError, match="quantizer differs"):
        merge_stores(tmp_path / "bad", [parts[1], other])
    assert not (tmp_path / "bad").exists()
    result = CliRunner().invoke(main, ["index", "merge", str(tmp_path / "cli"), str(parts[0]), str(parts[1])])
    assert result.exit_code == 0 and "650 chunks from 2 shards" in result.output
