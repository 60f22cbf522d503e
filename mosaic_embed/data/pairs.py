"""Training pairs for contrastive encoders: read them from files, or mine them from a plain corpus.

Sources (``load_pairs`` dispatches on what ``path`` is):

- ``.jsonl`` / ``.jsonl.gz``: ``{"query": ..., "positive": ..., ["negative": ... | "negatives": [...]]}``
  per line (hard negatives from a file: one, or the same number on every line);
- ``.tsv``: ``query <TAB> positive [<TAB> negative ...]`` per line, optional header ``query  positive ...``;
- a BEIR folder: every (query, document) with qrel score > 0 in ``qrels/<split>.tsv`` (default ``train``);
- ``auto`` (``mine_pairs``): pairs mined from a corpus without labels, so a team with only its own text
  can still train an embedder. Strategies from the unsupervised-retrieval literature:
  ``first-sentence`` (a document's opening sentence -> the rest, the "title -> body" signal that news
  and documentation carry), ``spans`` (two disjoint random word spans of one document, the
  independent-cropping view pairs of Contriever, Izacard et al. 2022, arXiv 2112.09118), ``mixed`` (both)
  and ``simcse`` (a passage paired with itself: the two views differ only by dropout, SimCSE, Gao et al.
  2021, arXiv 2104.08821).

With a teacher encoder (any sentence-transformers folder) mined pairs can be filtered (``teacher_filter``:
keep a pair only when the teacher ranks its positive near the top for its query, the round-trip
consistency filter of Alberti et al. 2019 / Dai et al. 2022) and any pairs can get hard negatives
(``add_hard_negatives``: sentence-transformers' ``mine_hard_negatives`` with a relative margin to the
positive's score, NV-Retriever's "TopK-PercPos", Moreira et al. 2024, arXiv 2407.15831).

Pairs come out as a ``datasets.Dataset`` with columns ``anchor``, ``positive`` [, ``negative`` | ``negative_1``
..``negative_n``]: the column order is what sentence-transformers' ranking losses read.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .beir import load_beir
from .corpus import iter_jsonl, iter_tsv


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negatives: tuple[str, ...] = ()


def _text(obj: dict, key: str, path: Path, lineno: int, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"{path}:{lineno}: missing field '{key}'")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{path}:{lineno}: field '{key}' is empty")
    return value


def _negatives(obj: dict, path: Path, lineno: int) -> tuple[str, ...]:
    """``negative`` (one string) or ``negatives`` (a list of strings), not both."""
    if "negatives" in obj:
        if "negative" in obj:
            raise ValueError(f"{path}:{lineno}: give 'negative' or 'negatives', not both")
        values = obj["negatives"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}:{lineno}: field 'negatives' must be a non-empty list of strings")
        return tuple(_text({"negatives": v}, "negatives", path, lineno, True) for v in values)
    one = _text(obj, "negative", path, lineno, False)
    return (one,) if one is not None else ()


def iter_jsonl_pairs(path: str | Path) -> Iterator[Pair]:
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        yield Pair(
            _text(obj, "query", path, lineno, True),
            _text(obj, "positive", path, lineno, True),
            _negatives(obj, path, lineno),
        )


def iter_tsv_pairs(path: str | Path) -> Iterator[Pair]:
    path = Path(path)
    for lineno, parts in iter_tsv(path, lambda head: head[:2] == ["query", "positive"]):
        if len(parts) < 2:
            raise ValueError(
                f"{path}:{lineno}: expected 2 or more tab-separated columns (query, positive[, negative ...]), "
                f"got {len(parts)}"
            )
        if any(not p.strip() for p in parts):
            raise ValueError(f"{path}:{lineno}: empty column")
        yield Pair(parts[0], parts[1], tuple(parts[2:]))


def iter_beir_pairs(folder: str | Path, split: str = "train") -> Iterator[Pair]:
    """(query text, document text) for every qrel with a positive score in ``qrels/<split>.tsv``."""
    data = load_beir(folder, split)
    for qid, docs in data.qrels.items():
        for did, score in docs.items():
            if score > 0:
                yield Pair(data.queries[qid], data.doc_text(did))


def iter_pairs(path: str | Path, beir_split: str = "train") -> Iterator[Pair]:
    """Stream pairs from a ``.jsonl[.gz]``, ``.tsv[.gz]`` file or a BEIR folder."""
    path = Path(path)
    if path.is_dir():
        return iter_beir_pairs(path, beir_split)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return iter_jsonl_pairs(path)
    if name.endswith((".tsv", ".tsv.gz")):
        return iter_tsv_pairs(path)
    raise ValueError(f"{path}: unknown pairs format (expected .jsonl, .jsonl.gz, .tsv or a BEIR folder)")


# ----------------------------------------------------------------------------------------------------------
# mining pairs from an unlabelled corpus
# ----------------------------------------------------------------------------------------------------------

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote: crude, but
# enough to split news and documentation prose without a model.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def mine_pair(text: str, strategy: str, rng: random.Random, min_words: int = 8, max_words: int = 128) -> Pair | None:
    """One training pair from one document, or None if the document is too short for ``strategy``.

    ``first-sentence``: the first sentence (>= 4 words) -> the next up to ``max_words`` words.
    ``spans``: two disjoint spans of ``min_words..max_words`` words; the query span is the shorter one
    (queries are short), taken before or after the document span at random.
    ``simcse``: the document's first ``max_words`` words twice (dropout makes the two views differ).
    """
    if strategy == "simcse":
        words = text.split()
        if len(words) < min_words:
            return None
        passage = " ".join(words[:max_words])
        return Pair(passage, passage)
    if strategy == "first-sentence":
        sentences = split_sentences(text)
        if len(sentences) < 2:
            return None
        first = sentences[0]
        if len(first.split()) < 4:
            return None
        rest = " ".join(" ".join(sentences[1:]).split()[:max_words])
        if len(rest.split()) < min_words:
            return None
        return Pair(first, rest)
    if strategy == "spans":
        words = text.split()
        if len(words) < 3 * min_words:
            return None
        q_len = rng.randint(min_words, max(min_words, min(32, len(words) // 3)))
        d_len = rng.randint(min_words, max(min_words, min(max_words, len(words) - q_len)))
        if q_len + d_len > len(words):
            d_len = len(words) - q_len
        # Place the two spans side by side (in random order) somewhere inside the document: disjoint by
        # construction, and close enough to share a topic.
        start = rng.randint(0, len(words) - q_len - d_len)
        if rng.random() < 0.5:
            q = words[start : start + q_len]
            d = words[start + q_len : start + q_len + d_len]
        else:
            d = words[start : start + d_len]
            q = words[start + d_len : start + d_len + q_len]
        return Pair(" ".join(q), " ".join(d))
    raise ValueError(f"unknown pair-mining strategy {strategy!r} (use 'first-sentence', 'spans' or 'simcse')")


MINING_STRATEGIES = ("first-sentence", "spans", "mixed", "simcse")


def mine_pairs(
    documents: Iterable[str],
    strategy: str = "mixed",
    max_pairs: int | None = None,
    seed: int = 0,
    min_words: int = 8,
    max_words: int = 128,
) -> Iterator[Pair]:
    """Stream pairs mined from ``documents`` (any iterable of strings; never held in memory).

    ``mixed`` tries ``first-sentence`` and falls back to ``spans`` for documents without a usable
    first sentence (and uses ``spans`` for every other document, so both signals are present).
    """
    if strategy not in MINING_STRATEGIES:
        raise ValueError(f"unknown pair-mining strategy {strategy!r}; choose one of {MINING_STRATEGIES}")
    rng = random.Random(seed)
    n = 0
    for i, text in enumerate(documents):
        if max_pairs is not None and n >= max_pairs:
            return
        if strategy == "mixed":
            order = ("first-sentence", "spans") if i % 2 == 0 else ("spans", "first-sentence")
            pair = None
            for s in order:
                pair = mine_pair(text, s, rng, min_words, max_words)
                if pair is not None:
                    break
        else:
            pair = mine_pair(text, strategy, rng, min_words, max_words)
        if pair is not None:
            n += 1
            yield pair


def mine_corpus_pairs(corpus: str | Path, text_field: str = "text", **kwargs) -> Iterator[Pair]:
    """``mine_pairs`` over a corpus file or folder, streamed by the data stage's ``iter_documents``."""
    from .corpus import iter_documents

    return mine_pairs(iter_documents(corpus, text_field=text_field), **kwargs)


