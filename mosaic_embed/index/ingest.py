"""Documents into a store: JSON-lines records -> chunks -> vectors (the store's one Encoder) -> a transaction.

Two sources: ``--input docs.jsonl`` (embedded here, long documents cut into overlapping token windows) and
``--embeddings DIR`` (the output of ``mosaic-embed embed``, whose input file must be unchanged: its content
hash is checked before its texts are attached to the vectors). Records are read, chunked and embedded a
window at a time and staged on disk by the writer, so no step holds a whole corpus in memory.

A record is ``{"_id" | "id" | <id_field>: ..., "text": ..., "title": ..., <metadata fields>...}``; a chunk
stores what was embedded (title + chunk text, as ``embed`` does), its character span in the record's text,
and the record's metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat, zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EncodeConfig, IndexConfig
from ..data.corpus import iter_jsonl, record_id
from .store import Doc, StoreWriter, open_encoder, open_writer

WINDOW = 2048  # records read, chunked and embedded at a time


@dataclass
class Record:
    lineno: int
    doc_id: str
    text: str
    title: str | None
    metadata: dict[str, Any]


def iter_records(path: str | Path, cfg: IndexConfig) -> Iterator[Record]:
    """Validated records of a JSON-lines file; a record without text, or an id given twice, is an error
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    reserved = {cfg.text_field, cfg.title_field, cfg.id_field, "_id", "id"}
    seen: dict[str, int] = {}
    n = 0
    for lineno, obj in iter_jsonl(path):
        text = obj.get(cfg.text_field)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field '{cfg.text_field}' missing or not a string")
        rid = record_id(obj, path, lineno, cfg.id_field, n)
        if rid in seen:
            raise ValueError(f"{path}:{lineno}: document id {rid!r} was already given on line {seen[rid]}")
        seen[rid] = lineno
        title = obj.get(cfg.title_field) if cfg.title_field else None
        title = title if isinstance(title, str) and title else None
        if cfg.metadata_fields is None:
            meta = {k: v for k, v in obj.items() if k not in reserved}
        else:
            meta = {k: obj[k] for k in cfg.metadata_fields if k in obj}
        if title is not None and "title" not in meta:
            meta["title"] = title
        n += 1
        yield Record(lineno, rid, text, title, meta)
    if n == 0:
        raise ValueError(f"{path}: no records (the file is empty or blank)")


def chunk_spans(encoder, texts: Sequence[str], budgets: Sequence[int], overlap: int) -> list[list[tuple[int, int]]]:
    """Character spans of each text's chunks: windows of at most ``budget`` tokens (the encoder's tokenizer),
    consecutive windows sharing ``overlap`` tokens. A text that fits is one chunk covering all of it."""
    enc = encoder.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                            return_attention_mask=False, return_token_type_ids=False, verbose=False)
    out = []
    for text, offsets, budget in zip(texts, enc["offset_mapping"], budgets, strict=True):
        if len(offsets) <= budget:
            out.append([(0, len(text))])
            continue
        step = max(1, budget - overlap)
        spans = []
        for first in range(0, len(offsets), step):
            last = min(first + budget, len(offsets)) - 1
            spans.append((int(offsets[first][0]), int(offsets[last][1])))
            if last == len(offsets) - 1:
                break
        out.append(spans)
    return out


def _chunks(encoder, records: list[Record], cfg: IndexConfig) -> list[Doc]:
    """The chunks of a window of records, embedded text = ``title chunk`` (as ``embed``'s record_text)."""
    from ..encode.files import record_text

    limit = min(cfg.chunk_tokens or encoder.max_seq_len, encoder.max_seq_len) - 2  # [CLS] ... [SEP]
    titles = [r.title or "" for r in records]
    title_lens = [len(ids) + 1 if t else 0 for t, ids in
                  zip(titles, encoder.tokenizer(titles, add_special_tokens=False)["input_ids"], strict=True)]
    budgets = [max(8, limit - t) for t in title_lens]
    docs = []
    for r, spans in zip(records, chunk_spans(encoder, [r.text for r in records], budgets, cfg.chunk_overlap),
                        strict=True):
        for i, (a, b) in enumerate(spans[: cfg.max_chunks]):
            text = record_text({"text": r.text[a:b], "title": r.title}, Path("<chunk>"), r.lineno, "text", "title")
            docs.append(Doc(r.doc_id, text, r.metadata, i, a, b))
    return docs


