"""HTTP serving of a store (FastAPI + uvicorn): the encoder stays loaded, concurrent queries share forwards.

Endpoints::

    POST   /search             {"texts": [...], "k": 10, "filter": "lang = \"en\"", "mode": "hybrid"}
    POST   /embed              OpenAI-style: {"input": "text" | [...], "model": "...", "encoding_format": "float"}
                               (embedded as queries: the encoder's query prompt, batched with the searches)
    POST   /documents          {"documents": [{"id", "text", "title"?, "metadata"?}], "upsert": false}  (--writable)
    DELETE /documents/{id}     every chunk of one document                                             (--writable)
    GET    /health             liveness and the generation served
    GET    /info               what ``index info`` prints

Batching: each request's texts go to one queue; a worker thread takes what arrives within ``batch_ms`` (up to
``max_batch`` texts) and embeds it in one forward, so 32 clients sending one query each cost a few forwards,
not 32. Validation: every body is a strict schema (unknown fields, wrong types, empty or oversized texts, k
outside [1, max_k] -> 422), bodies over ``max_body_bytes`` -> 413, a bad filter -> 400, a write while another
writer holds the store -> 409, writes on a read-only server -> 403; no request field is a path, so nothing a
client sends reaches a file outside the store. An unexpected error answers 500 and the server keeps running.

A read-only server follows the store: at most every ``refresh_s`` it checks the manifest and opens a newly
published generation (in-flight requests finish on the one they started with).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime, and the
# request models are local to create_app (their limits come from the config).
import asyncio
import base64
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Annotated, Any, Literal

import numpy as np

from ..config import ServeConfig

logger = logging.getLogger(__name__)


class QueryBatcher:
    """Embeds texts of concurrent callers together: ``submit(texts)`` -> a Future of (n, D) float32.

    With ``enabled`` false every submission is embedded on its own (still one at a time: the encoder is one
    model), which is the baseline the serve benchmark compares against.
    """

    def __init__(self, encoder, max_batch: int = 64, wait_s: float = 0.002, enabled: bool = True):
        self.encoder, self.max_batch, self.wait_s, self.enabled = encoder, max_batch, wait_s, enabled
        self.lock = threading.Lock()  # one forward at a time (queries and document writes alike)
        self.forwards = 0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="query-batcher")
        self._thread.start()

    def encode(self, texts: list[str], prompt_name: str | None = "query") -> np.ndarray:
        """Embed now, in the caller's thread (document writes), taking turns with the batch worker.
        ``prompt_name``: the encoder's prompt for these texts ("query" for the queued queries)."""
        with self.lock:
            self.forwards += 1
            return self.encoder.encode(texts, prompt_name=prompt_name)

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((list(texts), fut))
        return fut

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            if self.enabled:
                n = len(first[0])
                deadline = time.perf_counter() + self.wait_s
                while n < self.max_batch:
                    left = deadline - time.perf_counter()
                    try:
                        item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                    n += len(item[0])
            texts = [t for item, _ in batch for t in item]
            try:
                emb = self.encode(texts)
            except BaseException as err:  # every waiting request gets the error, the worker lives on
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            start = 0
            for item, fut in batch:
                fut.set_result(emb[start : start + len(item)])
                start += len(item)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class _LockedEncoder:
    """The server's encoder for document writes: ``encode`` takes turns with the query batcher."""

    def __init__(self, batcher: QueryBatcher):
        self._batcher = batcher

    def encode(self, texts, *args, prompt_name: str | None = "document", **kwargs):
        return self._batcher.encode(list(texts), prompt_name=prompt_name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batcher.encoder, name)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes answers 413 before the app sees it.

    A declared Content-Length is checked first; a chunked body is read here (at most ``limit`` + one chunk)
    and handed on whole, so an endless stream cannot fill the memory and no parser meets a truncated body.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _plain(send, 413, f"request body over {self.limit} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await _plain(send, 413, f"request body over {self.limit} bytes")
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _plain(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(cfg: ServeConfig, encoder=None):
    """The FastAPI app over ``cfg.store``; ``encoder`` (default: the store's own, on ``cfg.device``)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi import Path as PathParam
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    from ..artifacts import FolderLockedError
    from .ingest import Record, add_records
    from .store import MAX_K, VectorStore, open_writer
    from .where import parse_where

    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_text_chars)]
    strict = ConfigDict(extra="forbid", strict=True)

    class SearchRequest(BaseModel):
        model_config = strict
        texts: list[Text] = Field(min_length=1, max_length=cfg.max_texts)
        k: int = Field(10, ge=1, le=min(cfg.max_k, MAX_K))
        filter: str | None = Field(None, min_length=1, max_length=4096)
        mode: Literal["dense", "lexical", "hybrid"] | None = None
        with_text: bool = True

    class EmbedRequest(BaseModel):
        model_config = strict
        input: Text | list[Text]
        model: str | None = Field(None, max_length=256)
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: int | None = Field(None, ge=1)
        user: str | None = Field(None, max_length=256)

    class DocumentIn(BaseModel):
        model_config = strict
        id: str = Field(min_length=1, max_length=512)
        text: str = Field(min_length=1, max_length=cfg.max_text_chars * 50)
        title: str | None = Field(None, max_length=cfg.max_text_chars)
        metadata: dict[str, Any] = Field(default_factory=dict)

    class DocumentsRequest(BaseModel):
        model_config = strict
        documents: list[DocumentIn] = Field(min_length=1, max_length=cfg.max_documents)
        upsert: bool = False

    class State:
        store = VectorStore(cfg.store, cfg.search_device)
        checked = time.monotonic()
        lock = threading.Lock()

    enc = encoder or State.store.encoder(device=cfg.device)
    batcher = QueryBatcher(enc, cfg.max_batch, cfg.batch_ms / 1000.0, cfg.batching)
    model_name = (State.store.manifest.get("encoder") or {}).get("path") or "encoder"

    def current() -> VectorStore:
        """The store to serve this request; a newer generation is opened at most every refresh_s."""
        now = time.monotonic()
        if now - State.checked >= cfg.refresh_s:
            State.checked = now
            with State.lock:
                if State.store.changed():
                    State.store = VectorStore(cfg.store, cfg.search_device)
        return State.store

    app = FastAPI(title="mosaic-embed store", version="1")
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(status_code=422, content={"detail": f"{where or 'body'}: {first['msg']}",
                                                      "errors": errors})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("serve: %s %s failed", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__})"})

    @app.get("/health")
    def health() -> dict:
        store = current()
        return {"status": "ok", "generation": store.generation, "chunks": len(store), "writable": cfg.writable,
                "batching": cfg.batching, "forwards": batcher.forwards}

    @app.get("/info")
    def info() -> dict:
        return current().info()

    @app.post("/search")
    async def search(req: SearchRequest) -> dict:
        store = current()
        if req.filter is not None:
            try:
                parse_where(req.filter)
            except ValueError as err:
                raise HTTPException(400, str(err)) from None
        mode = req.mode or store.fusion.mode
        if mode != "dense" and store.lexical is None:
            raise HTTPException(400, f"mode {mode}: this store has no lexical index")
        emb = await asyncio.wrap_future(batcher.submit(req.texts)) if mode != "lexical" else None
        try:
            results = await run_in_threadpool(store.search_texts, req.texts, req.k, req.filter, mode, None, emb,
                                              req.with_text)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return {"mode": mode, "generation": store.generation,
                "results": [{"query": t, **r.to_dict()} for t, r in zip(req.texts, results, strict=True)]}

    @app.post("/embed")
    async def embed(req: EmbedRequest) -> dict:
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not 1 <= len(texts) <= cfg.max_texts:
            raise HTTPException(422, f"input: 1 to {cfg.max_texts} texts, got {len(texts)}")
        if req.dimensions is not None and req.dimensions != enc.dim:
            raise HTTPException(400, f"dimensions: this encoder makes {enc.dim}-dimensional embeddings, "
                                     f"not {req.dimensions}")
        emb = await asyncio.wrap_future(batcher.submit(texts))
        _, lens = await run_in_threadpool(enc.tokenize_flat, texts)
        data = []
        for i, vec in enumerate(emb):
            value: Any = (base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode()
                          if req.encoding_format == "base64" else vec.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = int(np.sum(lens))
        return {"object": "list", "data": data, "model": req.model or model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _write(fn) -> dict:
        if not cfg.writable:
            raise HTTPException(403, "this server is read-only (start it with --writable to change documents)")
        try:
            result = fn()
        except FolderLockedError as err:
            raise HTTPException(409, str(err)) from None
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        with State.lock:
            State.store = VectorStore(cfg.store, cfg.search_device)
            State.checked = time.monotonic()
        return {**result, "generation": State.store.generation}

    @app.post("/documents")
    def add_documents(req: DocumentsRequest) -> dict:
        ids = [d.id for d in req.documents]
        if len(set(ids)) != len(ids):
            raise HTTPException(422, "documents: an id is given twice")

        def run() -> dict:
            with open_writer(cfg.store, what="mosaic-embed index serve") as writer:
                records = (Record(i, d.id, d.text, d.title or None,
                                  {**d.metadata, **({"title": d.title} if d.title else {})})
                           for i, d in enumerate(req.documents))
                n = add_records(writer, _LockedEncoder(batcher), records, writer.cfg, upsert=req.upsert)
                return {"chunks_added": n, "chunks_removed": len(writer.removed)}

        return _write(run)

    @app.delete("/documents/{doc_id}")
    def delete_document(doc_id: Annotated[str, PathParam(min_length=1, max_length=512)]) -> dict:
        if cfg.writable and not len(current().doc_keys([doc_id])):
            raise HTTPException(404, f"no document {doc_id!r} in the store")

        def run() -> dict:
            with open_writer(cfg.store, what="mosaic-embed index serve") as writer:
                return {"chunks_removed": writer.delete(doc_ids=[doc_id])}

        return _write(run)

    app.state.batcher = batcher
    return app


def run_server(cfg: ServeConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    app = create_app(cfg)
    logger.warning("serving %s on http://%s:%d (%s, batching %s)", cfg.store, cfg.host, cfg.port,
                   "writable" if cfg.writable else "read-only", "on" if cfg.batching else "off")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", limit_concurrency=512)
    finally:
        app.state.batcher.close()


class BackgroundServer:
    """A server on a free loopback port in a background thread (tests and benchmarks): ``url``, ``stop()``."""

    def __init__(self, cfg: ServeConfig, encoder=None):
        import uvicorn

        self.app = create_app(cfg, encoder)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=cfg.host, port=cfg.port, log_level="warning",
                                                    limit_concurrency=512))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{cfg.host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.batcher.close()