def negative_columns(n: int) -> list[str]:
    """Column names of ``n`` hard negatives: ``negative`` for one, ``negative_1..n`` for more (ST's n-tuples)."""
    return ["negative"] if n == 1 else [f"negative_{i + 1}" for i in range(n)]


def pairs_to_dataset(pairs: Iterable[Pair], source: str = "<pairs>", max_pairs: int | None = None):
    """Collect pairs into a ``datasets.Dataset`` (columns anchor, positive[, negative | negative_1..n]).

    Every pair has the same number of negatives (0 or more): the ranking loss reads a fixed number of columns.
    """
    import datasets

    anchors: list[str] = []
    positives: list[str] = []
    negatives: list[tuple[str, ...]] = []
    n_neg = None
    for i, p in enumerate(pairs):
        if max_pairs is not None and i >= max_pairs:
            break
        if n_neg is None:
            n_neg = len(p.negatives)
        elif len(p.negatives) != n_neg:
            have = "lacks a negative" if not p.negatives else f"has {len(p.negatives)} negative(s)"
            raise ValueError(
                f"{source}: pair {i + 1} {have} but earlier pairs have {n_neg}; give the same number of "
                "negatives for every pair (or none)"
            )
        anchors.append(p.query)
        positives.append(p.positive)
        negatives.append(p.negatives)
    if not anchors:
        raise ValueError(f"{source}: no training pairs")
    cols: dict[str, list[str]] = {"anchor": anchors, "positive": positives}
    for j, name in enumerate(negative_columns(n_neg or 0)):
        cols[name] = [neg[j] for neg in negatives]
    return datasets.Dataset.from_dict(cols)