def add_records(writer: StoreWriter, encoder, records: Iterator[Record], cfg: IndexConfig, upsert: bool = False,
                show_progress: bool = False) -> int:
    """Chunk, embed and stage ``records`` a window at a time; returns the chunks staged."""
    from tqdm.auto import tqdm

    writer.set_encoder(encoder.describe())
    n = 0
    window: list[Record] = []
    bar = tqdm(desc="index", unit="doc", disable=not show_progress)

    def flush() -> None:
        nonlocal n
        docs = _chunks(encoder, window, cfg)
        vectors = encoder.encode([d.text for d in docs], prompt_name="document")
        (writer.upsert if upsert else writer.add)(vectors, docs)
        n += len(docs)
        bar.update(len(window))
        window.clear()

    try:
        for record in records:
            window.append(record)
            if len(window) >= WINDOW:
                flush()
        if window:
            flush()
    finally:
        bar.close()
    return n


def build_from_input(input_path: str | Path, out: str | Path, cfg: IndexConfig, model: Any,
                     settings: EncodeConfig | None = None, show_progress: bool = False) -> Path:
    """A new store (or a rebuild of ``out``) from a JSON-lines file, embedded by ``model`` (an encoder folder,
    opened with ``settings``, or a loaded :class:`~mosaic_embed.encode.Encoder`)."""
    from ..encode import Encoder

    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input not found: {input_path}")
    encoder = model if isinstance(model, Encoder) else Encoder.load(model, settings)
    source = {"input": str(input_path.resolve()), "model": encoder.describe()["path"]}
    with open_writer(out, cfg, fresh=True, what="mosaic-embed index build", source=source) as writer:
        add_records(writer, encoder, iter_records(input_path, cfg), cfg, show_progress=show_progress)
    return Path(out)


def add_from_input(store: str | Path, input_path: str | Path, upsert: bool = False, model: str | Path | None = None,
                   device: str = "auto", show_progress: bool = False) -> dict:
    """Add (or upsert) a JSON-lines file's records to a store, embedded by the store's own encoder (``model``: a
    moved copy of it; another encoder is refused: its vectors would not be comparable with the stored ones)."""
    from ..artifacts import read_manifest
    from .store import STAGE

    store = Path(store)
    manifest = read_manifest(store, expect_stage=STAGE)
    encoder = open_encoder(manifest.get("encoder"), store, model, False, device)
    what = "mosaic-embed index " + ("upsert" if upsert else "add")
    with open_writer(store, what=what) as writer:
        n = add_records(writer, encoder, iter_records(input_path, writer.cfg), writer.cfg, upsert, show_progress)
        removed = len(writer.removed)
    return {"chunks_added": n, "chunks_removed": removed}


def build_store(vectors: np.ndarray, ids: Sequence[str], out: str | Path, cfg: IndexConfig,
                texts: Iterable[str] | None = None, metadata: Iterable[dict] | None = None,
                source: dict | None = None, encoder: dict | None = None, trained=None, first_key: int = 0) -> Path:
    """A store from ready vectors (N, D) (a memmap is read in blocks) with their document ids, and optionally
    texts and metadata (iterables in row order); ``encoder`` describes the encoder that made the vectors.

    ``trained``: a trained index whose quantizers are reused (emptied; no training), and ``first_key`` the
    first key handed out: how shards of one corpus are built to be merged (``shards.py``)."""
    records = None
    if texts is not None or metadata is not None:
        records = zip_longest(texts if texts is not None else repeat(None, len(ids)),
                              metadata if metadata is not None else repeat({}, len(ids)), fillvalue=_MISSING)
    return _build(vectors, ids, out, cfg, records, source, encoder, trained, first_key)


_MISSING = object()


