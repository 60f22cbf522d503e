"""Token shards: a corpus -> an HF ``datasets`` Arrow dataset of training sequences, cached and described.

:func:`prepare_shards` reads the corpus once (streamed, deduplicated: ``data/corpus.py``) into an on-disk
Arrow table of documents, splits the *documents* into train and validation (seeded, so no document has
chunks on both sides), tokenizes each split in parallel (``Dataset.map(batched=True, num_proc=N)``) and
cuts every document into consecutive sequences::

    document tokens t0 .. t(n-1), L = max_seq_len - 2
    -> [CLS] t0 .. t(L-1) [SEP], [CLS] tL .. t(2L-1) [SEP], ..., [CLS] t(kL) .. t(n-1) [SEP]

so nothing is thrown away (the MosaicBERT paper truncated instead); only the last sequence of a document
can be shorter than ``max_seq_len``. Sequences keep corpus order; the training sampler shuffles them.

Memory does not grow with the corpus or with its longest file: documents longer than
``max_document_chars`` are split into pieces while read (each piece then chunked as above; the pieces of
one document stay on one side of the split), the reader writes to Arrow every ~16 M characters, and a
tokenizing worker holds one batch of ``batch_size`` documents.

The output folder (written under a temporary name and renamed when complete)::

    out/train/, out/validation/   Dataset.save_to_disk: column input_ids (list of int32, [CLS] ... [SEP])
    out/dataset_dict.json         so datasets.load_from_disk(out) gives the DatasetDict
    out/tokenizer/                the tokenizer that made the ids (save_pretrained)
    out/corpus_summary.json       files, documents, characters, skips by reason, duplicates
    out/manifest.json             config, inputs and their fingerprints, the cache key, per-split counts,
                                  the sequence length histogram, timings

Caching: the key hashes the corpus files' paths, sizes and modification times, the tokenizer's full
pipeline and every setting that changes the result (not ``num_proc`` or ``batch_size``). A folder whose
manifest holds the same key is reused as is; anything else is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    MANIFEST,
    atomic_directory,
    remove_temporaries,
    sha256_json,
    write_manifest,
    writer_lock,
)
from ..config import DataConfig
from .corpus import CorpusStats, bundled_corpus_path, corpus_files, format_corpus_summary, iter_pieces
from .tokenizer import BUNDLED_NAME, load_tokenizer, padded_vocab_size, tokenizer_fingerprint

#: Bump when the layout or the chunking changes: old caches then stop matching.
SHARDS_FORMAT = 1
SPLITS = ("train", "validation")
STAGE = "data"
_WRITE_CHARS = 16 << 20  # characters of documents buffered before the reader writes them to Arrow


def chunk_ids(ids: list[int], max_seq_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """One document's token ids -> consecutive ``[CLS] ... [SEP]`` sequences of at most ``max_seq_len``.

    ``len(ids) = n`` gives ``ceil(n / (max_seq_len - 2))`` sequences (none for n = 0); concatenating them
    without their [CLS]/[SEP] gives ``ids`` back.
    """
    body = max_seq_len - 2
    if body < 1:
        raise ValueError(f"max_seq_len must be >= 3 to hold [CLS], a token and [SEP], got {max_seq_len}")
    return [[cls_id, *ids[i : i + body], sep_id] for i in range(0, len(ids), body)]


def split_score(text: str, seed: int) -> float:
    """A document's seeded uniform draw in [0, 1): the lowest ones form the validation split.

    A hash of (seed, text) rather than a random stream, so a document keeps its split when other
    documents are added to or removed from the corpus.
    """
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def validation_count(n_docs: int, fraction: float) -> int:
    """Documents held out: ``round(fraction * n)``, at least 1 and at most n - 1 when fraction > 0 and n >= 2."""
    if fraction <= 0 or n_docs < 2:
        return 0
    return min(n_docs - 1, max(1, round(fraction * n_docs)))


# ----------------------------------------------------------------------------------------------------------
# cache key
# ----------------------------------------------------------------------------------------------------------


def _file_entry(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:  # a broken link: still part of the key (it is counted as skipped)
        st = path.lstat()
    return [str(path), st.st_size, st.st_mtime_ns]


def cache_key(cfg: DataConfig, corpus: Path, files: list[Path], tok) -> str:
    """SHA-256 over everything that determines the shards (see the module docstring)."""
    return sha256_json(
        {
            "format": SHARDS_FORMAT,
            "corpus": str(corpus.resolve()),
            "files": [_file_entry(p) for p in files],
            "tokenizer": tokenizer_fingerprint(tok),
            "text_field": cfg.text_field,
            "dedup": cfg.dedup,
            "max_document_chars": cfg.max_document_chars,
            "max_seq_len": cfg.max_seq_len,
            "validation_fraction": cfg.validation_fraction,
            "seed": cfg.seed,
        }
    )


def _cached(out: Path, key: str) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file() or not all((out / s).is_dir() for s in SPLITS):
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("stage") == STAGE and data.get("cache_key") == key


# ----------------------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------------------

# Each worker process builds its tokenizer once from the serialized pipeline (a str pickles cheaply).
_BACKENDS: dict[str, Any] = {}


def _backend(tokenizer_json: str):
    backend = _BACKENDS.get(tokenizer_json)
    if backend is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer_json)
        # A saved tokenizer may carry truncation/padding (e.g. max_length 128): documents must not be cut.
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS.clear()
        _BACKENDS[tokenizer_json] = backend
    return backend


def chunk_arrays(lengths: np.ndarray, flat: np.ndarray, max_seq_len: int, cls_id: int, sep_id: int):
    """Vectorized :func:`chunk_ids` over many documents at once (the reference it is tested against).

    Args:
        lengths: (D,) token count of each document.
        flat: (sum(lengths),) int32, the documents' ids concatenated.

    Returns:
        ``(offsets, values)``: the sequences as an Arrow-style list array, ``offsets`` (S+1,) int32 into
        ``values`` (sum(lengths) + 2 S,) int32.
    """
    body = max_seq_len - 2
    n_chunks = -(-lengths // body)  # (D,) ceil; 0 for an empty document
    total = int(n_chunks.sum())
    starts = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)  # (S,) first chunk of its document
    chunk = np.arange(total, dtype=np.int64) - starts  # (S,) index within the document
    body_len = np.minimum(body, np.repeat(lengths, n_chunks) - chunk * body)  # (S,)
    offsets = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(body_len + 2, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    is_body = np.ones(values.size, dtype=bool)
    is_body[offsets[:-1]] = False
    is_body[offsets[1:] - 1] = False
    values[offsets[:-1]] = cls_id
    values[offsets[1:] - 1] = sep_id
    values[is_body] = flat  # chunks are consecutive, so body tokens appear in corpus order
    return offsets.astype(np.int32), values


def _tokenize_batch(batch: dict[str, list], tokenizer_json: str, max_seq_len: int, cls_id: int, sep_id: int):
    """``datasets.map`` function: a batch of documents -> all their sequences (a table of another length)."""
    import itertools

    import pyarrow as pa

    backend = _backend(tokenizer_json)
    # encode_batch_fast skips character offsets (unused here): faster, and less memory per document.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encodings = encode(batch["text"], add_special_tokens=False)
    ids = [enc.ids for enc in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    offsets, values = chunk_arrays(lengths, flat, max_seq_len, cls_id, sep_id)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
    return pa.table({"input_ids": input_ids})


def _documents(corpus: str, text_field: str, dedup: bool, seed: int, max_document_chars: int,
               stats: CorpusStats) -> Iterator[dict]:
    """Rows ``{text, score, doc}``: the pieces of a split document share its number and its first piece's
    score, so they all fall on one side of the train/validation split."""
    doc, score = -1, 0.0
    for number, text in iter_pieces(corpus, text_field, stats, dedup, max_document_chars):
        if number != doc:
            doc, score = number, split_score(text, seed)
        yield {"text": text, "score": score, "doc": number}


def _split_counts(ds, documents: int) -> tuple[dict[str, Any], dict[int, int]]:
    """Counts of one tokenized split (column input_ids) of ``documents`` documents, and its {length:
    sequences} histogram."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]  # zero-copy view of the memory-mapped table
    if table.num_rows == 0:
        lengths = np.zeros(0, dtype=np.int64)
    else:
        lengths = pc.list_value_length(table["input_ids"]).to_numpy().astype(np.int64)
    n = int(lengths.size)
    tokens = int(lengths.sum())
    hist = {int(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True), strict=True)}
    counts = {
        "documents": documents,
        "sequences": n,
        "tokens": tokens,  # [CLS]/[SEP] included
        "document_tokens": tokens - 2 * n,
        "mean_length": round(tokens / n, 2) if n else 0.0,
    }
    return counts, hist


