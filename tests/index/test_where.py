"""Metadata filters: random filters against a brute-force Python evaluation, inside FAISS and by over-fetching,
and the grammar refusing anything that is not a filter."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mosaic_embed.config import IndexConfig
from mosaic_embed.index.ingest import build_store
from mosaic_embed.index.store import VectorStore
from mosaic_embed.index.where import parse_where

MISSING = object()


def field(meta, name):
    node = meta
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def compare(meta, name, op, value):
    """The documented semantics: true only for a present field of the value's type."""
    v = field(meta, name)
    if v is MISSING:
        return False
    if isinstance(value, bool):
        return isinstance(v, bool) and ((v == value) if op == "=" else (v != value))
    if isinstance(value, int | float):
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
    elif not isinstance(v, str):
        return False
    return {"=": v == value, "!=": v != value, "<": v < value, "<=": v <= value, ">": v > value,
            ">=": v >= value}[op]


def random_metadata(rng, i):
    meta = {}
    if rng.random() < 0.8:
        meta["lang"] = str(rng.choice(["en", "de", "fr", "en-GB"]))
    if rng.random() < 0.8:
        year = int(rng.integers(1990, 2030))
        meta["year"] = year if rng.random() < 0.85 else str(year)  # some years are strings: never compared as numbers
    if rng.random() < 0.5:
        meta["score"] = float(np.round(rng.normal(), 2))
    if rng.random() < 0.5:
        meta["flag"] = bool(rng.random() < 0.5)
    if rng.random() < 0.3:
        meta["src"] = {"kind": str(rng.choice(["web", "book"])), "n": int(rng.integers(0, 5))}
    if rng.random() < 0.1:
        meta["lang"] = None
    return meta


def random_filter(rng, depth=0):
    """(filter text, python predicate)"""
    r = rng.random()
    if depth < 2 and r < 0.3:
        a, fa = random_filter(rng, depth + 1)
        b, fb = random_filter(rng, depth + 1)
        if rng.random() < 0.5:
            return f"({a}) and ({b})", lambda m: fa(m) and fb(m)
        return f"({a}) or ({b})", lambda m: fa(m) or fb(m)
    if depth < 2 and r < 0.38:
        a, fa = random_filter(rng, depth + 1)
        return f"not ({a})", lambda m: not fa(m)
    kind = rng.integers(0, 6)
    op = str(rng.choice(["=", "!=", "<", "<=", ">", ">="]))
    if kind == 0:
        v = str(rng.choice(["en", "de", "fr", "en-GB", "xx"]))
        return f'lang {op} "{v}"', lambda m, op=op, v=v: compare(m, "lang", op, v)
    if kind == 1:
        v = int(rng.integers(1985, 2035))
        return f"year {op} {v}", lambda m, op=op, v=v: compare(m, "year", op, v)
    if kind == 2:
        v = float(np.round(rng.normal(), 1))
        return f"score {op} {v}", lambda m, op=op, v=v: compare(m, "score", op, v)
    if kind == 3:
        v = bool(rng.random() < 0.5)
        op = str(rng.choice(["=", "!="]))
        return f"flag {op} {str(v).lower()}", lambda m, op=op, v=v: compare(m, "flag", op, v)
    if kind == 4:
        vals = list(rng.choice(["en", "de", "fr", "web"], size=2))
        neg = rng.random() < 0.3
        text = f"lang {'not ' if neg else ''}in ({', '.join(repr(str(v)) for v in vals)})"
        return text, lambda m, vals=vals, neg=neg: neg != any(compare(m, "lang", "=", str(v)) for v in vals)
    if rng.random() < 0.5:
        neg = rng.random() < 0.5
        return (f"lang is {'not ' if neg else ''}null",
                lambda m, neg=neg: neg != (field(m, "lang") is MISSING or field(m, "lang") is None))
    v = str(rng.choice(["web", "book"]))
    return f'src.kind = "{v}"', lambda m, v=v: compare(m, "src.kind", "=", v)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(3)
    n, dim = 400, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    metas = [random_metadata(rng, i) for i in range(n)]
    return x, [f"d{i}" for i in range(n)], metas


