"""A FAISS vector store: the index, the ids and texts of what it holds, and a manifest, saved atomically.

Layout of a store folder::

    index.faiss        the FAISS index (any ``index_factory`` string; row r of the index is document r)
    ids.json           the document ids, in row order
    docs.jsonl         {"id", "text"} per row, in row order (optional; what a RAG caller wants back)
    docs.offsets.npy   byte offset of each row in docs.jsonl, for random access without loading it
    manifest.json      config, embedding source (encoder path, dimension, dtype), counts, timings

The index type is a factory string in config (``Flat``, ``HNSW32,Flat``, ``IVF1024,Flat``,
``IVF1024,PQ32``...), so exact and approximate stores are one code path; quantizers are trained on a
seeded sample. Vectors are L2-normalised by default so inner product is cosine similarity, the metric
sentence encoders are trained for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_directory, read_manifest, write_manifest
from ..config import IndexConfig

STAGE = "index"


@dataclass(frozen=True)
class Hit:
    """One search result: the document's id, its row in the store, the similarity score and its text."""

    id: str
    row: int
    score: float
    text: str | None = None


def _faiss():
    import faiss  # imported here: the package is an optional speed-up nowhere else, and import costs ~0.3 s

    return faiss


def _metric(name: str) -> int:
    faiss = _faiss()
    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[name]


def _as_float32(block: np.ndarray, normalize: bool) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block = block / np.maximum(norms, 1e-12)
    return block


def build_store(
    vectors: np.ndarray,
    ids: Sequence[str],
    out_dir: str | Path,
    cfg: IndexConfig,
    texts: Iterable[str] | None = None,
    source: dict | None = None,
) -> Path:
    """Build a store from ``vectors`` (N, D) (a memmap is fine: it is read in blocks) and their ``ids``.

    ``texts`` (optional, row order) are stored beside the index for retrieval-augmented generation.
    ``source`` describes where the vectors came from (encoder path, embedding run) for the manifest.
    """
    faiss = _faiss()
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {tuple(vectors.shape)}")
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embedding rows: the ids file does not match the embeddings")
    if len(set(ids)) != n:
        raise ValueError("document ids are not unique")
    t0 = time.perf_counter()
    try:
        index = faiss.index_factory(dim, cfg.factory, _metric(cfg.metric))
    except RuntimeError as err:
        raise ValueError(f"index.factory={cfg.factory!r} is not a valid FAISS factory string: {err}") from None

    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample_rows = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        sample = _as_float32(vectors[sample_rows], cfg.normalize)
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(
                f"training index '{cfg.factory}' on {len(sample)} vectors failed ({err}); "
                "IVF needs at least as many vectors as lists (ideally 39x): use fewer lists or more data"
            ) from None
    t_train = time.perf_counter() - t0
    for start in range(0, n, cfg.add_batch_size):
        block = _as_float32(vectors[start : start + cfg.add_batch_size], cfg.normalize)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise ValueError(f"embedding row {row} (id {ids[row]!r}) is not finite (NaN/inf): refusing to index it")
        index.add(block)
    t_add = time.perf_counter() - t0 - t_train

    with atomic_directory(out_dir) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        (tmp / "ids.json").write_text(json.dumps(list(ids)), encoding="utf-8")
        n_texts = _write_docs(tmp, ids, texts) if texts is not None else 0
        if texts is not None and n_texts != n:
            raise ValueError(f"{n_texts} texts for {n} embedding rows: the documents do not match the embeddings")
        write_manifest(
            tmp,
            STAGE,
            cfg,
            inputs=source or {},
            outputs={"count": n, "dim": dim, "has_texts": texts is not None, "index_type": type(index).__name__},
            timings={"train_s": t_train, "add_s": t_add},
        )
    return Path(out_dir)


def build_store_from_embeddings(
    embeddings_dir: str | Path, out_dir: str | Path, cfg: IndexConfig, with_texts: bool = True
) -> Path:
    """Index the output of ``mosaic-embed embed`` (its manifest names the encoder and the input file).

    With ``with_texts`` the documents' texts are re-read from the embedded input, in row order, and stored
    beside the index, so a search returns what a RAG prompt needs without another lookup. The input must
    be the very file that was embedded (its content hash is checked): texts from a changed file would be
    attached to the wrong vectors.
    """
    from ..artifacts import sha256_file
    from ..encode import iter_texts, load_embeddings

    embeddings_dir = Path(embeddings_dir)
    manifest = read_manifest(embeddings_dir, expect_stage="embed")
    vectors, ids = load_embeddings(embeddings_dir)
    ecfg = manifest.get("config") or {}
    texts = None
    if with_texts:
        source = Path(manifest["inputs"]["input"])
        if not source.is_file():
            raise FileNotFoundError(
                f"{embeddings_dir}: the embedded input {source} is gone; build with --no-texts or restore it"
            )
        if sha256_file(source) != manifest["inputs"].get("input_sha256"):
            raise ValueError(
                f"{source} changed after it was embedded into {embeddings_dir} (content hash differs): its texts "
                "would be attached to the wrong vectors; embed it again, or build with --no-texts"
            )
        texts = iter_texts(source, ecfg.get("text_field", "text"), ecfg.get("title_field", "title"))
    source_info = {
        "embeddings": str(embeddings_dir.resolve()),
        "input": manifest["inputs"].get("input"),
        "encoder": manifest.get("encoder"),
    }
    return build_store(vectors, [str(i) for i in ids], out_dir, cfg, texts=texts, source=source_info)


