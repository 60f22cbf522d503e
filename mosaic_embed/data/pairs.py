"""Training pairs for contrastive encoders: read them from files, or mine them from a plain corpus.

Sources (``load_pairs`` dispatches on what ``path`` is):

- ``.jsonl`` / ``.jsonl.gz``: ``{"query": ..., "positive": ..., ["negative": ...]}`` per line;
- ``.tsv``: ``query <TAB> positive [<TAB> negative]`` per line, optional header ``query  positive ...``;
- a BEIR folder: every (query, document) with qrel score > 0 in ``qrels/<split>.tsv`` (default ``train``);
- ``auto`` (``mine_pairs``): pairs mined from a corpus without labels, so a team with only its own text
  can still train an embedder. Two strategies, both from the unsupervised-retrieval literature:
  ``first-sentence`` (a document's opening sentence -> the rest, the "title -> body" signal that news
  and documentation carry) and ``spans`` (two disjoint random word spans of one document, the
  independent-cropping view pairs of Contriever, Izacard et al. 2022, arXiv 2112.09118).

Pairs come out as a ``datasets.Dataset`` with columns ``anchor``, ``positive`` [, ``negative``]: the
column order is what sentence-transformers' ranking losses read (anchor, positive, negatives...).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .beir import load_beir
from .corpus import iter_jsonl, iter_tsv


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negative: str | None = None


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


def iter_jsonl_pairs(path: str | Path) -> Iterator[Pair]:
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        yield Pair(
            _text(obj, "query", path, lineno, True),
            _text(obj, "positive", path, lineno, True),
            _text(obj, "negative", path, lineno, False),
        )


def iter_tsv_pairs(path: str | Path) -> Iterator[Pair]:
    path = Path(path)
    for lineno, parts in iter_tsv(path, lambda head: head[:2] == ["query", "positive"]):
        if len(parts) not in (2, 3):
            raise ValueError(
                f"{path}:{lineno}: expected 2 or 3 tab-separated columns (query, positive[, negative]), "
                f"got {len(parts)}"
            )
        if any(not p.strip() for p in parts):
            raise ValueError(f"{path}:{lineno}: empty column")
        yield Pair(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


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
    """
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
    raise ValueError(f"unknown pair-mining strategy {strategy!r} (use 'first-sentence' or 'spans')")


MINING_STRATEGIES = ("first-sentence", "spans", "mixed")


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


def pairs_to_dataset(pairs: Iterable[Pair], source: str = "<pairs>", max_pairs: int | None = None):
    """Collect pairs into a ``datasets.Dataset`` (columns anchor, positive[, negative]).

    Either every pair has a negative or none has: the ranking loss reads a fixed number of columns.
    """
    import datasets

    cols: dict[str, list[str]] = {"anchor": [], "positive": [], "negative": []}
    with_neg = None
    for i, p in enumerate(pairs):
        if max_pairs is not None and i >= max_pairs:
            break
        has = p.negative is not None
        if with_neg is None:
            with_neg = has
        elif has != with_neg:
            raise ValueError(
                f"{source}: pair {i + 1} {'has' if has else 'lacks'} a negative but earlier pairs "
                f"{'do not' if has else 'do'}; give a negative for every pair or for none"
            )
        cols["anchor"].append(p.query)
        cols["positive"].append(p.positive)
        if has:
            cols["negative"].append(p.negative)
    if not cols["anchor"]:
        raise ValueError(f"{source}: no training pairs")
    if not with_neg:
        del cols["negative"]
    return datasets.Dataset.from_dict(cols)


def check_teachable(dataset, source: str, batch_size: int) -> list[str]:
    """Refuse pairs an in-batch ranking loss cannot learn from; return warnings about pairs it learns little from.

    The loss (MNRL) asks each anchor to prefer its own positive over the other positives of its batch, and a
    batch never holds two pairs that share a text (they would be false negatives). So one pair, the same
    pair repeated, one anchor (or one positive) shared by every pair -- each batch then holds a single pair
    and the loss is 0 with a zero gradient -- or every positive equal to its anchor (met by any encoder that
    maps equal texts to equal vectors) teach nothing: a ``ValueError`` naming ``source`` and the reason.
    ``batch_size`` is the pairs per optimizer step (all ranks).
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
    same = sum(a == p for a, p in zip(anchors, positives, strict=True))
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
