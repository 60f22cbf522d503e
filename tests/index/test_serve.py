"""The HTTP server over real loopback HTTP: search, embed, documents, batching, and 20+ bad requests."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import threading

import numpy as np
import pytest

from mosaic_embed.config import IndexConfig, ServeConfig
from mosaic_embed.index.ingest import build_from_input
from mosaic_embed.index.serve import BackgroundServer
from mosaic_embed.index.store import open_writer
from tests.helpers import write_beir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mosaic_embed.encode import Encoder, build_encoder, save_encoder
    from tests.helpers import tiny_mosaic

    root = tmp_path_factory.mktemp("serve")
    save_encoder(build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=48, device="cpu"),
                 root / "encoder")
    beir = write_beir(root / "beir")
    encoder = Encoder.load(root / "encoder", device="cpu")
    return {"root": root, "beir": beir, "encoder": encoder}


def new_store(built, tmp_path):
    return build_from_input(built["beir"] / "corpus.jsonl", tmp_path / "store", IndexConfig(), built["encoder"])


def request(url, method, path, body=None, raw=None, headers=None, chunked=False):
    host = url.split("//")[1]
    conn = http.client.HTTPConnection(host, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if chunked:
        conn.request(method, path, body=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]), headers=hdrs,
                     encode_chunked=True)
    else:
        conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(payload)
    except ValueError:
        return resp.status, payload


@pytest.fixture
def server(built, tmp_path, request_param=None):
    servers = []

    def start(**changes):
        store = new_store(built, tmp_path) if not (tmp_path / "store").exists() else tmp_path / "store"
        cfg = ServeConfig(store=store, port=0, device="cpu", **changes)
        srv = BackgroundServer(cfg, encoder=built["encoder"])
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_search_embed_health_info(server, built):
    srv = server()
    status, body = request(srv.url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["chunks"] == 12
    status, body = request(srv.url, "POST", "/search", {"texts": ["storm news", "market"], "k": 3})
    assert status == 200 and body["mode"] == "dense" and len(body["results"]) == 2
    first = body["results"][0]
    assert first["query"] == "storm news" and first["complete"] and len(first["hits"]) == 3
    status, body = request(srv.url, "POST", "/search", {"texts": ["storm"], "k": 5, "mode": "hybrid",
                                                        "filter": "title is not null", "with_text": False})
    assert status == 200 and all(h["text"] is None for h in body["results"][0]["hits"])
    status, body = request(srv.url, "POST", "/embed", {"input": ["storm news", "a"], "model": "anything"})
    assert status == 200 and body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    ref = built["encoder"].encode(["storm news", "a"])
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], ref, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 2
    status, body = request(srv.url, "POST", "/embed", {"input": "storm", "encoding_format": "base64"})
    import base64

    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, built["encoder"].encode(["storm"])[0], atol=1e-5)
    status, body = request(srv.url, "GET", "/info")
    assert status == 200 and body["chunks"] == 12 and body["factory"] == "Flat"


def test_concurrent_queries_share_forwards_and_get_their_own_results(server, built):
    srv = server(batch_ms=100.0, max_batch=64)
    texts = [f"storm {i} market" if i % 2 else f"space {i}" for i in range(24)]
    before = request(srv.url, "GET", "/health")[1]["forwards"]
    barrier = threading.Barrier(len(texts))

    def one(t):
        barrier.wait()
        return request(srv.url, "POST", "/embed", {"input": t})[1]["data"][0]["embedding"]

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(one, texts))
    forwards = request(srv.url, "GET", "/health")[1]["forwards"] - before
    assert forwards < len(texts) / 2  # many requests per forward
    np.testing.assert_allclose(got, built["encoder"].encode(texts), atol=1e-5)  # each its own vector


def test_without_batching_every_request_is_its_own_forward(server):
    srv = server(batching=False)
    before = request(srv.url, "GET", "/health")[1]["forwards"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: request(srv.url, "POST", "/search", {"texts": [f"q {i}"]}), range(8)))
    assert request(srv.url, "GET", "/health")[1]["forwards"] - before == 8


BAD_SEARCH = [
    ({}, 422, "texts"),
    ({"texts": []}, 422, "texts"),
    ({"texts": "storm"}, 422, "texts"),
    ({"texts": [""]}, 422, "texts"),
    ({"texts": ["x" * 20_001]}, 422, "texts"),
    ({"texts": ["q"] * 65}, 422, "texts"),
    ({"texts": [3]}, 422, "texts"),
    ({"texts": ["q"], "k": 0}, 422, "k"),
    ({"texts": ["q"], "k": 10**9}, 422, "k"),
    ({"texts": ["q"], "k": "5"}, 422, "k"),
    ({"texts": ["q"], "k": 1.5}, 422, "k"),
    ({"texts": ["q"], "k": True}, 422, "k"),
    ({"texts": ["q"], "top_k": 3}, 422, "top_k"),
    ({"texts": ["q"], "mode": "sparse"}, 422, "mode"),
    ({"texts": ["q"], "filter": "lang = "}, 400, "expected a value"),
    ({"texts": ["q"], "filter": 'lang = "en"; DROP TABLE documents'}, 400, "unexpected character"),
    ({"texts": ["q"], "filter": "x = 1 or 1 = 1"}, 400, "expected a metadata field"),
    ({"texts": ["q"], "filter": ""}, 422, "filter"),
    ([1, 2], 422, "body"),
]


def test_bad_requests_answer_4xx_and_the_server_lives_on(server, tmp_path):
    srv = server(max_body_bytes=200_000)
    before = sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts)
    answers = []
    for body, status, word in BAD_SEARCH:
        got, payload = request(srv.url, "POST", "/search", body)
        answers.append(got)
        assert got == status and word in json.dumps(payload), (body, got, payload)
    others = [
        (("POST", "/search"), {"raw": b"{not json"}, 422),
        (("POST", "/search"), {"raw": b"\xff\xfe\x00"}, 400),
        (("POST", "/search"), {"raw": b'{"texts": ["q"]}', "headers": {"Content-Type": "text/plain"}}, 422),
        (("POST", "/search"), {"raw": b"[" * 100_000 + b"]" * 100_000}, 400),
        (("POST", "/search"), {"raw": b'{"texts": ["' + b"x" * 300_000 + b'"]}'}, 413),
        (("POST", "/search"), {"raw": b'{"texts": ["' + b"x" * 300_000 + b'"]}', "chunked": True}, 413),
        (("POST", "/embed"), {"body": {"input": []}}, 422),
        (("POST", "/embed"), {"body": {"input": ["a"], "dimensions": 7}}, 400),
        (("POST", "/embed"), {"body": {"input": ["a"], "encoding_format": "int8"}}, 422),
        (("POST", "/embed"), {"body": {"inputs": ["a"]}}, 422),
        (("POST", "/documents"), {"body": {"documents": [{"id": "n", "text": "t"}]}}, 403),
        (("DELETE", "/documents/d0"), {}, 403),
        (("DELETE", "/documents/..%2F..%2Fmanifest.json"), {}, 404),  # %2F is a "/": no such route
        (("GET", "/nope"), {}, 404),
        (("PUT", "/search"), {"body": {"texts": ["q"]}}, 405),
    ]
    wrong = []
    for (method, path), kw, status in others:
        got, payload = request(srv.url, method, path, **kw)
        answers.append(got)
        if got != status or not (isinstance(payload, dict) and payload.get("detail")):
            wrong.append((method, path, str(kw)[:60], got, str(payload)[:100]))
    assert not wrong, wrong
    assert len(answers) >= 20 and all(400 <= a < 500 for a in answers)
    status, body = request(srv.url, "GET", "/health")
    assert status == 200
    assert request(srv.url, "POST", "/search", {"texts": ["storm"]})[0] == 200
    assert sorted(p for p in tmp_path.rglob("*") if "store" not in p.parts) == before  # nothing written outside


def test_writable_server_adds_upserts_and_deletes(server, built, tmp_path):
    srv = server(writable=True)
    docs = {"documents": [{"id": "new1", "text": "volcano eruption ash cloud", "metadata": {"lang": "is"}},
                          {"id": "new2", "text": "glacier ice melting", "title": "ice"}]}
    status, body = request(srv.url, "POST", "/documents", docs)
    assert status == 200 and body["chunks_added"] == 2, body
    status, body = request(srv.url, "POST", "/search", {"texts": ["volcano"], "k": 2, "filter": 'lang = "is"'})
    assert status == 200 and [h["id"] for h in body["results"][0]["hits"]] == ["new1"]
    status, body = request(srv.url, "POST", "/documents", docs)
    assert status == 400 and "already in the store" in body["detail"]
    status, body = request(srv.url, "POST", "/documents", {**docs, "upsert": True})
    assert status == 200 and body["chunks_removed"] == 2
    dup = {"documents": [{"id": "z", "text": "a"}, {"id": "z", "text": "b"}]}
    assert request(srv.url, "POST", "/documents", dup)[0] == 422
    assert request(srv.url, "POST", "/documents", {"documents": [{"id": "m", "text": "a",
                                                                  "metadata": {"x": 1e999}}]})[0] in (400, 422)
    status, body = request(srv.url, "DELETE", "/documents/new1")
    assert status == 200 and body["chunks_removed"] == 1
    assert request(srv.url, "DELETE", "/documents/new1")[0] == 404
    assert request(srv.url, "DELETE", "/documents/..%2F..%2Fmanifest.json")[0] == 404
    with open_writer(tmp_path / "store", what="another writer"):
        status, body = request(srv.url, "DELETE", "/documents/new2")
        assert status == 409 and "another writer" in body["detail"]
    assert request(srv.url, "GET", "/health")[1]["chunks"] == 13


def test_read_only_server_follows_new_generations(server, built, tmp_path):
    srv = server(refresh_s=0.0)
    gen = request(srv.url, "GET", "/health")[1]["generation"]
    with open_writer(tmp_path / "store") as w:
        w.delete(doc_ids=["d0"])
    status, body = request(srv.url, "GET", "/health")
    assert body["generation"] != gen and body["chunks"] == 11