@pytest.mark.parametrize("factory, params, exact_limit, rescore", [
    ("Flat", "", 0, 0),              # IDSelector inside an exact search
    ("Flat", "", 10_000, 0),         # exact scoring of the admitted vectors
    ("HNSW16,Flat", "efSearch=128", 0, 0),  # IDSelector inside the graph search
    ("LSH", "", 0, 60),              # no IDSelector support: over-fetching, then rescoring (here of all)
])
def test_filtered_search_matches_brute_force(tmp_path, corpus, factory, params, exact_limit, rescore):
    x, ids, metas = corpus
    cfg = IndexConfig(factory=factory, search_params=params, exact_limit=exact_limit, rescore=rescore,
                      metric="l2" if factory == "LSH" else "ip")
    store = VectorStore(build_store(x, ids, tmp_path / "s", cfg, metadata=metas))
    rng = np.random.default_rng(11)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    checked = 0
    for _ in range(60):
        text, pred = random_filter(rng)
        truth = [i for i, m in enumerate(metas) if pred(m)]
        allowed = store.allowed_keys(text)
        assert allowed.tolist() == truth, text  # SQL == the Python reference, key for key
        k = 7
        for qi, res in enumerate(store.search(q, k=k, where=text)):
            assert res.available == len(truth) and res.complete, (text, res.note)
            want = [ids[j] for j in sorted(truth, key=lambda j: -float(x[j] @ q[qi]))[:k]]
            got = [h.id for h in res.hits]
            if factory == "HNSW16,Flat":
                assert len(set(got) & set(want)) >= len(want) - 1, text
            else:
                assert got == want, text
            assert all(pred(h.metadata) for h in res.hits)
        checked += len(truth) > 0
    assert checked > 20  # most random filters admit something


BAD = [
    ('lang = "en"; DROP TABLE documents', "unexpected character"),
    ('lang = "en" or 1 = 1', "expected a metadata field"),
    ("lang", "expected an operator"),
    ("lang = ", "expected a value"),
    ('lang = "en', "unterminated string"),
    ("(lang = 'en'", "expected ')'"),
    ("lang = 'en')", "unexpected ')'"),
    ("lang like 'e%'", "expected an operator"),
    ("lang = en", "expected a value"),
    ("flag < true", "booleans compare only"),
    ("_id > 3", "_id is the document id"),
    ("a..b = 1", "unexpected character"),
    ('"lang" = 1', "expected a metadata field"),
    ("json_extract(metadata) = 1", "expected an operator"),
    ("", "empty"),
    ("x = 1 " + "and x = 1 " * 600, "characters, at most"),
    ("not " * 40 + "x = 1", "nested more than"),
]


@pytest.mark.parametrize("text, msg", BAD)
def test_the_grammar_refuses_what_is_not_a_filter(text, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        parse_where(text)


def test_values_and_names_are_bound_parameters_never_sql():
    w = parse_where("""title = "it's \\"quoted\\"" and n >= -2.5e1 and src.kind in ('a', 'b') and _id != 'x'""")
    assert "quoted" not in w.sql and "kind" not in w.sql and "title" not in w.sql
    assert w.params.count('$."src"."kind"') == 4 and 'it\'s "quoted"' in w.params and -25.0 in w.params


def test_filter_on_document_id(tmp_path, corpus):
    x, ids, metas = corpus
    store = VectorStore(build_store(x, ids, tmp_path / "s", IndexConfig(), metadata=metas))
    assert store.allowed_keys("_id = 'd7' or _id in ('d9', 'd11')").tolist() == [7, 9, 11]
    assert store.allowed_keys("_id is null").tolist() == []