def check_teachable(dataset, source: str, batch_size: int, dropout_views: bool = False) -> list[str]:
    """Refuse pairs an in-batch ranking loss cannot learn from; return warnings about pairs it learns little from.

    The loss (MNRL) asks each anchor to prefer its own positive over the other positives of its batch, and a
    batch never holds two pairs that share a text (they would be false negatives). So one pair, the same
    pair repeated, one anchor (or one positive) shared by every pair -- each batch then holds a single pair
    and the loss is 0 with a zero gradient -- or every positive equal to its anchor (met by any encoder that
    maps equal texts to equal vectors) teach nothing: a ``ValueError`` naming ``source`` and the reason.
    ``batch_size`` is the pairs per optimizer step (all ranks). ``dropout_views`` (SimCSE pairs): a text paired
    with itself is the point, the two views differing by dropout, so it is neither refused nor warned about.
    """
    anchors, positives = dataset["anchor"], dataset["positive"]
    n = len(anchors)
    if n < 2:
        raise ValueError(f"{source}: {n} training pair; the in-batch ranking loss needs at least 2 (each "
                         "anchor's negatives are the other pairs' positives)")
    distinct = len(set(zip(anchors, positives, strict=True)))
    if distinct < 2:
        raise ValueError(f"{source}: all {n:,} training pairs are the same pair; a batch never holds a text "
                         "twice, so every batch would hold one pair and the loss would be 0")
    for column, texts in (("anchor", anchors), ("positive", positives)):
        if len(set(texts)) < 2:
            raise ValueError(f"{source}: every one of the {n:,} pairs has the same {column}; pairs that share a "
                             "text never share a batch, so every batch would hold one pair and the loss would be 0")
    same = 0 if dropout_views else sum(a == p for a, p in zip(anchors, positives, strict=True))
    if same == n:
        raise ValueError(f"{source}: in every one of the {n:,} pairs the positive is the anchor itself; any encoder "
                         "that gives equal texts equal vectors meets that, so nothing would be learned")
    warnings = []
    if distinct < batch_size:
        warnings.append(f"{source}: only {distinct:,} distinct pairs for batches of {batch_size}: each batch holds "
                        f"at most {distinct:,} pairs, so each anchor sees few negatives")
    if same > n // 2:
        warnings.append(f"{source}: in {same:,} of {n:,} pairs the positive is the anchor itself; those pairs "
                        "teach nothing")
    return warnings


def load_pairs(
    pairs: str | Path,
    corpus: str | Path | None = None,
    strategy: str = "mixed",
    max_pairs: int | None = None,
    seed: int = 0,
    beir_split: str = "train",
    text_field: str = "text",
):
    """``pairs`` = a file / BEIR folder, or ``"auto"`` to mine from ``corpus``. Returns a ``datasets.Dataset``."""
    if str(pairs) == "auto":
        if corpus is None:
            raise ValueError("--pairs auto needs a corpus to mine pairs from (--corpus PATH)")
        it = mine_corpus_pairs(corpus, text_field=text_field, strategy=strategy, max_pairs=max_pairs, seed=seed)
        return pairs_to_dataset(it, source=f"pairs mined from {corpus}")
    return pairs_to_dataset(iter_pairs(pairs, beir_split), source=str(pairs), max_pairs=max_pairs)


