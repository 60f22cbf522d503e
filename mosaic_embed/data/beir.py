"""BEIR-layout retrieval sets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

The layout (Thakur et al., 2021, arXiv 2104.08663) is the de-facto exchange format for retrieval
benchmarks::

    DIR/corpus.jsonl[.gz]     {"_id": "d1", "title": "...", "text": "..."}   one document per line
    DIR/queries.jsonl[.gz]    {"_id": "q1", "text": "..."}                   one query per line
    DIR/qrels/test.tsv        query-id <TAB> corpus-id <TAB> score            header line first

Every malformed line is an error that names the file and the line number; a qrel that points at a
query or document that does not exist is an error too (silently dropping it would inflate metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import iter_jsonl, iter_tsv


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {stem}.jsonl or {stem}.jsonl.gz (expected the BEIR layout)")


def _string_field(obj: dict[str, Any], key: str, path: Path, lineno: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise ValueError(f"{path}:{lineno}: missing field '{key}'")
    if isinstance(value, int) and not isinstance(value, bool) and key == "_id":
        return str(value)  # some BEIR sets store numeric ids
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def load_corpus(path: str | Path) -> dict[str, dict[str, str]]:
    """``corpus.jsonl`` -> ``{doc_id: {"title": str, "text": str}}`` (insertion order = file order)."""
    path = Path(path)
    corpus: dict[str, dict[str, str]] = {}
    for lineno, obj in iter_jsonl(path):
        doc_id = _string_field(obj, "_id", path, lineno)
        if doc_id in corpus:
            raise ValueError(f"{path}:{lineno}: duplicate _id {doc_id!r}")
        corpus[doc_id] = {
            "title": _string_field(obj, "title", path, lineno, required=False),
            "text": _string_field(obj, "text", path, lineno),
        }
    return corpus


def load_queries(path: str | Path) -> dict[str, str]:
    """``queries.jsonl`` -> ``{query_id: text}``."""
    path = Path(path)
    queries: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path):
        qid = _string_field(obj, "_id", path, lineno)
        if qid in queries:
            raise ValueError(f"{path}:{lineno}: duplicate _id {qid!r}")
        queries[qid] = _string_field(obj, "text", path, lineno)
    return queries


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``qrels/<split>.tsv`` -> ``{query_id: {doc_id: score}}``. The header line is optional."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, parts in iter_tsv(path, lambda head: head[0] in ("query-id", "query_id", "qid")):
        if len(parts) != 3:
            raise ValueError(
                f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(parts)}"
            )
        qid, did, score = (p.strip() for p in parts)
        try:
            value = int(float(score))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: score {score!r} is not a number") from None
        qrels.setdefault(qid, {})[did] = value
    return qrels


@dataclass
class BeirDataset:
    """One split of a BEIR folder, fully in memory (BEIR sets are evaluated whole)."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]  # only the queries that have at least one qrel in this split
    qrels: dict[str, dict[str, int]]
    path: Path
    split: str

    def doc_text(self, doc_id: str) -> str:
        return doc_text(self.corpus[doc_id])


def doc_text(doc: dict[str, str]) -> str:
    """The text we embed for a BEIR document: title and body joined by a space (the BEIR convention)."""
    title = doc.get("title") or ""
    return f"{title} {doc['text']}".strip() if title else doc["text"]


def qrels_splits(folder: str | Path) -> list[str]:
    qdir = Path(folder) / "qrels"
    return sorted(p.name.split(".")[0] for p in qdir.glob("*.tsv*")) if qdir.is_dir() else []


def load_beir(folder: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder's corpus, queries and one qrels split; check that every qrel resolves."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"BEIR folder not found: {folder}")
    qrels_path = None
    for name in (f"{split}.tsv", f"{split}.tsv.gz"):
        if (folder / "qrels" / name).is_file():
            qrels_path = folder / "qrels" / name
    if qrels_path is None:
        raise FileNotFoundError(
            f"{folder}: no qrels/{split}.tsv (splits present: {', '.join(qrels_splits(folder)) or 'none'})"
        )
    corpus = load_corpus(_find(folder, "corpus"))
    all_queries = load_queries(_find(folder, "queries"))
    qrels = load_qrels(qrels_path)
    for qid, docs in qrels.items():
        if qid not in all_queries:
            raise ValueError(f"{qrels_path}: query-id {qid!r} is not in queries")
        for did in docs:
            if did not in corpus:
                raise ValueError(f"{qrels_path}: corpus-id {did!r} (query {qid!r}) is not in the corpus")
    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, path=folder, split=split)