def _write_docs(folder: Path, ids: Sequence[str], texts: Iterable[str]) -> int:
    offsets = []
    with open(folder / "docs.jsonl", "wb") as f:
        for i, text in enumerate(texts):
            if i >= len(ids):
                return i + 1
            offsets.append(f.tell())
            f.write(json.dumps({"id": ids[i], "text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
    np.save(folder / "docs.offsets.npy", np.asarray(offsets, dtype=np.int64))
    return len(offsets)


def _check_k(k: int) -> None:
    # FAISS asserts k > 0 (a bare AssertionError); say which option is wrong instead
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (--top-k) must be a positive integer, got {k!r}")


class VectorStore:
    """A store loaded from disk; ``search`` takes query vectors, ``search_texts`` takes strings."""

    def __init__(self, path: str | Path):
        faiss = _faiss()
        self.path = Path(path)
        self.manifest = read_manifest(self.path, expect_stage=STAGE)
        for name in ("index.faiss", "ids.json"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path}: missing {name} (an incomplete or foreign store folder)")
        from ..config import from_dict

        self.config = from_dict(IndexConfig, self.manifest["config"], source=str(self.path / "manifest.json"))
        self.index = faiss.read_index(str(self.path / "index.faiss"))
        if self.config.search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, self.config.search_params)
        self.ids: list[str] = json.loads((self.path / "ids.json").read_text(encoding="utf-8"))
        offsets_path = self.path / "docs.offsets.npy"
        self._offsets = np.load(offsets_path) if offsets_path.is_file() else None
        self._encoder = None

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def text(self, row: int) -> str | None:
        """The stored text of one row, read by its byte offset (the docs file is never loaded whole)."""
        if self._offsets is None:
            return None
        with open(self.path / "docs.jsonl", "rb") as f:
            f.seek(int(self._offsets[row]))
            return json.loads(f.readline())["text"]

    def search(self, queries: np.ndarray, k: int = 10, with_text: bool = True) -> list[list[Hit]]:
        """Top-``k`` hits for each query vector; ``queries`` (Q, D) or (D,)."""
        _check_k(k)
        queries = np.atleast_2d(queries)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dimension {queries.shape[1]} does not match the store's {self.dim}")
        scores, rows = self.index.search(_as_float32(queries, self.config.normalize), min(k, len(self)))
        return [
            [
                Hit(self.ids[r], int(r), float(s), self.text(int(r)) if with_text else None)
                for s, r in zip(score_row, row_row, strict=True)
                if r >= 0
            ]
            for score_row, row_row in zip(scores, rows, strict=True)
        ]

    def search_texts(self, queries: Sequence[str], k: int = 10, encoder=None) -> list[list[Hit]]:
        """Embed ``queries`` with ``encoder`` (default: the store's own, see :meth:`encoder`) and search."""
        _check_k(k)  # before loading the encoder
        encoder = encoder or self.encoder()
        return self.search(encoder.encode(list(queries), prompt_name="query"), k)

    def encoder(self, model: str | Path | None = None, force: bool = False, device: str = "auto"):
        """The :class:`~mosaic_embed.encode.Encoder` that made the store's vectors, opened with the settings
        its manifest records (``max_seq_len``, precision), so queries are embedded exactly as the documents.

        ``model`` replaces the recorded folder (moved or copied); its identity (weights and configuration
        hash) must match the recorded one unless ``force``.
        """
        from ..config import EncodeConfig
        from ..encode import Encoder

        if self._encoder is not None and model is None:
            return self._encoder
        info = self.manifest.get("inputs", {}).get("encoder") or {}
        path = model or info.get("path")
        if not path:
            raise ValueError(f"{self.path}: the manifest names no encoder; pass --model ENCODER")
        if not Path(path).exists():
            raise FileNotFoundError(f"{self.path}: its encoder {path} is gone; pass --model with a copy of it")
        settings = EncodeConfig(max_seq_len=info.get("max_seq_len"), precision=info.get("precision", "auto"),
                                truncate_dim=info.get("truncate_dim"), device=device)
        encoder = Encoder.load(path, settings)
        recorded = info.get("identity")
        if recorded and not force:
            actual = encoder.describe()["identity"]
            if actual != recorded:
                raise ValueError(
                    f"{path} is not the encoder that built {self.path} (weights or configuration differ from the "
                    "recorded hash): its queries would not match the stored vectors; use the original encoder, "
                    "rebuild the store, or pass --force"
                )
        self._encoder = encoder
        return encoder