# ----------------------------------------------------------------------------------------------------------
# a teacher encoder's help: filter mined pairs, mine hard negatives
# ----------------------------------------------------------------------------------------------------------


def teacher_filter(dataset, encoder, top_k: int = 1, chunk: int = 1024) -> tuple[Any, dict[str, Any]]:
    """Keep the pairs whose positive ``encoder`` ranks within its ``top_k`` for their anchor, among every
    positive of the dataset (round-trip consistency: a mined pair the teacher cannot retrieve is likely
    noise, e.g. a boilerplate first sentence). ``encoder``: an :class:`~mosaic_embed.encode.Encoder`
    (anchors with its "query" prompt, positives with its "document" prompt).

    Returns (the filtered dataset, {"kept", "mined", "top_k"}). Exact scores, no index: a mined set is
    thousands to a few hundred thousand pairs.
    """
    import numpy as np

    if top_k < 1:
        raise ValueError(f"teacher_filter: top_k must be >= 1, got {top_k}")
    positives = dataset["positive"]
    unique = list(dict.fromkeys(positives))
    where = {text: i for i, text in enumerate(unique)}
    own = np.fromiter((where[p] for p in positives), dtype=np.int64, count=len(positives))
    docs = encoder.encode(unique, prompt_name="document")
    queries = encoder.encode(dataset["anchor"], prompt_name="query")
    keep = np.zeros(len(positives), dtype=bool)
    for a in range(0, len(queries), chunk):
        scores = queries[a : a + chunk] @ docs.T  # (c, P)
        mine = scores[np.arange(scores.shape[0]), own[a : a + chunk]]
        keep[a : a + chunk] = (scores > mine[:, None]).sum(axis=1) < top_k  # rank of the own positive
    kept = dataset.select(np.flatnonzero(keep).tolist())
    return kept, {"mined": len(positives), "kept": int(keep.sum()), "top_k": top_k}


def add_hard_negatives(dataset, teacher, n: int, relative_margin: float = 0.05, corpus: list[str] | None = None,
                       range_max: int = 50, batch_size: int = 64) -> tuple[Any, dict[str, Any]]:
    """``n`` hard negatives per (anchor, positive) pair, mined by ``teacher`` (an
    :class:`~mosaic_embed.encode.Encoder`) with sentence-transformers' ``mine_hard_negatives``: among the
    ``range_max`` documents the teacher ranks highest, the top ones scoring below ``(1 - relative_margin)``
    times the positive's score (a candidate scoring about as high as the positive is likely a false
    negative). ``corpus``: extra candidate documents besides the positives. Pairs for which fewer than ``n``
    candidates pass are dropped. Any negative columns already present are replaced.

    Returns (dataset with columns anchor, positive, negative[_1..n], {"pairs", "with_negatives", ...}).
    """
    from sentence_transformers.util import mine_hard_negatives

    if n < 1:
        raise ValueError(f"add_hard_negatives: n must be >= 1, got {n}")
    if not 0.0 <= relative_margin < 1.0:
        raise ValueError(f"add_hard_negatives: relative_margin must be in [0, 1), got {relative_margin}")
    pairs = dataset.select_columns(["anchor", "positive"])
    candidates = len(set(pairs["positive"]) | set(corpus or ()))
    if candidates <= n:
        raise ValueError(f"add_hard_negatives: {candidates} candidate documents cannot give {n} negatives per pair")
    mined = mine_hard_negatives(
        pairs, teacher.st, anchor_column_name="anchor", positive_column_name="positive", corpus=corpus,
        range_max=min(range_max, candidates - 1), relative_margin=relative_margin, num_negatives=n,
        sampling_strategy="top", output_format="n-tuple", batch_size=batch_size, use_faiss=False,
        query_prompt=teacher.prompt("query") or None, corpus_prompt=teacher.prompt("document") or None,
        verbose=False,
    )
    produced = [c for c in mined.column_names if c not in ("anchor", "positive")]
    if len(produced) != n:
        raise RuntimeError(f"mine_hard_negatives returned columns {mined.column_names}, expected {n} negatives")
    mined = mined.rename_columns(dict(zip(produced, negative_columns(n), strict=True)))
    return mined, {"pairs": len(pairs), "with_negatives": len(mined), "negatives_per_pair": n,
                   "relative_margin": relative_margin, "range_max": range_max}
