"""Retrieval evaluation: nDCG@k, recall@k and MRR@k over a BEIR split, with exact (brute-force) search.

Metric definitions follow trec_eval / pytrec_eval, which BEIR reports (Thakur et al., 2021):

- nDCG@k: DCG = sum_{i<k} rel_i / log2(i + 2) over the ranked list (linear gain, as trec_eval's
  ``ndcg_cut``), divided by the DCG of the ideal ordering of that query's judged documents;
- recall@k: |relevant in top k| / |relevant| (relevant = qrel score > 0);
- MRR@k: 1 / rank of the first relevant document within the top k, else 0.

Each metric is averaged over the queries that have at least one relevant document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EncodeConfig


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    dcg = sum(qrels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if qrels.get(doc, 0) > 0)
    ideal = sorted((s for s in qrels.values() if s > 0), reverse=True)[:k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    relevant = {d for d, s in qrels.items() if s > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    for i, doc in enumerate(ranked[:k]):
        if qrels.get(doc, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_run(
    run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Mean nDCG@10, recall@10, recall@100 and MRR@10 of ``run`` (query id -> ranked doc ids).

    A judged query missing from ``run`` counts as an empty ranking (scores 0), never silently skipped.
    """
    scored = [qid for qid, docs in qrels.items() if any(s > 0 for s in docs.values())]
    if not scored:
        raise ValueError("no query has a relevant document in the qrels")
    sums = {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for qid in scored:
        ranked, rel = run.get(qid, ()), qrels[qid]
        sums["ndcg@10"] += ndcg_at_k(ranked, rel, 10)
        sums["recall@10"] += recall_at_k(ranked, rel, 10)
        sums["recall@100"] += recall_at_k(ranked, rel, 100)
        sums["mrr@10"] += mrr_at_k(ranked, rel, 10)
    return {name: value / len(scored) for name, value in sums.items()}


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int, device: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search, exact (cosine when rows are normalised).

    queries (Q, D), docs (N, D) -> scores (Q, k') float32, indices (Q, k') int64 with k' = min(k, N).
    ``device`` None: FAISS ``IndexFlatIP`` on the CPU, or on the GPU with torch when CUDA is present and FAISS
    has no GPU support (faiss-cpu); "cpu" / "cuda[:N]": torch on that device (:func:`torch_exact_search`).
    """
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"exact_search: shapes {queries.shape} and {docs.shape} do not match")
    if device is None:
        import torch

        if torch.cuda.is_available() and _faiss_gpus() == 0:
            device = "cuda"
    if device is not None:
        return torch_exact_search(queries, docs, k, device)
    import faiss

    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, docs.shape[0]))


def _faiss_gpus() -> int:
    """GPUs FAISS can use here (0 for faiss-cpu, or where FAISS is not installed: torch searches instead)."""
    try:
        import faiss
    except ImportError:
        return 0
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def torch_exact_search(queries: np.ndarray, docs: np.ndarray, k: int, device: str = "cuda",
                       block_docs: int = 262_144, block_queries: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` with torch (fp32 matmuls), docs streamed in blocks from host memory (a
    memmap is fine): GPU memory holds one (block_queries, block_docs) score tile, never the whole corpus.
    Exact ties order by the lower index."""
    import torch

    n, kk = docs.shape[0], min(k, docs.shape[0])
    dev = torch.device(device)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_s = torch.full((len(queries), kk), -float("inf"))
    best_i = torch.zeros((len(queries), kk), dtype=torch.int64)
    for a in range(0, n, block_docs):
        d = torch.from_numpy(np.ascontiguousarray(docs[a : a + block_docs], dtype=np.float32)).to(dev)
        for qa in range(0, len(queries), block_queries):
            q = q_all[qa : qa + block_queries].to(dev)
            s = q @ d.T  # (bq, bd)
            top_s, top_i = torch.topk(s, min(kk, s.shape[1]), dim=1)
            cat_s = torch.cat([best_s[qa : qa + block_queries], top_s.cpu()], dim=1)
            cat_i = torch.cat([best_i[qa : qa + block_queries], top_i.cpu() + a], dim=1)
            # stable order: score descending, then index ascending
            order = np.lexsort((cat_i.numpy(), -cat_s.numpy()), axis=1)[:, :kk]
            best_s[qa : qa + block_queries] = torch.from_numpy(np.take_along_axis(cat_s.numpy(), order, 1))
            best_i[qa : qa + block_queries] = torch.from_numpy(np.take_along_axis(cat_i.numpy(), order, 1))
    return best_s.numpy().astype(np.float32), best_i.numpy()


def rank_with_embeddings(
    query_ids: Sequence[str], query_emb: np.ndarray, doc_ids: Sequence[str], doc_emb: np.ndarray, k: int = 100
) -> dict[str, list[str]]:
    _, idx = exact_search(query_emb, doc_emb, k)
    return {qid: [doc_ids[j] for j in row if j >= 0] for qid, row in zip(query_ids, idx, strict=True)}


def evaluate_encoder(
    model: str | Path | Any,
    beir_dir: str | Path,
    split: str = "test",
    settings: EncodeConfig | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Embed a BEIR split's corpus and queries with one :class:`~mosaic_embed.encode.Encoder` (an encoder
    folder opened with ``settings``, or a loaded one; documents with its "document" prompt, queries with its
    "query" prompt), search exactly, and score. Returns the metrics plus counts, timings and the encoder's
    description."""
    import time

    from ..data.beir import load_beir
    from ..encode import Encoder

    data = load_beir(beir_dir, split)
    encoder = model if isinstance(model, Encoder) else Encoder.load(model, settings)
    doc_ids = list(data.corpus)
    t0 = time.perf_counter()
    doc_emb = encoder.encode([data.doc_text(d) for d in doc_ids], show_progress=show_progress, prompt_name="document")
    t1 = time.perf_counter()
    query_ids = list(data.queries)
    query_emb = encoder.encode([data.queries[q] for q in query_ids], prompt_name="query")
    t2 = time.perf_counter()
    run = rank_with_embeddings(query_ids, query_emb, doc_ids, doc_emb, k=100)
    metrics = evaluate_run(run, data.qrels)
    return {
        **metrics,
        "n_queries": len(query_ids),
        "n_docs": len(doc_ids),
        "max_seq_len": encoder.max_seq_len,
        "encode_docs_s": t1 - t0,
        "encode_queries_s": t2 - t1,
        "path": encoder.path_used,
        "encoder": encoder.describe(),
    }


# ---- through a store: dense / lexical / hybrid side by side, and fusion tuning ---------------------------


def load_eval_queries(beir_dir: str | Path | None = None, split: str = "test", queries_file: str | Path | None = None,
                      qrels_file: str | Path | None = None) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries (id -> text) and qrels of a BEIR split, or of a queries JSON-lines file + a qrels TSV.

    Only queries with a relevant document are kept; a qrel naming an unknown query is an error."""
    from ..data.beir import _find, load_qrels, load_queries

    if beir_dir is not None:
        beir_dir = Path(beir_dir)
        qrels_path = next((beir_dir / "qrels" / n for n in (f"{split}.tsv", f"{split}.tsv.gz")
                           if (beir_dir / "qrels" / n).is_file()), None)
        if qrels_path is None:
            raise FileNotFoundError(f"{beir_dir}: no qrels/{split}.tsv")
        queries, qrels = load_queries(_find(beir_dir, "queries")), load_qrels(qrels_path)
    else:
        if queries_file is None or qrels_file is None:
            raise ValueError("give --queries FILE and --qrels FILE together")
        queries, qrels = load_queries(queries_file), load_qrels(qrels_file)
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise ValueError(f"qrels name query {unknown[0]!r}, which the queries file does not have")
    qrels = {q: d for q, d in qrels.items() if any(s > 0 for s in d.values())}
    if not qrels:
        raise ValueError("no query has a relevant document in the qrels")
    return {q: queries[q] for q in qrels}, qrels


def _doc_ranking(keys: Sequence[int], doc_of: dict[int, str]) -> list[str]:
    """Chunk keys -> document ids, best first, each document once (its best chunk's place)."""
    seen: dict[str, None] = {}
    for key in keys:
        seen.setdefault(doc_of[int(key)], None)
    return list(seen)


def _candidates(store, queries: dict[str, str], device: str, k: int):
    """Per query: dense (keys, scores) and lexical (keys, scores) candidate lists of ``k``, and key -> doc id."""
    texts = list(queries.values())
    dense = []
    if texts:
        emb = store.encoder(device=device).encode(texts, prompt_name="query")
        dense = [(keys, scores) for keys, scores, _ in store.search_keys(emb, min(k, max(1, len(store))))]
    lexical = store.lexical.search(texts, k) if store.lexical is not None else None
    all_keys = {int(x) for d in dense for x in d[0]} | ({int(x) for lx in lexical for x in lx[0]} if lexical else set())
    doc_of = {key: row[1] for key, row in store._rows(sorted(all_keys)).items()}
    return dense, lexical, doc_of


def tune_store(path: str | Path, queries: dict[str, str], qrels: dict[str, dict[str, int]], device: str = "auto",
               k: int = 100):
    """Choose the store's default mode and hybrid fusion by nDCG@10 on validation queries; record them."""
    from .hybrid import tune
    from .store import VectorStore, set_fusion

    store = VectorStore(path)
    if store.lexical is None:
        raise ValueError(f"{path}: no lexical index (built with lexical: false or without texts): nothing to fuse")
    dense, lexical, doc_of = _candidates(store, queries, device, k)
    qids = list(queries)

    def score(runs: list[np.ndarray]) -> float:
        run = {q: _doc_ranking(keys, doc_of) for q, keys in zip(qids, runs, strict=True)}
        return evaluate_run(run, {q: qrels[q] for q in qids})["ndcg@10"]

    fusion = tune(dense, lexical, score, what=f"{len(qids)} queries", k=k)
    set_fusion(path, fusion)
    return fusion


def evaluate_store(path: str | Path, queries: dict[str, str], qrels: dict[str, dict[str, int]], device: str = "auto",
                   k: int = 100) -> dict[str, Any]:
    """nDCG@10, recall@10/100, MRR@10 of every mode through the store (chunks folded into their documents)."""
    from .store import VectorStore

    store = VectorStore(path)
    qids, texts = list(queries), list(queries.values())
    emb = store.encoder(device=device).encode(texts, prompt_name="query")
    modes = ["dense"] + (["lexical", "hybrid"] if store.lexical is not None else [])
    out: dict[str, Any] = {"modes": {}}
    for mode in modes:
        results = store.search_texts(texts, k=min(k, max(1, len(store))), mode=mode, embeddings=emb, with_text=False)
        run = {}
        for q, res in zip(qids, results, strict=True):
            run[q] = list(dict.fromkeys(h.id for h in res.hits))
        out["modes"][mode] = evaluate_run(run, qrels)
    out.update(n_queries=len(qids), chunks=len(store), default_mode=store.fusion.mode,
               fusion=store.fusion.to_dict(), fusion_note=store.fusion.describe(), store=str(Path(path).resolve()))
    return out