def _build(vectors: np.ndarray, ids: Sequence[str], out: str | Path, cfg: IndexConfig,
           records: Iterator[tuple[Any, Any]] | None, source: dict | None, encoder: dict | None, trained=None,
           first_key: int = 0) -> Path:
    """``build_store`` over an iterator of (text, metadata) per row, consumed block by block."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embedding rows: the ids file does not match the embeddings")
    records = iter(records) if records is not None else None
    if records is None and cfg.lexical:
        cfg = dataclasses.replace(cfg, lexical=False)  # no texts: nothing for BM25
    with open_writer(out, cfg, fresh=True, what="mosaic-embed index build", source=source or {}) as writer:
        writer.set_encoder(encoder)
        if trained is not None:
            writer.start_from(trained)
        writer.next_id = max(writer.next_id, int(first_key))
        for start in range(0, n, cfg.add_batch_size):
            stop = min(n, start + cfg.add_batch_size)
            docs = []
            for i in range(start, stop):
                text, meta = next(records, (_MISSING, None)) if records is not None else (None, {})
                if text is _MISSING or meta is _MISSING:
                    raise ValueError(f"{i} texts for {n} embedding rows: the documents do not match the embeddings")
                docs.append(Doc(str(ids[i]), text, dict(meta)))
            writer.add(vectors[start:stop], docs)
        if records is not None and next(records, None) is not None:
            raise ValueError(f"more texts than the {n} embedding rows: the documents do not match the embeddings")
    return Path(out)


def _embedded_records(embeddings_dir: Path, manifest: dict, cfg: IndexConfig) -> Iterator[tuple[str, dict]]:
    """(text, metadata) of each embedded record, in row order, from the very input that was embedded."""
    from ..artifacts import sha256_file
    from ..encode.files import record_text

    source = Path(manifest["inputs"]["input"])
    if not source.is_file():
        raise FileNotFoundError(
            f"{embeddings_dir}: the embedded input {source} is gone; build with --no-texts or restore it")
    if sha256_file(source) != manifest["inputs"].get("input_sha256"):
        raise ValueError(
            f"{source} changed after it was embedded into {embeddings_dir} (content hash differs): its texts "
            "would be attached to the wrong vectors; embed it again, or build with --no-texts")
    ecfg = manifest.get("config") or {}
    text_field, title_field = ecfg.get("text_field", "text"), ecfg.get("title_field", "title")
    id_field = ecfg.get("id_field")
    reserved = {text_field, title_field, id_field, "_id", "id"}
    for lineno, obj in iter_jsonl(source):
        meta = ({k: v for k, v in obj.items() if k not in reserved} if cfg.metadata_fields is None
                else {k: obj[k] for k in cfg.metadata_fields if k in obj})
        yield record_text(obj, source, lineno, text_field, title_field), meta


def build_from_embeddings(embeddings_dir: str | Path, out: str | Path, cfg: IndexConfig, with_texts: bool = True,
                          trained=None, first_key: int = 0) -> Path:
    """A store from the output of ``mosaic-embed embed`` (its manifest names the encoder and the input).

    With ``with_texts`` the records' texts and metadata are re-read from the embedded input, in row order;
    without, only ids are stored (no lexical search then).
    """
    from ..artifacts import read_manifest
    from ..encode import load_embeddings

    embeddings_dir = Path(embeddings_dir)
    manifest = read_manifest(embeddings_dir, expect_stage="embed")
    vectors, ids = load_embeddings(embeddings_dir)
    records = None
    if with_texts:
        records = _embedded_records(embeddings_dir, manifest, cfg)
        records = chain([next(records)], records)  # the first read checks the input before anything is written
    source = {"embeddings": str(embeddings_dir.resolve()), "input": manifest["inputs"].get("input"),
              "input_sha256": manifest["inputs"].get("input_sha256")}
    return _build(vectors, [str(i) for i in ids], out, cfg, records, source, manifest.get("encoder"), trained,
                  first_key)



def add_from_embeddings(store: str | Path, embeddings_dir: str | Path, upsert: bool = False) -> dict:
    """Add (or upsert) the output of ``mosaic-embed embed`` to a store; its encoder must be the store's."""
    from ..artifacts import read_manifest
    from ..encode import load_embeddings

    embeddings_dir = Path(embeddings_dir)
    manifest = read_manifest(embeddings_dir, expect_stage="embed")
    vectors, ids = load_embeddings(embeddings_dir)
    with open_writer(store, what="mosaic-embed index " + ("upsert" if upsert else "add")) as writer:
        writer.set_encoder(manifest.get("encoder"))
        records = _embedded_records(embeddings_dir, manifest, writer.cfg)
        step = writer.cfg.add_batch_size
        for start in range(0, len(ids), step):
            part = [next(records) for _ in range(min(step, len(ids) - start))]
            docs = [Doc(str(ids[start + i]), text, meta) for i, (text, meta) in enumerate(part)]
            (writer.upsert if upsert else writer.add)(vectors[start : start + len(docs)], docs)
        removed = len(writer.removed)
    return {"chunks_added": len(ids), "chunks_removed": removed}


