"""The vector store: a FAISS index with stable 64-bit ids, a SQLite document store, BM25, and a manifest.

Layout of a store folder::

    manifest.json          the pointer and description: names the live generation; encoder (identity, path,
                           pooling, normalisation, max_seq_len, precision), dim, metric, factory string,
                           counts, next id, fusion settings, config, timings
    gen-00000007/          the live generation (immutable once published)
        index.faiss        FAISS index; its ids are the documents' keys (IndexIDMap2, or IVF's own ids)
        docs.sqlite        documents(id, doc_id, chunk, text, metadata JSON, start, end, tokens), tombstones(id)
        bm25/              the BM25 matrix over the documents' stored tokens (lexical.py) + its row keys
        vectors.f32        float vectors in key order (+ vector_keys.i64), kept only when ``rescore`` > 0
    gen-00000006/          the previous generation, kept so that a reader that read the old manifest a
                           moment ago can still open it; removed by the next write
    .writer.lock           held by the one writer (artifacts.writer_lock); readers never look at it

Each change (build, add, delete, upsert, compact) is one transaction, made crash-safe like this:

1. take the writer lock (a second writer gets ``FolderLockedError``; a lock of a dead pid is taken over);
2. remove what a dead writer left: hidden ``.gen-*.tmp`` folders, and generation folders the manifest does not
   name (a writer killed between steps 4 and 5);
3. build the next generation in a hidden temporary folder: copy the documents database, load the index,
   apply the change to both, rebuild BM25, write and fsync every file;
4. rename the folder to ``gen-N+1`` (atomic);
5. replace ``manifest.json`` atomically (temp file + fsync + rename): **this is the commit**. Before it,
   every reader sees generation N, complete; after it, N+1, complete. The index and the documents always
   come from the same generation, so they change together or not at all;
6. delete generation N-1.

A process killed at any point therefore leaves the previous state readable (the kill -9 test checks it), and
the next writer cleans up after it. Readers never lock: they read the manifest, then open its generation;
if a writer removed that generation in between (two commits during one open) they read the manifest again.

Keys: every stored chunk gets the next 64-bit key (never reused); ``doc_id`` (the caller's id) and ``chunk``
(its number within the document) are unique among live chunks. Deleting from an index that cannot remove
(HNSW) leaves a tombstone: the key is gone from the documents, excluded from every search, counted by
``index info``, and the index is rebuilt without tombstones once they exceed ``compact_fraction`` of it (or
by ``index compact``).

Search always says when it returns fewer hits than asked: each :class:`SearchResult` carries ``available``
(live documents the filter admits) and ``complete`` (``len(hits) == min(k, available)``), with a ``note``
saying why not. Filters (``where.py``) run in SQL; their keys go into the FAISS search as an ``IDSelector``
where the index takes one (Flat, HNSW, IVF, SQ, PQ), else the search over-fetches until enough candidates
pass or the index is exhausted. A filter matching at most ``exact_limit`` documents is answered exactly by
scoring those documents' vectors. Approximate indexes that come back short are searched again with a larger
``efSearch`` / ``nprobe`` before a shortfall is reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import MANIFEST, is_temporary, read_manifest, remove_temporaries, write_manifest, writer_lock
from ..config import IndexConfig, from_dict
from .hybrid import MODES, Fusion, fuse
from .lexical import Lexical, join_tokens, tokenize
from .where import parse_where

logger = logging.getLogger(__name__)

STAGE = "index"
INDEX_FILE, DOCS_DB, LEXICAL_DIR = "index.faiss", "docs.sqlite", "bm25"
VECTORS, VECTOR_KEYS, STAGING = "vectors.f32", "vector_keys.i64", "staging.f32"
GEN_RE = re.compile(r"^gen-(\d{8})$")
TMP_RE = re.compile(r"^\.gen-.*\.tmp$")
MAX_K = 10_000

SCHEMA = """
CREATE TABLE documents (
    id INTEGER PRIMARY KEY,          -- the FAISS id (64-bit, never reused)
    doc_id TEXT NOT NULL,            -- the caller's document id
    chunk INTEGER NOT NULL,          -- chunk number within the document
    text TEXT,                       -- what was embedded (title + chunk text), NULL when built without texts
    metadata TEXT NOT NULL,          -- JSON object
    start INTEGER, "end" INTEGER,    -- character span of the chunk in the source record's text
    tokens TEXT NOT NULL             -- BM25 tokens, space-separated
);
CREATE UNIQUE INDEX documents_doc ON documents(doc_id, chunk);
CREATE TABLE tombstones (id INTEGER PRIMARY KEY);
"""


def _faiss():
    import faiss  # imported here: ~0.3 s, and the CLI's --help must not pay it

    return faiss


def _metric(name: str) -> int:
    faiss = _faiss()
    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[name]


def _as_float32(block: np.ndarray, normalize: bool) -> np.ndarray:
    """A float32 copy, L2-normalised when asked (FAISS's multithreaded normalize_L2; zero rows stay zero)."""
    block = np.array(block, dtype=np.float32, order="C", copy=True)
    if normalize and block.size:
        _faiss().normalize_L2(block)
    return block


def _check_k(k: Any) -> int:
    # FAISS asserts k > 0 (a bare AssertionError); say which option is wrong instead
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise ValueError(f"k (--top-k) must be an integer in [1, {MAX_K}], got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Doc:
    """One chunk to store: its document id, chunk number, text (what is embedded), metadata and span."""

    doc_id: str
    text: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk: int = 0
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Hit:
    """One search result. ``score``: higher is better (cosine similarity for normalised dense vectors, BM25
    for lexical, the fused score for hybrid). ``key`` is the store's 64-bit id of the chunk."""

    id: str
    key: int
    score: float
    chunk: int = 0
    text: str | None = None
    metadata: dict[str, Any] | None = None
    start: int | None = None
    end: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """The hits of one query, and whether they are all that was asked for.

    ``available``: live documents the filter admits (all live documents without one); ``complete``: the
    hits number ``min(k, available)``; otherwise ``note`` says why (an approximate index that found fewer
    matches, a lexical query few documents share a term with).
    """

    hits: list[Hit]
    k: int
    available: int
    complete: bool
    mode: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"hits": [h.to_dict() for h in self.hits], "k": self.k, "available": self.available,
                "complete": self.complete, "mode": self.mode, "note": self.note}


# ----------------------------------------------------------------------------------------------------------
# the index: ids, selectors, scores
# ----------------------------------------------------------------------------------------------------------


def new_index(dim: int, cfg: IndexConfig):
    """An empty index for ``cfg.factory`` that stores 64-bit ids: IVF keeps ids itself, others get IndexIDMap2."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(dim, cfg.factory, _metric(cfg.metric))
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1]
        raise ValueError(f"index.factory={cfg.factory!r} is not a valid FAISS factory string for metric "
                         f"{cfg.metric!r}: {msg}") from None
    for sub in (index, base_index(index)):
        if isinstance(sub, faiss.IndexIVFPQ):
            # polysemous training (on by default) only serves Hamming-thresholded search, which a store never
            # runs, and costs minutes: measured 22 s to train IVF20,PQ4 on 800 vectors of dim 16 with it
            sub.do_polysemous_training = False
    if isinstance(index, faiss.IndexIVF | faiss.IndexIDMap | faiss.IndexIDMap2):
        return index
    return faiss.IndexIDMap2(index)


def base_index(index):
    """The index under an IndexIDMap2 wrapper (downcast), or the index itself."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def can_remove(index) -> bool:
    """Whether FAISS can remove ids from this index (HNSW cannot: deletions there become tombstones)."""
    faiss = _faiss()
    return not isinstance(base_index(index), faiss.IndexHNSW)


def search_params(index, sel=None, effort: int = 1):
    """FAISS search parameters carrying ``sel`` with the index's own nprobe / efSearch (times ``effort``).

    Passing parameters replaces the values set on the index (an IVF's default parameter object says
    nprobe=1), so they are copied from it.
    """
    faiss = _faiss()
    base = base_index(index)
    if isinstance(base, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        p.nprobe = int(min(base.nlist, base.nprobe * effort))
    elif isinstance(base, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(base.hnsw.efSearch * effort)
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


def max_effort(index, ntotal: int) -> int:
    """How far ``effort`` may grow: nprobe up to every list, efSearch up to every vector; 1 for exact indexes."""
    faiss = _faiss()
    base = base_index(index)
    if isinstance(base, faiss.IndexIVF):
        return max(1, -(-base.nlist // max(1, base.nprobe)))
    if isinstance(base, faiss.IndexHNSW):
        return max(1, -(-ntotal // max(1, base.hnsw.efSearch)))
    return 1


def takes_selector(index) -> bool:
    """Whether this index filters inside its search with an IDSelector (Flat, HNSW, IVF, SQ, PQ: yes; LSH: no)."""
    faiss = _faiss()
    if index.ntotal == 0:
        return isinstance(base_index(index), faiss.IndexFlat | faiss.IndexHNSW | faiss.IndexIVF)
    sel = faiss.IDSelectorRange(0, 1)
    try:
        index.search(np.zeros((1, index.d), np.float32), 1, params=search_params(index, sel))
    except RuntimeError:
        return False
    return True


def reconstructs(index) -> bool:
    """Whether ``reconstruct`` returns the stored vectors (exactly, or as their codes decode). LSH codes are
    sign bits: their decoding is no vector to score with."""
    faiss = _faiss()
    return not isinstance(base_index(index), faiss.IndexLSH)


# ----------------------------------------------------------------------------------------------------------
# generations
# ----------------------------------------------------------------------------------------------------------


def _generation_number(name: str | None) -> int:
    m = GEN_RE.match(name or "")
    return int(m.group(1)) if m else 0


def _fsync_tree(folder: Path) -> None:
    """Flush a generation's files and folders to disk before it is published (a power cut must not publish
    a manifest that points at data still in the page cache)."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _clean_dead_writers(root: Path, manifest: dict | None) -> list[str]:
    """Under the writer lock: remove temporary folders of writers that died, and unpublished generations."""
    keep = {manifest.get("generation"), manifest.get("previous_generation")} if manifest else set()
    removed = []
    for child in root.iterdir():
        if child.is_dir() and (TMP_RE.match(child.name) or (GEN_RE.match(child.name) and child.name not in keep)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    # a writer killed while publishing leaves the new manifest's temporary file
    removed += [p.name for p in remove_temporaries(root, MANIFEST)]
    if removed:
        logger.warning("%s: removed %s left by an interrupted writer or an older generation", root,
                       ", ".join(sorted(removed)))
    return removed


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A generation's database, read-only and immutable (published generations never change: no locks)."""
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False)
    db.execute("SELECT count(*) FROM documents").fetchone()  # open the file now: it may be unlinked later
    return db


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


class VectorStore:
    """A store opened for reading: one generation, held open (files removed later stay readable to it).

    ``search`` takes query vectors, ``search_texts`` query strings (embedded by the store's own encoder with
    the settings its manifest records). Thread-safe for concurrent searches; ``changed()`` says when a writer
    has published a newer generation.
    """

    def __init__(self, path: str | Path, exact_device: str | None = None):
        """``exact_device`` ("cuda", "cuda:1"; "cpu" for tests): a Flat (exact) store keeps its vectors there
        and answers unfiltered searches with torch matmuls: exact search on a GPU without faiss-gpu."""
        self.path = Path(path)
        self.exact_device = exact_device
        self._encoder = None
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        faiss = _faiss()
        for attempt in range(10):  # noqa: B007 (attempt decides the error below)
            manifest = read_manifest(self.path, expect_stage=STAGE)
            if "generation" not in manifest:
                raise ValueError(f"{self.path}: a store of the old single-folder layout; rebuild it with "
                                 "`mosaic-embed index build`")
            gen = self.path / manifest["generation"]
            try:
                for name in (INDEX_FILE, DOCS_DB):
                    if not (gen / name).is_file():
                        raise FileNotFoundError(f"{gen}: missing {name}")
                db = _connect_readonly(gen / DOCS_DB)
                index = faiss.read_index(str(gen / INDEX_FILE))
                lexical = Lexical.load(gen / LEXICAL_DIR) if (gen / LEXICAL_DIR).is_dir() else None
                vectors = vkeys = None
                if (gen / VECTORS).is_file():
                    vkeys = np.fromfile(gen / VECTOR_KEYS, dtype=np.int64)
                    vectors = np.memmap(gen / VECTORS, dtype=np.float32, mode="r", shape=(len(vkeys), index.d)) \
                        if len(vkeys) else np.zeros((0, index.d), np.float32)
            except (FileNotFoundError, RuntimeError, sqlite3.Error) as err:
                if read_manifest(self.path, expect_stage=STAGE).get("generation") != manifest["generation"]:
                    continue  # a writer published twice while we opened: read the new manifest
                if attempt == 0 and isinstance(err, RuntimeError):
                    raise ValueError(f"{gen / INDEX_FILE}: not a readable FAISS index ({err})") from None
                raise
            break
        else:  # pragma: no cover - needs ten commits during one open
            raise RuntimeError(f"{self.path}: the store kept changing while it was opened; try again")
        self.manifest = manifest
        self.generation = manifest["generation"]
        self.config = from_dict(IndexConfig, manifest["config"], source=str(self.path / "manifest.json"))
        self.fusion = Fusion.from_manifest(manifest.get("fusion"))
        if self.config.search_params:
            faiss.ParameterSpace().set_index_parameters(base_index(index), self.config.search_params)
        self.index, self.db, self.lexical = index, db, lexical
        self._vectors, self._vkeys = vectors, vkeys
        self.count = int(db.execute("SELECT count(*) FROM documents").fetchone()[0])
        self.tombstones = np.asarray([r[0] for r in db.execute("SELECT id FROM tombstones ORDER BY id")],
                                     dtype=np.int64)
        self._takes_selector = takes_selector(index)
        self._reconstructs = reconstructs(index)
        self._torch = None
        if self.exact_device is not None:
            self._torch = self._resident_vectors(self.exact_device)

    def _resident_vectors(self, device: str):
        """(keys, (N, D) tensor on ``device``) of a Flat inner-product index, for torch search."""
        import torch

        faiss = _faiss()
        base = base_index(self.index)
        if not isinstance(base, faiss.IndexFlat) or self.config.metric != "ip":
            raise ValueError(f"exact_device: only an exact inner-product store (factory Flat, metric ip) is searched "
                             f"with torch; this one is {self.config.factory} / {self.config.metric}")
        keys = (faiss.vector_to_array(self.index.id_map).astype(np.int64) if base is not self.index
                else np.arange(base.ntotal, dtype=np.int64))
        vectors = base.reconstruct_n(0, base.ntotal) if base.ntotal else np.zeros((0, self.dim), np.float32)
        return keys, torch.from_numpy(vectors).to(torch.device(device))

    def changed(self) -> bool:
        """Whether a writer has published a newer generation (or new fusion settings) since this was opened;
        a long-lived reader then opens a new ``VectorStore`` (this one stays valid for searches in flight)."""
        try:
            current = read_manifest(self.path, expect_stage=STAGE)
        except (FileNotFoundError, ValueError):
            return False
        return current.get("generation") != self.generation or current.get("fusion") != self.manifest.get("fusion")

    def __len__(self) -> int:
        return self.count

    @property
    def dim(self) -> int:
        return self.index.d

    def info(self) -> dict[str, Any]:
        """What ``index info`` prints: counts, tombstones, index type, encoder, fusion."""
        out = self.manifest.get("outputs", {})
        return {
            "path": str(self.path.resolve()), "generation": self.generation, "chunks": self.count,
            "documents": out.get("documents"), "dim": self.dim, "factory": self.config.factory,
            "metric": self.config.metric, "index_type": type(base_index(self.index)).__name__,
            "index_vectors": int(self.index.ntotal), "tombstones": int(len(self.tombstones)),
            "tombstones_note": ("deleted from the documents and excluded from every search; the index cannot "
                                "remove them, `index compact` (or the next write past compact_fraction) does")
            if len(self.tombstones) else None,
            "next_id": out.get("next_id"), "lexical": self.lexical is not None,
            "rescore": self.config.rescore, "filter_in_index": self._takes_selector,
            "encoder": self.manifest.get("encoder"), "fusion": self.fusion.to_dict(),
            "fusion_note": self.fusion.describe(), "created": self.manifest.get("created"),
        }

    # -- documents ---------------------------------------------------------------------------------------------

    def _rows(self, keys: Iterable[int]) -> dict[int, tuple]:
        keys = [int(k) for k in keys]
        out: dict[int, tuple] = {}
        with self._lock:
            for start in range(0, len(keys), 900):  # SQLite's bound-parameter limit
                part = keys[start : start + 900]
                q = ('SELECT id, doc_id, chunk, text, metadata, start, "end" FROM documents WHERE id IN '
                     f"({','.join('?' * len(part))})")
                for row in self.db.execute(q, part):
                    out[row[0]] = row
        return out

    def document(self, key: int) -> Hit | None:
        row = self._rows([key]).get(int(key))
        return None if row is None else Hit(row[1], row[0], 0.0, row[2], row[3], json.loads(row[4]), row[5], row[6])

    def allowed_keys(self, where: str | None) -> np.ndarray | None:
        """Sorted keys of the live documents a filter admits (None: no filter)."""
        if where is None:
            return None
        w = parse_where(where)
        with self._lock:
            try:
                rows = self.db.execute(f"SELECT id FROM documents WHERE {w.sql} ORDER BY id", w.params).fetchall()
            except sqlite3.Error as err:  # e.g. malformed JSON path: the grammar should prevent it
                raise ValueError(f"filter {where!r}: {err}") from None
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def doc_keys(self, doc_ids: Sequence[str]) -> np.ndarray:
        out = []
        with self._lock:
            for start in range(0, len(doc_ids), 900):
                part = list(doc_ids[start : start + 900])
                q = f"SELECT id FROM documents WHERE doc_id IN ({','.join('?' * len(part))})"
                out.extend(r[0] for r in self.db.execute(q, part))
        return np.sort(np.asarray(out, dtype=np.int64))

    # -- dense search ------------------------------------------------------------------------------------------

    def _similarity(self, d: np.ndarray) -> np.ndarray:
        """FAISS distances -> scores where higher is better (cosine for normalised vectors under either metric)."""
        if self.config.metric == "ip":
            return d
        return 1.0 - d / 2.0 if self.config.normalize else -d

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """(n, D) float32 vectors of ``keys``: the kept float vectors when there are some, else decoded from the
        index (exact for Flat / HNSW-Flat / IVF-Flat, the codes' decoding for SQ / PQ)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._vectors is not None:
            rows = np.searchsorted(self._vkeys, keys)
            return np.asarray(self._vectors[rows], dtype=np.float32)
        faiss = _faiss()
        if isinstance(self.index, faiss.IndexIVF) and self.index.direct_map.type == faiss.DirectMap.NoMap:
            with self._lock:
                if self.index.direct_map.type == faiss.DirectMap.NoMap:
                    self.index.set_direct_map_type(faiss.DirectMap.Hashtable)
        if not len(keys):
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(keys)

    def _exact_scores(self, q: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        if self.config.metric == "ip":
            return q @ vecs.T
        d2 = (q * q).sum(1)[:, None] - 2 * q @ vecs.T + (vecs * vecs).sum(1)[None, :]
        return self._similarity(d2)

    def _top(self, keys: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((keys, -scores))[:k]
        return keys[order], scores[order].astype(np.float32)

    def search_keys(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray, str | None]]:
        """Dense top-``k`` per query: (keys, scores, note or None), best first, over the live documents
        (``allowed``: the sorted keys a filter admits). Queries (Q, D) are normalised like the documents."""
        k = _check_k(k)
        queries = np.atleast_2d(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[-1]} does not match the store's {self.dim}")
        q = _as_float32(queries, self.config.normalize)
        if not np.isfinite(q).all():
            raise ValueError("query vectors must be finite (no NaN/inf)")
        available = self.count if allowed is None else len(allowed)
        want = min(k, available)
        if want == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32), None) for _ in q]
        if allowed is not None and len(allowed) <= self.config.exact_limit and (
                self._vectors is not None or self._reconstructs):
            scores = self._exact_scores(q, self.vectors_of(allowed))
            return [(*self._top(allowed, s, want), None) for s in scores]
        fetch = min(want * max(1, self.config.rescore), self.index.ntotal)
        if allowed is None and not len(self.tombstones):
            fast = self._unfiltered(q, want, fetch)
            if fast is not None:
                return fast
        cands = self._ann(q, want, fetch, allowed)
        out = []
        for i, (keys, scores) in enumerate(cands):
            if self.config.rescore and len(keys):
                scores = self._exact_scores(q[i : i + 1], self.vectors_of(keys))[0]
            keys, scores = self._top(keys, scores, want)
            note = None if len(keys) >= want else (
                f"the approximate index found {len(keys)} of the {available} matching documents even at its "
                "largest search effort")
            out.append((keys, scores, note))
        return out

    def _unfiltered(self, q: np.ndarray, want: int, fetch: int) -> list | None:
        """The common case, vectorised over queries: no filter, no tombstones, and the index returns full
        lists (else None: the general path takes over). Rescoring runs in blocks of queries."""
        if self._torch is not None:
            return self._torch_search(q, want)
        d, ids = self.index.search(q, int(fetch))
        if (ids < 0).any():
            return None
        scores = self._similarity(d)
        if self.config.rescore:
            exact = self._rescore(q, ids)
            order = np.argsort(-exact, axis=1, kind="stable")
            ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(exact, order, 1)
        ids, scores = ids[:, :want], scores[:, :want].astype(np.float32, copy=False)
        return [(ids[i], scores[i], None) for i in range(len(q))]

    def _rescore(self, q: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Exact scores (Q, F) of each query against the vectors of its candidate ``keys`` (Q, F).

        With the float vectors kept (a memory map in key order), FAISS's by-index kernels compute them in
        place over all cores, reading only the candidates' rows: this is what ``IndexRefineFlat`` does, with
        the vectors on disk instead of in memory. A store without them (its vectors file lost) decodes the
        candidates from the index instead, in blocks."""
        vectors = self._vectors  # float32, C-contiguous: a memory map of vectors.f32
        if vectors is not None:
            faiss = _faiss()
            q = np.ascontiguousarray(q, dtype=np.float32)
            rows = np.ascontiguousarray(np.searchsorted(self._vkeys, keys), dtype=np.int64)
            out = np.empty(keys.shape, dtype=np.float32)
            kernel = faiss.fvec_inner_products_by_idx if self.config.metric == "ip" else faiss.fvec_L2sqr_by_idx
            kernel(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vectors), faiss.swig_ptr(rows),
                   self.dim, keys.shape[0], keys.shape[1])
            return self._similarity(out)
        fetch = keys.shape[1]
        out = np.empty(keys.shape, dtype=np.float32)
        block = max(1, 2**24 // max(1, fetch * self.dim))  # ~64 MB of gathered vectors at a time
        for a in range(0, len(q), block):
            vecs = self.vectors_of(keys[a : a + block].reshape(-1)).reshape(-1, fetch, self.dim)
            if self.config.metric == "ip":
                out[a : a + block] = np.einsum("qd,qkd->qk", q[a : a + block], vecs)
            else:
                out[a : a + block] = self._similarity(((vecs - q[a : a + block, None, :]) ** 2).sum(-1))
        return out

    def _torch_search(self, q: np.ndarray, want: int, block: int = 1024) -> list:
        import torch

        keys, x = self._torch
        out = []
        for a in range(0, len(q), block):
            qt = torch.from_numpy(q[a : a + block]).to(x.device)
            scores, rows = torch.topk(qt @ x.T, want, dim=1)
            scores, rows = scores.cpu().numpy(), rows.cpu().numpy()
            out.extend((keys[rows[i]], scores[i], None) for i in range(len(rows)))
        return out

    def _ann(self, q: np.ndarray, want: int, fetch: int, allowed: np.ndarray | None
             ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Candidates from the index: up to ``fetch`` per query, at least ``want`` unless the index runs out.

        Filters and tombstones go in as an IDSelector when the index takes one; otherwise the search
        over-fetches (x4 each round) and drops non-members, up to the whole index. A query still short is
        searched again with a larger nprobe / efSearch (x4 each round, up to every list / vector).
        """
        faiss = _faiss()
        ntotal = self.index.ntotal
        excluded = self.tombstones if len(self.tombstones) else None
        sel = keep = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(allowed)
        elif excluded is not None:
            keep = faiss.IDSelectorBatch(excluded)
            sel = faiss.IDSelectorNot(keep)
        in_index = sel is not None and self._takes_selector
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(q)
        pending = np.arange(len(q))
        k_search, effort, top_effort = fetch, 1, max_effort(self.index, ntotal)
        if sel is not None and not in_index:
            k_search = min(ntotal, fetch * 4 if allowed is None else max(fetch * 4, fetch * ntotal // max(1, len(allowed))))
        while len(pending):
            # parameters only when needed: some indexes (LSH) refuse any
            params = search_params(self.index, sel if in_index else None, effort) if in_index or effort > 1 else None
            d, ids = self.index.search(q[pending], int(k_search), params=params)
            still = []
            for row, qi in enumerate(pending):
                ok = ids[row] >= 0
                if sel is not None and not in_index:
                    member = np.isin(ids[row], allowed) if allowed is not None else ~np.isin(ids[row], excluded)
                    ok &= member
                keys, scores = ids[row][ok][:fetch], self._similarity(d[row][ok][:fetch])
                if len(keys) >= want or (k_search >= ntotal and effort >= top_effort):
                    results[qi] = (keys, scores)
                else:
                    still.append(qi)
                    results[qi] = (keys, scores)
            pending = np.asarray(still, dtype=np.int64)
            if not len(pending):
                break
            if k_search < ntotal and not in_index:
                k_search = min(ntotal, k_search * 4)
            elif effort < top_effort:
                effort = min(top_effort, effort * 4)
            else:
                break
        del keep, sel  # the selectors must outlive every search that used them
        return results  # type: ignore[return-value]

    def search(self, queries: np.ndarray, k: int = 10, where: str | None = None, with_text: bool = True
               ) -> list[SearchResult]:
        """Dense search with query vectors (Q, D) or (D,)."""
        allowed = self.allowed_keys(where)
        runs = self.search_keys(queries, k, allowed)
        available = self.count if allowed is None else len(allowed)
        return [self._result(keys, scores, k, available, "dense", note, with_text) for keys, scores, note in runs]

    def _result(self, keys, scores, k, available, mode, note, with_text) -> SearchResult:
        rows = self._rows(keys) if len(keys) else {}
        hits = []
        for key, score in zip(keys.tolist(), scores.tolist(), strict=True):
            row = rows.get(key)
            if row is None:  # cannot happen with a consistent store; never return a hit without its document
                raise RuntimeError(f"{self.path}: key {key} is in the index but not in the documents")
            hits.append(Hit(row[1], key, float(score), row[2], row[3] if with_text else None,
                            json.loads(row[4]), row[5], row[6]))
        complete = len(hits) >= min(k, available)
        if complete:
            note = None
        return SearchResult(hits, k, available, complete, mode, note)

    # -- text search -----------------------------------------------------------------------------------------

    def search_texts(self, queries: Sequence[str], k: int = 10, where: str | None = None, mode: str | None = None,
                     encoder=None, embeddings: np.ndarray | None = None, with_text: bool = True,
                     candidates: int = 100) -> list[SearchResult]:
        """Search with query strings: ``mode`` dense | lexical | hybrid (None: the store's default, see
        ``index info``). ``embeddings`` (Q, D) skips encoding (the server batches queries itself)."""
        k = _check_k(k)
        mode = mode or self.fusion.mode
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
        if mode != "dense" and self.lexical is None:
            raise ValueError(f"{self.path}: built without a lexical index (lexical: false); use --mode dense")
        queries = list(queries)
        if not queries:
            return []
        if any(not isinstance(t, str) for t in queries):
            raise ValueError("queries must be strings")
        allowed = self.allowed_keys(where)
        available = self.count if allowed is None else len(allowed)
        want = min(k, available)
        if mode != "lexical" and embeddings is None:
            embeddings = (encoder or self.encoder()).encode(queries, prompt_name="query")
        n_cand = max(want, candidates) if mode == "hybrid" else want
        dense = self.search_keys(embeddings, max(1, n_cand), allowed) if mode != "lexical" else None
        lex = self.lexical.search(queries, max(1, n_cand), allowed) if mode != "dense" else None
        out = []
        for i in range(len(queries)):
            if mode == "dense":
                keys, scores, note = dense[i]
            elif mode == "lexical":
                keys, scores = lex[i]
                note = f"only {len(keys)} matching documents share a term with the query"
            else:
                keys, scores = fuse(dense[i][:2], lex[i], self.fusion.method, self.fusion.weight, want,
                                    self.fusion.rrf_k)
                note = dense[i][2]
            out.append(self._result(keys[:want], scores[:want], k, available, mode, note, with_text))
        return out

    def encoder(self, model: str | Path | None = None, force: bool = False, device: str = "auto"):
        """The :class:`~mosaic_embed.encode.Encoder` that made the store's vectors, opened with the settings
        its manifest records (``max_seq_len``, precision), so queries are embedded exactly as the documents.

        ``model`` replaces the recorded folder (moved or copied); its identity (weights and configuration
        hash) must match the recorded one unless ``force``.
        """
        if self._encoder is not None and model is None:
            return self._encoder
        encoder = open_encoder(self.manifest.get("encoder"), self.path, model, force, device)
        self._encoder = encoder
        return encoder


def open_encoder(info: dict | None, store: Path, model: str | Path | None = None, force: bool = False,
                 device: str = "auto"):
    """Open the encoder a store's manifest describes (``info``), checking the identity of ``model`` if given."""
    from ..config import EncodeConfig
    from ..encode import Encoder

    info = info or {}
    path = model or info.get("path")
    if not path:
        raise ValueError(f"{store}: the manifest names no encoder; pass --model ENCODER")
    if not Path(path).exists():
        raise FileNotFoundError(f"{store}: its encoder {path} is gone; pass --model with a copy of it")
    settings = EncodeConfig(max_seq_len=info.get("max_seq_len"), precision=info.get("precision", "auto"),
                            truncate_dim=info.get("truncate_dim"), device=device)
    encoder = Encoder.load(path, settings)
    recorded = info.get("identity")
    if recorded and not force and encoder.describe()["identity"] != recorded:
        raise ValueError(
            f"{path} is not the encoder that built {store} (weights or configuration differ from the "
            "recorded hash): its queries would not match the stored vectors; use the original encoder, "
            "rebuild the store, or pass --force"
        )
    return encoder


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


class StoreWriter:
    """One transaction on a store: stage additions and deletions, then :meth:`_commit` publishes them.

    Use through :func:`open_writer`. Added vectors are staged on disk (``staging.f32`` in the temporary
    generation), so a build never holds all vectors in memory; the index is trained (IVF, PQ) on a seeded
    sample of them and filled block by block at commit.
    """

    def __init__(self, root: Path, tmp: Path, manifest: dict | None, cfg: IndexConfig | None):
        faiss = _faiss()
        self.root, self.tmp, self.base = root, tmp, manifest
        self.t0 = time.perf_counter()
        self.removed: set[int] = set()
        self.n_added = 0
        self.force_compact = False
        self.fusion = Fusion.from_manifest(manifest.get("fusion")) if manifest else Fusion()
        self.encoder_info = manifest.get("encoder") if manifest else None
        self.source = dict(manifest.get("inputs") or {}) if manifest else {}
        if manifest is not None:
            gen = root / manifest["generation"]
            self.cfg = from_dict(IndexConfig, manifest["config"], source=str(root / "manifest.json"))
            shutil.copyfile(gen / DOCS_DB, tmp / DOCS_DB)
            self.index = faiss.read_index(str(gen / INDEX_FILE))
            self.dim = self.index.d
            self.next_id = int(manifest["outputs"]["next_id"])
            self.db = sqlite3.connect(tmp / DOCS_DB)
            if (gen / VECTORS).is_file():
                shutil.copyfile(gen / VECTORS, tmp / VECTORS)
                shutil.copyfile(gen / VECTOR_KEYS, tmp / VECTOR_KEYS)
        else:
            if cfg is None:
                raise ValueError("a new store needs an IndexConfig")
            self.cfg = cfg
            self.index = None
            self.dim = None
            self.next_id = 0
            self.db = sqlite3.connect(tmp / DOCS_DB)
            self.db.executescript(SCHEMA)
        self.staged_keys: list[np.ndarray] = []
        self._staging = None

    # -- changes -----------------------------------------------------------------------------------------------

    def set_encoder(self, info: dict | None) -> None:
        """Record the encoder of the vectors; adding vectors of another encoder to a store is refused."""
        if not info:
            return
        mine = self.encoder_info
        if mine and mine.get("identity") and info.get("identity") and mine["identity"] != info["identity"]:
            raise ValueError(f"{self.root}: these vectors come from another encoder ({info.get('path')}) than the "
                             f"store's ({mine.get('path')}); rebuild the store to change encoders")
        if mine and mine.get("max_seq_len") != info.get("max_seq_len"):
            raise ValueError(f"{self.root}: these vectors were embedded at max_seq_len {info.get('max_seq_len')}, "
                             f"the store's at {mine.get('max_seq_len')}")
        self.encoder_info = mine or info

    def add(self, vectors: np.ndarray, docs: Sequence[Doc]) -> np.ndarray:
        """Stage ``docs`` with their vectors (n, D); returns their new keys. A document id + chunk already live
        in the store (or staged) is an error (use upsert)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(docs):
            raise ValueError(f"{len(docs)} documents for vectors of shape {tuple(vectors.shape)}")
        if not len(docs):
            return np.zeros(0, np.int64)
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} for a store of dimension {self.dim}")
        block = _as_float32(vectors, self.cfg.normalize)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise ValueError(f"the vector of document {docs[bad].doc_id!r} (chunk {docs[bad].chunk}) is not "
                             "finite (NaN/inf): refusing to index it")
        keys = np.arange(self.next_id, self.next_id + len(docs), dtype=np.int64)
        tokens = tokenize([d.text or "" for d in docs]) if self.cfg.lexical else [[] for _ in docs]
        rows = []
        for key, d, toks in zip(keys.tolist(), docs, tokens, strict=True):
            if not isinstance(d.doc_id, str) or not d.doc_id:
                raise ValueError(f"document id {d.doc_id!r}: must be a non-empty string")
            if not isinstance(d.metadata, dict):
                raise ValueError(f"document {d.doc_id!r}: metadata must be a JSON object, got {type(d.metadata).__name__}")
            try:
                meta = json.dumps(d.metadata, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"document {d.doc_id!r}: metadata is not plain JSON ({err})") from None
            rows.append((key, d.doc_id, int(d.chunk), d.text, meta,
                         d.start, d.end, join_tokens(toks)))
        try:
            self.db.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            dup = self._first_duplicate([(d.doc_id, d.chunk) for d in docs])
            raise ValueError(f"document {dup[0]!r} (chunk {dup[1]}) is already in the store or given twice; "
                             "use upsert to replace documents") from None
        if self._staging is None:
            self._staging = open(self.tmp / STAGING, "wb")
        self._staging.write(block.tobytes())
        self.staged_keys.append(keys)
        self.next_id += len(docs)
        self.n_added += len(docs)
        return keys

    def _first_duplicate(self, pairs: list[tuple[str, int]]) -> tuple[str, int]:
        seen = set()
        for doc_id, chunk in pairs:
            if (doc_id, chunk) in seen:
                return doc_id, chunk
            seen.add((doc_id, chunk))
            if self.db.execute("SELECT 1 FROM documents WHERE doc_id = ? AND chunk = ?", (doc_id, chunk)).fetchone():
                return doc_id, chunk
        return pairs[0]

    def delete(self, doc_ids: Sequence[str] | None = None, where: str | None = None) -> int:
        """Remove every chunk of ``doc_ids`` and/or every document ``where`` admits; returns the chunks removed."""
        keys: list[int] = []
        if doc_ids:
            ids = [str(d) for d in doc_ids]
            for start in range(0, len(ids), 900):
                part = ids[start : start + 900]
                q = f"SELECT id FROM documents WHERE doc_id IN ({','.join('?' * len(part))})"
                keys.extend(r[0] for r in self.db.execute(q, part))
        if where is not None:
            w = parse_where(where)
            keys.extend(r[0] for r in self.db.execute(f"SELECT id FROM documents WHERE {w.sql}", w.params))
        keys = sorted(set(keys))
        for start in range(0, len(keys), 900):
            part = keys[start : start + 900]
            self.db.execute(f"DELETE FROM documents WHERE id IN ({','.join('?' * len(part))})", part)
        self.removed.update(keys)
        return len(keys)

    def upsert(self, vectors: np.ndarray, docs: Sequence[Doc]) -> np.ndarray:
        """Replace every chunk of the documents in ``docs`` (new ones are simply added)."""
        self.delete(doc_ids=sorted({d.doc_id for d in docs}))
        return self.add(vectors, docs)

    def start_from(self, trained) -> None:
        """Reuse a trained index's quantizers (an emptied copy): shards of one corpus share them, so their
        inverted lists can be merged."""
        faiss = _faiss()
        if self.index is not None or self.n_added:
            raise ValueError("start_from: only a new, empty store can take a trained index")
        if not trained.is_trained:
            raise ValueError("start_from: the index is not trained")
        self.index = faiss.clone_index(trained)
        self.index.reset()
        self.dim = self.index.d

    def compact(self) -> None:
        """Rebuild the index without tombstones at commit."""
        self.force_compact = True

    # -- commit ------------------------------------------------------------------------------------------------

    def _staged(self) -> tuple[np.ndarray, np.ndarray]:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        keys = np.concatenate(self.staged_keys) if self.staged_keys else np.zeros(0, np.int64)
        if not len(keys):
            return keys, np.zeros((0, self.dim or 0), np.float32)
        return keys, np.memmap(self.tmp / STAGING, dtype=np.float32, mode="r", shape=(len(keys), self.dim))

    def _train(self, staged: np.ndarray) -> None:
        rng = np.random.default_rng(self.cfg.seed)
        n = len(staged)
        rows = np.sort(rng.choice(n, size=min(n, self.cfg.train_size), replace=False))
        try:
            self.index.train(np.ascontiguousarray(staged[rows]))
        except RuntimeError as err:
            raise ValueError(
                f"training index '{self.cfg.factory}' on {len(rows)} vectors failed ({str(err).splitlines()[-1]}); "
                "IVF needs at least as many vectors as lists (ideally 39x): use fewer lists or more data"
            ) from None

    def _live_vectors_blocks(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Vectors of existing ``keys`` in blocks, from the kept float vectors or decoded from the index."""
        vec_path = self.tmp / VECTORS
        if vec_path.is_file():
            vkeys = np.fromfile(self.tmp / VECTOR_KEYS, dtype=np.int64)
            vectors = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(len(vkeys), self.dim))
        for start in range(0, len(keys), self.cfg.add_batch_size):
            part = keys[start : start + self.cfg.add_batch_size]
            if vec_path.is_file():
                yield part, np.asarray(vectors[np.searchsorted(vkeys, part)])
            else:
                yield part, self.index.reconstruct_batch(part)

    def _commit(self) -> dict:
        faiss = _faiss()
        staged_keys, staged = self._staged()
        if self.dim is None:
            raise ValueError("nothing to store: no documents were given")
        if self.index is None:
            self.index = new_index(self.dim, self.cfg)
            if not self.index.is_trained:
                if not len(staged):
                    raise ValueError(f"index '{self.cfg.factory}' needs training vectors; build it with documents")
                self._train(staged)
        t_train = time.perf_counter() - self.t0
        removable = can_remove(self.index)
        old_tomb = {r[0] for r in self.db.execute("SELECT id FROM tombstones")}
        removed = np.asarray(sorted(self.removed), dtype=np.int64)
        existing_removed = removed[removed < self.next_id - self.n_added]  # keys already in the index
        if len(existing_removed):
            if removable:
                self.index.remove_ids(faiss.IDSelectorBatch(existing_removed))
            else:
                self.db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?)",
                                    [(int(k),) for k in existing_removed])
        n_tomb = len(old_tomb) + (0 if removable else len(existing_removed))
        if n_tomb and (self.force_compact or n_tomb > self.cfg.compact_fraction * max(1, self.index.ntotal)):
            self._rebuild_index()
        keep = ~np.isin(staged_keys, removed)  # staged and deleted again in this transaction
        for start in range(0, len(staged_keys), self.cfg.add_batch_size):
            sl = slice(start, start + self.cfg.add_batch_size)
            part_keys, part_keep = staged_keys[sl], keep[sl]
            if part_keep.any():
                self.index.add_with_ids(np.ascontiguousarray(staged[sl][part_keep]), part_keys[part_keep])
        t_add = time.perf_counter() - self.t0 - t_train
        if self.cfg.rescore:
            self._write_vectors(staged_keys[keep], staged, keep)
        del staged
        (self.tmp / STAGING).unlink(missing_ok=True)
        faiss.write_index(self.index, str(self.tmp / INDEX_FILE))
        lexical_s = 0.0
        if self.cfg.lexical:
            t = time.perf_counter()
            rows = self.db.execute("SELECT id, tokens FROM documents ORDER BY id").fetchall()
            Lexical.build(np.asarray([r[0] for r in rows], np.int64), (r[1] for r in rows)).save(
                self.tmp / LEXICAL_DIR)
            lexical_s = time.perf_counter() - t
        count = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        documents = self.db.execute("SELECT count(DISTINCT doc_id) FROM documents").fetchone()[0]
        tombstones = self.db.execute("SELECT count(*) FROM tombstones").fetchone()[0]
        has_texts = self.db.execute("SELECT count(*) FROM documents WHERE text IS NOT NULL").fetchone()[0] > 0
        self.db.commit()
        self.db.close()
        if self.index.ntotal != count + tombstones:  # the invariant every search relies on
            raise RuntimeError(f"internal error: index holds {self.index.ntotal} vectors for {count} documents "
                               f"and {tombstones} tombstones; nothing was published")
        return {
            "count": int(count), "documents": int(documents), "dim": int(self.dim), "tombstones": int(tombstones),
            "next_id": int(self.next_id), "index_type": type(base_index(self.index)).__name__,
            "factory": self.cfg.factory, "metric": self.cfg.metric, "lexical": self.cfg.lexical,
            "has_texts": bool(has_texts), "added": int(keep.sum()), "removed": len(self.removed),
            "timings": {"train_s": t_train, "add_s": t_add, "lexical_s": lexical_s,
                        "total_s": time.perf_counter() - self.t0},
        }

    def _rebuild_index(self) -> None:
        """A fresh index of the live documents' vectors (drops tombstones); trained quantizers are kept."""
        faiss = _faiss()
        live = np.asarray([r[0] for r in self.db.execute("SELECT id FROM documents ORDER BY id")], np.int64)
        live = live[np.isin(live, np.asarray(sorted(self.removed), np.int64), invert=True)] if self.removed else live
        # staged keys are not in the index yet: they are added after the rebuild
        in_index = live[live < (self.next_id - self.n_added)]
        fresh = new_index(self.dim, self.cfg)
        if not fresh.is_trained:
            fresh = faiss.clone_index(self.index)
            fresh.reset()
        for part, vecs in self._live_vectors_blocks(in_index):
            fresh.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), part)
        self.index = fresh
        self.db.execute("DELETE FROM tombstones")

    def _write_vectors(self, new_keys: np.ndarray, staged: np.ndarray, keep: np.ndarray) -> None:
        """The float vectors kept for rescoring, in key order: the old ones minus removed keys, then the new."""
        vec_path, key_path = self.tmp / VECTORS, self.tmp / VECTOR_KEYS
        old_keys = np.fromfile(key_path, dtype=np.int64) if key_path.is_file() else np.zeros(0, np.int64)
        removed = np.asarray(sorted(self.removed), np.int64)
        with open(self.tmp / (VECTORS + ".new"), "wb") as f:
            if len(old_keys):
                old = np.memmap(vec_path, dtype=np.float32, mode="r", shape=(len(old_keys), self.dim))
                for start in range(0, len(old_keys), self.cfg.add_batch_size):
                    ks = old_keys[start : start + self.cfg.add_batch_size]
                    f.write(np.ascontiguousarray(old[start : start + len(ks)][~np.isin(ks, removed)]).tobytes())
                del old
            for start in range(0, len(keep), self.cfg.add_batch_size):
                sl = slice(start, start + self.cfg.add_batch_size)
                f.write(np.ascontiguousarray(staged[sl][keep[sl]]).tobytes())
        all_keys = np.concatenate([old_keys[~np.isin(old_keys, removed)], new_keys])
        os.replace(self.tmp / (VECTORS + ".new"), vec_path)
        all_keys.astype(np.int64).tofile(key_path)

    def abort(self) -> None:
        if self._staging is not None:
            self._staging.close()
        with contextlib.suppress(Exception):
            self.db.close()


@contextlib.contextmanager
def open_writer(path: str | Path, cfg: IndexConfig | None = None, fresh: bool = False,
                what: str = "mosaic-embed index", source: dict | None = None) -> Iterator[StoreWriter]:
    """A transaction on the store at ``path`` (see the module docstring for the protocol).

    ``fresh``: start from an empty store (``build``), replacing the current contents at commit; needs ``cfg``.
    Otherwise the store must exist and its own config is used. On any error nothing is published, the
    temporary generation is removed, and a store folder this call created is removed again.
    """
    root = Path(path)
    created = not root.exists()
    if not created and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder")
    with writer_lock(root, what):
        try:
            manifest = read_manifest(root, expect_stage=STAGE) if (root / "manifest.json").is_file() else None
            if manifest is not None and "generation" not in manifest:
                raise ValueError(f"{root}: a store of the old single-folder layout; build into a new folder")
            if manifest is None and not fresh:
                raise FileNotFoundError(f"{root}: no store here (manifest.json missing); create it with "
                                        "`mosaic-embed index build`")
            if manifest is None and not created and any(p.name != ".writer.lock" and not TMP_RE.match(p.name)
                                                        and not is_temporary(p.name, MANIFEST)
                                                        and not GEN_RE.match(p.name) for p in root.iterdir()):
                raise FileExistsError(f"{root}: a folder with other files in it; build the store into a new folder")
            _clean_dead_writers(root, manifest)
            number = _generation_number(manifest.get("generation") if manifest else None) + 1
            tmp = Path(tempfile.mkdtemp(prefix=f".gen-{number:08d}.", suffix=".tmp", dir=root))
            writer = None
            try:
                writer = StoreWriter(root, tmp, None if fresh else manifest, cfg)
                if fresh and manifest is not None:  # a rebuild keeps the tuned fusion and the id sequence
                    writer.fusion = Fusion.from_manifest(manifest.get("fusion"))
                    writer.next_id = int(manifest["outputs"]["next_id"])
                if source:
                    writer.source = source
                yield writer
                outputs = writer._commit()
                _fsync_tree(tmp)
                final = root / f"gen-{number:08d}"
                os.replace(tmp, final)
                timings = outputs.pop("timings")
                write_manifest(root, STAGE, writer.cfg, inputs=writer.source, outputs=outputs, timings=timings,
                               generation=final.name,
                               previous_generation=manifest.get("generation") if manifest else None,
                               encoder=writer.encoder_info, fusion=writer.fusion.to_dict())
            except BaseException:
                if writer is not None:
                    writer.abort()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # the generation before the previous one: no reader can be about to open it any more
            if manifest and manifest.get("previous_generation"):
                shutil.rmtree(root / manifest["previous_generation"], ignore_errors=True)
        except BaseException:
            if created and not (root / "manifest.json").is_file():
                shutil.rmtree(root, ignore_errors=True)
            raise


def set_fusion(path: str | Path, fusion: Fusion) -> None:
    """Record tuned fusion settings in the manifest (atomically, under the writer lock; same generation)."""
    from ..artifacts import atomic_write_json

    root = Path(path)
    with writer_lock(root, "mosaic-embed index tune"):
        manifest = read_manifest(root, expect_stage=STAGE)
        manifest["fusion"] = fusion.to_dict()
        atomic_write_json(root / "manifest.json", manifest)
