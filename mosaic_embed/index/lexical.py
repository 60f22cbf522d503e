"""BM25 over a store's documents (bm25s: Lucene variant, k1 1.5, b 0.75, English stop words, Snowball stemmer).

Each document's BM25 tokens are computed once, when it is added, and kept in the document store; the BM25
matrix itself is rebuilt from those tokens whenever the store changes. A rebuild is needed anyway: IDF and
the average length, which every precomputed score depends on, change with any add or delete. Its cost is
one pass over the stored tokens (seconds per million short documents), paid by the writer, never by a query.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

K1, B, METHOD = 1.5, 0.75, "lucene"
KEYS = "keys.npy"


def _bm25s():
    """bm25s, imported without jax. Where jax is installed, importing bm25s imports it and runs a top-k to warm
    it up: 3.1 s of a 7.7 s `index search` process on a GPU host, and there XLA's first use reserves most of
    the GPU's memory, which the encoder then lacks. This module uses only bm25s's numpy scoring; jax stays
    importable for anything else in the process (a jax the process imported already is left to bm25s)."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    block = "jax" not in sys.modules
    if block:
        sys.modules["jax"] = None  # `import jax.lax` raises ImportError, bm25s's cue for its numpy path
    try:
        import bm25s
    finally:
        if block and "jax" in sys.modules and sys.modules["jax"] is None:
            del sys.modules["jax"]
    return bm25s


def _stemmer():
    import Stemmer  # PyStemmer: a runtime dependency next to bm25s

    return Stemmer.Stemmer("english")


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """BM25 tokens of each text (lower-cased words of 2+ characters, stop words dropped, stemmed)."""
    if not texts:
        return []
    return _bm25s().tokenize(list(texts), stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False)


def join_tokens(tokens: list[str]) -> str:
    return " ".join(tokens)  # tokens match \w\w+: they hold no space


class Lexical:
    """A BM25 index over some store keys; ``search`` scores queries against every document (sparse, exact)."""

    def __init__(self, retriever, keys: np.ndarray):
        self.retriever = retriever
        self.keys = keys  # (N,) int64: the store key of BM25 row r, ascending

    @classmethod
    def build(cls, keys: np.ndarray, token_strings: Iterable[str]) -> Lexical:
        docs = [s.split() for s in token_strings]
        retriever = _bm25s().BM25(k1=K1, b=B, method=METHOD)
        if any(docs):
            retriever.index(docs, show_progress=False)
        else:  # no document has a term: nothing can match (bm25s cannot index an empty vocabulary)
            retriever = None
        return cls(retriever, np.asarray(keys, dtype=np.int64))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / KEYS, self.keys if self.retriever is not None else np.zeros(0, np.int64))
        if self.retriever is not None:
            self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path) -> Lexical:
        keys = np.load(folder / KEYS)
        retriever = _bm25s().BM25.load(str(folder), show_progress=False) if len(keys) else None
        return cls(retriever, keys)

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: Sequence[str], k: int, allowed: np.ndarray | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: (store keys, BM25 scores) of the top-``k`` documents that share a term with it, best first.

        ``allowed``: sorted store keys a filter admits (None = all). Documents without any query term score 0
        and are never returned (they are not matches); the caller reports when that leaves fewer than ``k``.
        """
        out = []
        mask = None
        if allowed is not None and self.retriever is not None:
            mask = np.isin(self.keys, allowed, assume_unique=True)
        for tokens in tokenize(list(queries)):
            if self.retriever is None or not len(self.keys):
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            ids = self.retriever.get_tokens_ids(tokens)
            scores = (self.retriever.get_scores_from_ids(ids) if ids
                      else np.zeros(len(self.keys), dtype=np.float32))
            if mask is not None:
                scores = np.where(mask, scores, 0.0)
            hit = np.flatnonzero(scores > 0)
            if len(hit) > k:
                hit = hit[np.argpartition(-scores[hit], k - 1)[:k]]
            hit = hit[np.argsort(-scores[hit], kind="stable")]
            out.append((self.keys[hit], scores[hit].astype(np.float32)))
        return out