@contextlib.contextmanager
def _datasets_bars_off() -> Iterator[None]:
    import datasets

    were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


def prepare_shards(cfg: DataConfig, log: Callable[[str], None] | None = None) -> Path:
    """Tokenize ``cfg.corpus`` into train/validation shards (or reuse cached ones); returns the folder.

    ``log`` receives progress lines (the CLI passes ``click.echo``). Raises FileNotFoundError for a missing
    corpus or tokenizer, ValueError for a corpus without documents, a tokenizer without [CLS]/[SEP], or an
    ``out`` folder that exists and is not a shards folder.
    """
    import datasets

    say = log or (lambda msg: None)
    # resolved: the cache key, the manifest and the corpus summary do not depend on the working directory
    corpus = (Path(cfg.corpus).expanduser() if cfg.corpus is not None else bundled_corpus_path()).resolve()
    files = corpus_files(corpus)
    tok = load_tokenizer(cfg.tokenizer)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(f"tokenizer {cfg.tokenizer}: needs [CLS] and [SEP] tokens (cls={cls_id}, sep={sep_id})")
    key = cache_key(cfg, corpus, files, tok)
    out = Path(cfg.out).expanduser() if cfg.out is not None else Path(cfg.cache_dir).expanduser() / f"shards-{key[:16]}"

    if not cfg.force and _cached(out, key):
        say(f"shards up to date (cache key {key[:16]}): reusing {out}")
        return out
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a shards folder (no {MANIFEST}); choose another output folder")
    if (out / MANIFEST).is_file():
        stage = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("stage")
        if stage != STAGE:
            raise ValueError(f"{out} holds a '{stage}' run, not shards; choose another output folder")
        say(f"rebuilding {out}: " + ("forced" if cfg.force else "inputs or settings changed since it was built"))

    num_proc = cfg.num_proc or os.cpu_count() or 1
    start = time.perf_counter()
    stats = CorpusStats()
    # one build of these shards at a time; the lock lives beside them (the folder itself is renamed into place)
    with writer_lock(out.parent / f".{out.name}.writer", "mosaic-embed data prepare", remove_empty=True):
        if not cfg.force and _cached(out, key):  # built by another process since the check above
            say(f"shards up to date (cache key {key[:16]}): reusing {out}")
            return out
        remove_temporaries(out.parent, out.name)  # what a killed build of these shards left
        with atomic_directory(out) as tmp:
            work = tmp / ".work"  # datasets' intermediate Arrow files; deleted before the folder is published
            features = datasets.Features({"text": datasets.Value("string"), "score": datasets.Value("float64"),
                                          "doc": datasets.Value("int64")})
            say(f"reading {corpus}")
            try:
                # One process reads the corpus: dedup needs one set of digests over all files.
                with _datasets_bars_off():  # its "Generating train split" bar would only confuse here
                    docs = datasets.Dataset.from_generator(
                        _documents,
                        gen_kwargs={"corpus": str(corpus), "text_field": cfg.text_field, "dedup": cfg.dedup,
                                    "seed": cfg.seed, "max_document_chars": cfg.max_document_chars, "stats": stats},
                        features=features,
                        cache_dir=str(work),
                        fingerprint=f"docs-{key[:32]}",
                        # rows buffered before each Arrow write: ~_WRITE_CHARS characters, whatever the documents
                        writer_batch_size=max(1, min(1000, _WRITE_CHARS // cfg.max_document_chars)),
                    )
            except datasets.exceptions.DatasetGenerationError as err:
                # Our own errors (no documents, missing corpus) arrive wrapped: raise them as they were.
                if isinstance(err.__cause__, (ValueError, OSError)):
                    raise err.__cause__ from None
                raise
            read_s = time.perf_counter() - start
            split = f", {stats.split_documents:,} of them split into pieces" if stats.split_documents else ""
            say(f"read {stats.documents:,} documents ({stats.characters:,} characters{split}) in {read_s:.1f} s")

            columns = docs.with_format("numpy")
            scores = np.asarray(columns["score"], dtype=np.float64)
            numbers = np.asarray(columns["doc"], dtype=np.int64)
            first = np.unique(numbers, return_index=True)[1]  # each document's first row (piece)
            n_val = validation_count(len(first), cfg.validation_fraction)
            if cfg.validation_fraction > 0 and n_val == 0:
                say("only one document: the validation split is empty")
            # the n_val documents of lowest score, with all their pieces
            held_out = np.isin(numbers, numbers[first[np.argsort(scores[first], kind="stable")[:n_val]]])
            indices = {"validation": np.flatnonzero(held_out), "train": np.flatnonzero(~held_out)}

            out_features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
            fn_kwargs = {"tokenizer_json": tok.backend_tokenizer.to_str(), "max_seq_len": cfg.max_seq_len,
                         "cls_id": cls_id, "sep_id": sep_id}
            splits, counts, hists = {}, {}, {}
            tok_start = time.perf_counter()
            for name in SPLITS:
                part = docs.select(indices[name])
                if len(part) == 0:
                    tokenized = datasets.Dataset.from_dict({"input_ids": []}, features=out_features)
                else:
                    # More processes than batches only adds start-up cost (and tiny corpora stay in-process).
                    procs = max(1, min(num_proc, -(-len(part) // cfg.batch_size)))
                    tokenized = part.map(
                        _tokenize_batch,
                        batched=True,
                        batch_size=cfg.batch_size,
                        num_proc=procs if procs > 1 else None,
                        remove_columns=["text", "score", "doc"],
                        features=out_features,
                        fn_kwargs=fn_kwargs,
                        new_fingerprint=f"{name}-{key[:32]}",  # datasets caps fingerprints at 64 chars
                        desc=f"tokenizing {name}",
                    )
                counts[name], hists[name] = _split_counts(tokenized, len(np.unique(numbers[indices[name]])))
                splits[name] = tokenized
            tokenize_s = time.perf_counter() - tok_start

            # An empty split must still be written as one (empty) shard: datasets cannot load a split of 0 shards.
            empty = {name: 1 for name, ds in splits.items() if len(ds) == 0}
            with _datasets_bars_off():  # one "Saving the dataset" bar per split: the tokenizing bars suffice
                datasets.DatasetDict(splits).save_to_disk(str(tmp), num_shards={**dict.fromkeys(splits), **empty})
            del docs, splits, part, tokenized
            shutil.rmtree(work, ignore_errors=True)
            tok.save_pretrained(str(tmp / "tokenizer"))
            stats.save(tmp / "corpus_summary.json")
            total_s = time.perf_counter() - start
            write_manifest(
                tmp,
                STAGE,
                config=cfg,
                inputs={
                    "corpus": str(corpus.resolve()),
                    "corpus_files": len(files),
                    "corpus_files_fingerprint": sha256_json([_file_entry(p) for p in files]),
                    "tokenizer": str(Path(cfg.tokenizer).expanduser().resolve())
                    if cfg.tokenizer and cfg.tokenizer != BUNDLED_NAME else f"{BUNDLED_NAME} (bundled)",
                    "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                },
                outputs=counts,
                timings={"read_s": round(read_s, 3), "tokenize_s": round(tokenize_s, 3), "total_s": round(total_s, 3)},
                cache_key=key,
                format=SHARDS_FORMAT,
                max_seq_len=cfg.max_seq_len,
                num_proc=num_proc,
                tokenizer_info={
                    "vocab_size": len(tok),
                    "padded_vocab_size": padded_vocab_size(tok),
                    "special_token_ids": {
                        "pad": tok.pad_token_id, "unk": tok.unk_token_id, "cls": cls_id, "sep": sep_id,
                        "mask": tok.mask_token_id,
                    },
                },
                length_histogram={name: {str(k): v for k, v in hists[name].items()} for name in SPLITS},
                corpus_summary=stats.to_dict(),
            )
    say(f"wrote {out} in {total_s:.1f} s")
    return out


def load_shards(path: str | Path):
    """The shards of :func:`prepare_shards` as a ``datasets.DatasetDict`` (``train``, ``validation``), memory-mapped."""
    import datasets

    from ..artifacts import read_manifest

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shards not found: {path} (make them with 'mosaic-embed data prepare')")
    read_manifest(path, expect_stage=STAGE)
    missing = [s for s in SPLITS if not (path / s).is_dir()]
    if missing:
        raise ValueError(f"{path}: incomplete shards folder (missing {', '.join(missing)})")
    return datasets.DatasetDict({s: datasets.load_from_disk(str(path / s)) for s in SPLITS})


def shards_tokenizer(path: str | Path):
    """The tokenizer saved with the shards in ``path/tokenizer`` (the one that made their ids)."""
    return load_tokenizer(Path(path) / "tokenizer")


def format_shards_summary(manifest: dict[str, Any]) -> str:
    """A few lines on a shards folder's manifest: corpus summary, then per-split documents/sequences/tokens."""
    lines = [format_corpus_summary(manifest["corpus_summary"])]
    info = manifest["tokenizer_info"]
    lines.append(
        f"tokenizer {manifest['inputs']['tokenizer']}: vocab {info['vocab_size']:,} "
        f"(padded {info['padded_vocab_size']:,}); max_seq_len {manifest['max_seq_len']}"
    )
    for name in SPLITS:
        c = manifest["outputs"][name]
        hist = manifest["length_histogram"][name]
        full = hist.get(str(manifest["max_seq_len"]), 0)
        lines.append(
            f"  {name:<10} {c['documents']:>9,} documents {c['sequences']:>10,} sequences "
            f"{c['tokens']:>12,} tokens (mean length {c['mean_length']}, {full:,} full-length)"
        )
    t = manifest["timings"]
    lines.append(f"  timings: read {t['read_s']} s, tokenize {t['tokenize_s']} s, total {t['total_s']} s")
    return "\n".join(lines)