def auto_config(cfg: IndexConfig, n: int, dim: int, memory_gb: float) -> tuple[IndexConfig, str]:
    """Choose flat / HNSW / IVF-PQ for ``n`` vectors of ``dim`` within ``memory_gb``; returns (config, reason).

    Memory per vector: Flat 4*D bytes; HNSW32 4*D + ~256 bytes of links; IVF-PQ m bytes of codes + 8 of id.
    Flat is exact and, up to ~200k vectors, fast enough (a query scans ~0.3 GB/s per core); HNSW answers in
    well under a millisecond at ~0.98 recall while its vectors and graph fit; beyond that, IVF-PQ with the
    largest code that fits (m = D/4 .. 8 bytes) and ~4 sqrt(n) lists.
    """
    import math

    if n < 1 or dim < 1 or memory_gb <= 0:
        raise ValueError(f"--auto needs a positive size and --memory (got n={n}, dim={dim}, memory={memory_gb} GB)")
    budget = memory_gb * 0.8 * 2**30  # leave room for the process, queries and the documents' page cache
    flat, hnsw = n * dim * 4, n * (dim * 4 + 256)
    gib = 2**30
    if n <= 200_000 and flat <= budget:
        return (dataclasses.replace(cfg, factory="Flat", search_params=""),
                f"Flat (exact): {n:,} vectors x {dim} x 4 B = {flat / gib:.2f} GiB fits in {memory_gb:g} GB, and "
                "below 200k vectors exact search is fast enough")
    if hnsw <= budget:
        return (dataclasses.replace(cfg, factory="HNSW32,Flat", search_params="efSearch=128"),
                f"HNSW32,Flat: {n:,} vectors are many for exact search; vectors + graph = {hnsw / gib:.2f} GiB "
                f"fit in {memory_gb:g} GB (~0.98 recall@10 at efSearch 128)")
    nlist = 2 ** int(round(math.log2(max(16, 4 * math.sqrt(n)))))
    nlist = max(16, min(nlist, n // 39))
    for m in (dim // 4, dim // 8, dim // 16, 8):
        if m >= 8 and dim % m == 0 and n * (m + 8) <= budget:
            nprobe = max(8, nlist // 32)
            return (dataclasses.replace(cfg, factory=f"IVF{nlist},PQ{m}", search_params=f"nprobe={nprobe}",
                                        train_size=max(cfg.train_size, 39 * nlist)),
                    f"IVF{nlist},PQ{m}: HNSW would need {hnsw / gib:.2f} GiB, more than {memory_gb:g} GB; "
                    f"{m}-byte PQ codes take {n * (m + 8) / gib:.2f} GiB ({nlist} lists ~ 4 sqrt(n), nprobe {nprobe})")
    raise ValueError(f"{n:,} vectors of dim {dim} do not fit in {memory_gb:g} GB even as 8-byte PQ codes: "
                     "shard the corpus across machines (see the README, 'Indexing a corpus larger than one machine')")


def count_source(input_path: str | Path | None, embeddings: str | Path | None) -> int:
    """How many vectors a build will index (records of ``--input``: chunking may add some; rows of
    ``--embeddings``), for ``--auto``."""
    from ..data.corpus import iter_lines

    if embeddings is not None:
        return int(_embeddings_shape(embeddings)[0])
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"input not found: {input_path}")
    return sum(1 for _ in iter_lines(input_path))


def _embeddings_shape(embeddings: str | Path) -> tuple[int, int]:
    from ..encode import load_embeddings

    return tuple(load_embeddings(embeddings)[0].shape)


def embeddings_dim(embeddings: str | Path) -> int:
    return int(_embeddings_shape(embeddings)[1])
