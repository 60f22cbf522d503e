"""A corpus indexed in shards: built separately (other processes, other machines), merged into one IVF store.

1. train once: build a store from a sample of the corpus with an IVF factory (``IVF65536,PQ48``...): its
   coarse quantizer and codebooks are the template;
2. build each shard from its part of the embeddings with ``build_shard`` (``index build --like TEMPLATE
   --first-key K``): the template's quantizers, no training, keys from ``K`` (disjoint ranges per shard);
3. ``merge_stores`` moves every shard's inverted lists into one index (FAISS ``merge_from``, which checks the
   quantizers are the same), copies the documents (a key or document id in two shards is an error), rebuilds
   BM25, and publishes the result as one new store: one transaction, like every other write.

Compressed IVF-PQ codes are small (48 bytes + an 8-byte id per vector: 56 GB per billion), so the merged
index fits one large machine long after the float vectors would not.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from .store import DOCS_DB, VectorStore, base_index, open_writer


def template_index(like: str | Path):
    """The trained index of store ``like`` (an IVF store: its quantizers are what shards share)."""
    import faiss

    store = VectorStore(like)
    if not isinstance(base_index(store.index), faiss.IndexIVF):
        raise ValueError(f"{like}: index {store.config.factory} is not IVF; shards are merged by inverted lists")
    return store


def build_shard(embeddings_dir: str | Path, out: str | Path, like: str | Path, first_key: int,
                with_texts: bool = True) -> Path:
    """One shard: ``embed`` output indexed with the template store's quantizers and config, keys from
    ``first_key``."""
    from .ingest import build_from_embeddings

    template = template_index(like)
    if first_key < 0:
        raise ValueError(f"first_key must be >= 0, got {first_key}")
    return build_from_embeddings(embeddings_dir, out, template.config, with_texts, trained=template.index,
                                 first_key=first_key)


def merge_stores(out: str | Path, shards: Sequence[str | Path]) -> Path:
    """One store holding every shard's documents and vectors (``out`` must not be one of the shards)."""
    import faiss

    if len(shards) < 2:
        raise ValueError("merge needs at least two shards")
    out = Path(out)
    if any(Path(s).resolve() == out.resolve() for s in shards):
        raise ValueError(f"{out}: the merged store must be a new folder, not one of the shards")
    stores = [template_index(s) for s in shards]
    first = stores[0]
    for s in stores[1:]:
        for what, a, b in (("factory", first.config.factory, s.config.factory),
                           ("metric", first.config.metric, s.config.metric), ("dim", first.dim, s.dim),
                           ("encoder", (first.manifest.get("encoder") or {}).get("identity"),
                            (s.manifest.get("encoder") or {}).get("identity"))):
            if a != b:
                raise ValueError(f"{s.path}: {what} {b!r} differs from {first.path}'s {a!r}; shards must be built alike")
    source = {"shards": [str(Path(s).resolve()) for s in shards]}
    with open_writer(out, first.config, fresh=True, what="mosaic-embed index merge", source=source) as writer:
        writer.set_encoder(first.manifest.get("encoder"))
        index = faiss.clone_index(first.index)
        trained = _trained_state(first.index)
        for s in stores[1:]:
            # FAISS's own merge check compares only shapes: lists of another quantizer would merge silently
            if _trained_state(s.index) != trained:
                raise ValueError(f"{s.path}: its quantizer differs from {first.path}'s (build every shard with "
                                 "--like the same template)")
            index.merge_from(s.index, 0)  # keys are kept: they are global
        writer.index, writer.dim = index, index.d
        for s in stores:
            writer.db.commit()  # ATTACH is refused inside a transaction
            writer.db.execute("ATTACH DATABASE ? AS shard", (str(s.path / s.generation / DOCS_DB),))
            try:
                writer.db.execute("INSERT INTO documents SELECT * FROM shard.documents")
                writer.db.commit()
            except sqlite3.IntegrityError:
                writer.db.rollback()  # DETACH is refused inside a transaction
                raise ValueError(f"{s.path}: a key or document id it holds is also in another shard (give each "
                                 "shard its own --first-key range and its own documents)") from None
            finally:
                writer.db.execute("DETACH DATABASE shard")
        writer.next_id = max(int(s.manifest["outputs"]["next_id"]) for s in stores)
    return out


def _trained_state(index) -> bytes:
    """The serialized empty copy of an index: its quantizer and codebooks, nothing of its contents."""
    import faiss

    empty = faiss.clone_index(index)
    empty.reset()
    return bytes(faiss.serialize_index(empty))
