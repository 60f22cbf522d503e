"""``make demo`` / ``mosaic-embed demo``: the pipeline's stages, one after another, on the bundled sample corpus.

Each stage is a plain function call on the previous stage's output, with a tiny recipe, so the whole demo
runs on a laptop CPU. Stages are appended here as they are built (data -> pretrain -> GLUE -> encoder ->
index); each writes its own folder under ``out``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import read_manifest
from .config import DataConfig
from .data.corpus import bundled_corpus_path


def run_demo(out: str | Path = "runs/demo", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage that exists on the bundled corpus into ``out``; returns each stage's output folder."""
    from .data.shards import format_shards_summary, prepare_shards

    out = Path(out)
    results: dict[str, Any] = {}

    # 1. data: bundled Moby-Dick -> bert-base-uncased token shards (reused while the inputs are unchanged).
    log("== data: corpus -> token shards")
    # DataConfig() is recipes/data/default.yaml (a test checks they agree).
    data_cfg = DataConfig(out=out / "shards")
    results["shards"] = prepare_shards(data_cfg, log=log)
    log(format_shards_summary(read_manifest(results["shards"], expect_stage="data")))

    # 2. pretrain: a tiny MosaicBERT (recipes/pretrain/tiny.yaml) on those shards, fp32 on CPU, ~1 minute.
    from .config import PretrainConfig, load_config
    from .train.pretrain import latest_checkpoint, pretrain

    log("== pretrain: MLM on the shards -> a backbone in pretrain/final")
    pre_dir = out / "pretrain"
    pre_cfg = load_config(PretrainConfig, "tiny", out=pre_dir, data={"out": out / "shards"})
    if (pre_dir / "final" / "manifest.json").is_file():
        log(f"reusing {pre_dir / 'final'} (delete it to pretrain again)")
    else:  # a demo interrupted mid-way continues from its last checkpoint
        pretrain(pre_cfg, resume=latest_checkpoint(pre_dir) is not None)
    final = read_manifest(pre_dir / "final", expect_stage="pretrain")
    log(f"pretrained {final['outputs']['parameters']:,} parameters on {final['tokens_seen']:,} tokens in "
        f"{final['timings']['wall_clock_s']:.0f} s; validation MLM loss {final['final_eval']['eval_loss']:.3f}, "
        f"accuracy {final['final_eval']['eval_accuracy']:.3f}")
    results["pretrain"] = pre_dir / "final"

    # 3. sentence encoder: contrastive training on pairs mined from the corpus itself (no labels needed).
    from .config import ContrastiveConfig
    from .train.contrastive import train_encoder

    log("== train-encoder: pairs mined from the corpus -> a sentence-transformers model in encoder/")
    enc_dir = out / "encoder"
    enc_cfg = load_config(ContrastiveConfig, "tiny", model=str(pre_dir / "final"), pairs="auto",
                          corpus=str(bundled_corpus_path()), out=enc_dir, max_steps=20, batch_size=16, max_pairs=2000)
    results["encoder"] = train_encoder(enc_cfg)

    # 4. embeddings of ~100-word passages of the corpus, then 5. a FAISS store over them, then 6. search.
    from .config import EmbedConfig, EncodeConfig, IndexConfig
    from .encode import embed_file
    from .index.ingest import build_from_embeddings
    from .index.store import VectorStore

    log("== embed: corpus passages -> embeddings/ (memory-mapped .npy + ids)")
    passages = write_passages(bundled_corpus_path(), out / "passages.jsonl")
    # The encoder was just retrained: embeddings of an earlier demo are stale (embed_file would refuse them).
    shutil.rmtree(out / "embeddings", ignore_errors=True)
    # 128 tokens at embedding time although the encoder trained on 32: ALiBi extrapolates, nothing to resize.
    embed_cfg = EmbedConfig(model=results["encoder"], input=passages, out=out / "embeddings",
                            encode=EncodeConfig(max_seq_len=128))
    results["embeddings"] = embed_file(embed_cfg, show_progress=False)
    log("== index build: embeddings -> store/ (exact inner-product search)")
    results["store"] = build_from_embeddings(results["embeddings"], out / "store", IndexConfig())
    store = VectorStore(results["store"])
    log(f"{len(store)} passages indexed; searching with the encoder the store was built from:")
    for query, result in zip(DEMO_QUERIES, store.search_texts(DEMO_QUERIES, k=3), strict=True):
        log(f"  query: {query}")
        for h in result.hits:
            log(f"    {h.score:.3f}  {h.id}  {h.text[:90]!r}")
    log("A tiny model trained for a minute on one book: the hits show the pipeline working, not a good encoder.")
    return results


DEMO_QUERIES = ["the white whale", "Queequeg and his harpoon"]


def write_passages(corpus: Path, out: Path, words: int = 100) -> Path:
    """Cut a corpus into passages of about ``words`` words (paragraphs kept whole), as JSON lines.

    Passages repeated verbatim (a corpus can hold a text twice, e.g. an excerpt inside a collection) are kept
    once, so a search does not return the same text twice.
    """
    import json

    from .artifacts import atomic_write_text
    from .data.corpus import iter_documents

    lines, seen = [], set()

    def emit(doc: int, chunk: list[str]) -> None:
        text = " ".join(chunk)
        if text not in seen:
            seen.add(text)
            lines.append({"_id": f"doc{doc}-p{len(lines)}", "text": text})

    for d, doc in enumerate(iter_documents(corpus)):
        chunk: list[str] = []
        for para in doc.split("\n\n"):
            chunk.extend(para.split())
            if len(chunk) >= words:
                emit(d, chunk)
                chunk = []
        if chunk:
            emit(d, chunk)
    atomic_write_text(out, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return out


def write_chapter_retrieval_set(corpus: Path, out: Path, chapters: int = 30, words: int = 100) -> Path:
    """A small labelled retrieval set made mechanically from a book: query = a chapter's title, relevant =
    every passage of that chapter (the heading line itself left out of the passages), in the BEIR layout.

    From the bundled Moby-Dick (public domain) with the first ``chapters`` chapters: a few hundred passages,
    small enough to embed on a laptop CPU in seconds, labelled without anyone's judgement.
    """
    import json
    import re

    from .artifacts import atomic_write_text
    from .data.corpus import iter_documents

    heading = re.compile(r"^CHAPTER (\d+)\.\s+(.+?)\s*$")
    found: dict[int, tuple[str, str]] = {}
    for doc in iter_documents(corpus):
        first, _, body = doc.partition("\n")
        m = heading.match(first.strip())
        if m and body.strip():
            found[int(m.group(1))] = (m.group(2).rstrip("."), body)
    if not found:
        raise ValueError(f"{corpus}: no 'CHAPTER N. Title' headings to build a retrieval set from")
    docs, queries, qrels = [], [], []
    for number in sorted(found)[:chapters]:
        title, body = found[number]
        queries.append({"_id": f"q{number}", "text": title})
        chunk: list[str] = []
        paragraphs = [p.split() for p in body.split("\n\n") if p.strip()]
        for i, para in enumerate(paragraphs):
            chunk.extend(para)
            if len(chunk) >= words or i == len(paragraphs) - 1:
                did = f"c{number}-p{len(docs)}"
                docs.append({"_id": did, "title": "", "text": " ".join(chunk)})
                qrels.append(f"q{number}\t{did}\t1")
                chunk = []
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "corpus.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    atomic_write_text(out / "queries.jsonl", "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries))
    atomic_write_text(out / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return out
