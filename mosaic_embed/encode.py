"""Embedding at scale: a sentence-transformers encoder folder -> memory-mapped ``.npy`` embeddings on disk.

Why not just ``SentenceTransformer.encode``: for a BERT-Base-sized model on a modern GPU it spends most of
its time on the host (tokenizing in the loop, padding every batch to its longest member, one small
batch at a time), so the GPU idles. Here, for a MosaicBERT backbone:

1. a background thread tokenizes the next window of texts (the Rust tokenizer releases the GIL and
   runs its own thread pool) while the GPU embeds the current one;
2. inside a window (thousands of texts) texts are sorted by length and cut into batches by a token
   budget (32k real tokens on GPU: thousands of short texts or ~128 long ones per forward, so every
   forward is large), and each batch is fed *packed*: all its tokens concatenated (T,) with
   ``cu_seqlens`` (B+1,), so no padding token is ever computed (MosaicBERT's unpadded path, the same one
   used in pretraining). The window is laid out in numpy by the tokenizer thread and goes to the device
   in a few copies; the batch loop then only launches device work (no per-batch copy or readback);
3. pooling (mean / CLS) and normalisation run on the packed (T, H) output with segment sums, matching
   sentence-transformers' ``Pooling`` + ``Normalize`` exactly;
4. the model runs in bf16 on GPU, and the results of a whole window come back to the host at once.

Any other backbone (or a folder with modules we do not mirror, e.g. ``Dense``) falls back to plain
``SentenceTransformer.encode``; ``Encoder.path_used`` says which path runs, and it is logged once.

``embed_file`` streams a JSON-lines input of any size (one pass counts records and writes ids, one pass
embeds), writes ``embeddings.npy`` through ``np.lib.format.open_memmap`` (rows in input order) and
``ids.jsonl``, checkpoints progress per window (an interrupted run resumes where it stopped), and under
``torchrun`` shards windows over ranks that all write into the one output file.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import queue
import shutil
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .artifacts import atomic_write_json, sha256_json, write_manifest
from .data.beir import open_text

logger = logging.getLogger(__name__)

PACKED, FALLBACK = "packed", "sentence-transformers"


def _pooling_mode(module: Any) -> str | None:
    """The single pooling mode of an ST ``Pooling`` module ('mean', 'cls', ...), across ST 6.x versions."""
    cfg = module.get_config_dict()
    mode = cfg.get("pooling_mode")
    if isinstance(mode, list | tuple):
        mode = mode[0] if len(mode) == 1 else None
    if mode is None:  # older ST: one boolean key per mode
        active = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        mode = active[0] if len(active) == 1 else None
        mode = {"cls_token": "cls", "mean_tokens": "mean"}.get(mode, mode)
    if cfg.get("include_prompt", True) is False:
        return None  # prompt exclusion needs the prompt length: leave it to ST
    return mode


DEFAULT_MAX_TOKENS = 32768  # real tokens per packed batch on GPU (see Encoder)


@dataclass
class PackedWindow:
    """One window of tokenized texts laid out for the device: length-sorted and cut into packed batches.

    Built on the host (numpy only, so a background thread can build it while the device runs the previous
    window). S sorted sequences, T tokens, nb batches.

    tokens: (T,) int64 token ids of the sequences in sorted order, back to back.
    lens: (S,) int64 sorted sequence lengths (longest first).
    order: (S,) int64 the input row of each sorted sequence.
    bounds: (nb+1,) int64 batch b is sorted sequences ``bounds[b]:bounds[b+1]``.
    cu: (S+nb,) int32 every batch's own ``cu_seqlens`` (b+1 entries each, 0 first), back to back: batch b's
        are ``cu[bounds[b]+b : bounds[b+1]+b+1]``.
    seg: (T,) int64 each token's sequence index inside its batch (mean pooling's segment ids).
    """

    tokens: np.ndarray
    lens: np.ndarray
    order: np.ndarray
    bounds: np.ndarray
    cu: np.ndarray
    seg: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _flatten(token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (T,) int32 ids back to back and (N,) int64 lengths (two ``np.fromiter`` passes)."""
    lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
    flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int32, count=int(lens.sum()))
    return flat, lens


def plan_window(flat: np.ndarray, lens: np.ndarray, batch_size: int, max_tokens: int | None) -> PackedWindow:
    """Sort a window's sequences by length and cut packed batches (all vectorised numpy).

    ``flat`` (T,) token ids of N sequences back to back in input order, ``lens`` (N,) their lengths.
    With ``max_tokens`` a batch takes sorted sequences while their real tokens fit the budget (a single
    longer sequence forms a batch alone): the batch size then adapts to length, thousands of short texts
    or ~128 of 256 tokens, so every forward is large enough to keep the GPU busy. Without it, batches
    hold ``batch_size`` sequences.
    """
    lens = np.asarray(lens, dtype=np.int64)
    n = int(lens.shape[0])
    order = np.argsort(-lens, kind="stable")  # longest first: batches of similar lengths
    slens = lens[order]
    scum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(slens, out=scum[1:])
    if max_tokens is None:
        bounds = np.unique(np.append(np.arange(0, n, batch_size, dtype=np.int64), n))
    else:
        cuts, i = [0], 0
        while i < n:  # one searchsorted per batch: the largest j with scum[j] - scum[i] <= max_tokens
            j = int(np.searchsorted(scum, scum[i] + max_tokens, side="right")) - 1
            i = min(max(j, i + 1), n)
            cuts.append(i)
        bounds = np.asarray(cuts, dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])  # input-order offsets into flat
    total = int(scum[-1])
    gather = np.repeat(starts[order] - scum[:-1], slens) + np.arange(total, dtype=np.int64)  # (T,)
    first = np.repeat(bounds[:-1], np.diff(bounds))  # (S,) first sorted sequence of each one's batch
    local = np.arange(n, dtype=np.int64) - first  # (S,) index inside its batch
    # per-batch cu_seqlens: the window's cumulative lengths rebased at each batch's first token
    cu = np.concatenate([scum[a : b + 1] - scum[a] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]) if n else np.zeros(0)
    return PackedWindow(
        tokens=np.asarray(flat, dtype=np.int64)[gather], lens=slens, order=order.astype(np.int64), bounds=bounds,
        cu=cu.astype(np.int32), seg=np.repeat(local, slens),
    )


class Encoder:
    """A loaded sentence-transformers model plus the fast packed path when its backbone is MosaicBERT.

    ``encode(texts) -> (N, D) float32`` in input order. ``max_seq_len`` may exceed the length the model
    was trained at: MosaicBERT has no position table (ALiBi), so longer inputs simply extrapolate.

    ``max_tokens``: the real-token budget of one packed batch ("auto": 32768 on GPU, where large forwards
    are what keeps it busy, and ``batch_size`` sequences per batch on CPU). ``compile`` ("auto": on GPU)
    compiles each MosaicBERT layer with ``torch.compile`` (dynamic shapes: one graph serves every batch
    size; the 12 layers share it), fusing the residual adds into the LayerNorms: measured on an H100,
    7 % less device time for a few seconds of compilation on the first call. Should compilation fail,
    the first forward says so in a warning and the layers run eagerly.
    """

    def __init__(self, st_model: Any, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                 path: str | None = None, max_tokens: int | str | None = "auto", compile: bool | str = "auto"):
        from sentence_transformers import models

        self.st = st_model
        self.path = path
        self.device = torch.device(st_model.device)
        first = st_model[0]
        if max_seq_len is not None:
            st_model.max_seq_length = max_seq_len
        self.max_seq_len = int(st_model.max_seq_length or 512)
        self.tokenizer = first.tokenizer
        get_dim = getattr(st_model, "get_embedding_dimension", None) or st_model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if max_tokens == "auto":
            max_tokens = DEFAULT_MAX_TOKENS if self.device.type == "cuda" else None
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int, None or 'auto', got {max_tokens!r}")
        self.max_tokens = max_tokens
        if compile == "auto":
            compile = self.device.type == "cuda"
        self._backend = self._truncating_backend()

        # The packed path mirrors exactly [Transformer(MosaicBERT), Pooling(mean|cls), Normalize?].
        modules = list(st_model)
        self.pooling, self.normalize = None, False
        backbone = getattr(first, "auto_model", None)
        if (
            isinstance(first, models.Transformer)
            and backbone is not None
            and getattr(backbone.config, "model_type", None) == "mosaic_bert"
            and len(modules) in (2, 3)
            and isinstance(modules[1], models.Pooling)
            and _pooling_mode(modules[1]) in ("mean", "cls")
            and (len(modules) == 2 or isinstance(modules[2], models.Normalize))
        ):
            self.pooling = _pooling_mode(modules[1])
            self.normalize = len(modules) == 3
            self.backbone = backbone.to(self.dtype).eval()
            self.path_used = PACKED
            if compile:
                for layer in self.backbone.encoder.layers:
                    layer.compile(dynamic=True)  # in place: the module tree (and ST's view of it) is unchanged
        else:
            self.backbone = None
            self.path_used = FALLBACK
        self.compiled = bool(compile and self.backbone is not None)
        self._first_forward = True
        logger.warning("Encoder(%s): %s path, %s, max_seq_len %d, pooling %s, max_tokens %s%s", path,
                       self.path_used, str(self.dtype).replace("torch.", ""), self.max_seq_len,
                       self.pooling or "ST modules", self.max_tokens, ", compiled layers" if self.compiled else "")

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, max_seq_len: int | None = None,
             dtype: torch.dtype | None = None, max_tokens: int | str | None = "auto",
             compile: bool | str = "auto") -> Encoder:
        from sentence_transformers import SentenceTransformer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"encoder folder not found: {path}")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            # else transformers says "Unrecognized model ... should have a `model_type` key", about a missing file
            raise FileNotFoundError(f"{path}: not an encoder folder (no modules.json or config.json); give a "
                                    "train-encoder output or a saved model folder")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        st = SentenceTransformer(str(path), device=device)
        return cls(st, max_seq_len=max_seq_len, dtype=dtype, path=str(path), max_tokens=max_tokens, compile=compile)

    # -- tokenization ---------------------------------------------------------------------------------------

    def _truncating_backend(self) -> Any:
        """A private copy of the fast tokenizer's Rust backend, truncating at ``max_seq_len``, or None.

        Calling the backend directly skips the Python half of ``tokenizer(texts)`` (a BatchEncoding of
        Python lists built per text, about a third of the tokenizer's time, all of it holding the GIL
        that the thread launching GPU work needs). A copy, because the HF wrapper re-sets the backend's
        truncation on every call and this one is used from the tokenizer thread.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(self.max_seq_len, direction=getattr(self.tokenizer, "truncation_side", "right"))
        return copy

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, ``[CLS] ... [SEP]``, truncated to ``max_seq_len``, no padding."""
        return self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_seq_len,
            padding=False, return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]

    def tokenize_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of :meth:`tokenize` as numpy: (T,) int32 all texts back to back and (N,) int64 lengths.

        The Rust tokenizer encodes the batch on all cores with the GIL released; only the per-text
        ``ids`` lists and two ``np.fromiter`` passes run in Python.
        """
        if self._backend is not None:
            ids = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)]
        else:
            ids = self.tokenize(texts)
        return _flatten(ids)

    # -- the packed forward -----------------------------------------------------------------------------------

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """Host -> device without a stream sync (a pageable copy would block until the GPU is idle)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.inference_mode()
    def _embed_packed(self, win: PackedWindow, progress: Any = None) -> torch.Tensor:
        """Every batch of a window -> (S, D) float32 embeddings on the device, in the window's input order.

        The window goes to the device in four copies (tokens, cu_seqlens, segment ids, order); each batch
        is then a slice of them, so the loop issues only device work: no per-batch host->device copy and
        no readback until the whole window is done.
        """
        n = int(win.lens.shape[0])
        out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        tokens, cu, order = self._to_device(win.tokens), self._to_device(win.cu), self._to_device(win.order)
        seg = self._to_device(win.seg) if self.pooling == "mean" else None
        counts = self._to_device(win.lens.astype(np.float32)) if self.pooling == "mean" else None
        scum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(win.lens, out=scum[1:])
        bounds = win.bounds.tolist()
        for b, (a, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            t0, t1 = int(scum[a]), int(scum[e])
            cu_b = cu[a + b : e + b + 1]  # (B+1,) this batch's cu_seqlens
            hidden = self._backbone_forward(input_ids=tokens[t0:t1], cu_seqlens=cu_b,
                                            max_seqlen=int(win.lens[a])).last_hidden_state  # (T_b, H)
            if self.pooling == "cls":
                pooled = hidden.index_select(0, cu_b[:-1].long()).float()  # (B, H): first token of each
            else:
                sums = torch.zeros(e - a, hidden.shape[-1], device=self.device, dtype=torch.float32)
                sums.index_add_(0, seg[t0:t1], hidden.float())  # (B, H) per-sequence sums
                pooled = sums / counts[a:e, None]
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out.index_copy_(0, order[a:e], pooled)
            if progress is not None:
                progress.update(e - a)
        return out

    def _backbone_forward(self, **inputs: Any) -> Any:
        """The backbone on one packed batch; on the first call, a failing compilation falls back to eager."""
        if not self._first_forward or not self.compiled:
            return self.backbone(**inputs)
        self._first_forward = False
        try:
            return self.backbone(**inputs)
        except Exception as err:  # inductor/dynamo errors surface at the first call, with many types
            logger.warning("Encoder: torch.compile of the layers failed (%s: %s); running them eagerly",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            for layer in self.backbone.encoder.layers:
                layer._compiled_call_impl = None  # undoes nn.Module.compile
            self.compiled = False
            return self.backbone(**inputs)

    def embed_tokenized(self, token_ids: Sequence[Sequence[int]], batch_size: int = 128,
                        max_tokens: int | None = None, progress: Any = None) -> np.ndarray:
        """(N,) token lists -> (N, D) float32 in the given order; batches are length-sorted internally.

        ``max_tokens`` cuts batches by real tokens instead of ``batch_size`` sequences.
        """
        win = plan_window(*_flatten(token_ids), batch_size, max_tokens)
        return self._embed_packed(win, progress).cpu().numpy()

    def encode(self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False,
               window: int = 16384) -> np.ndarray:
        """(N,) strings -> (N, D) float32 embeddings, input order (tokenizing ahead, see ``iter_embed``).

        The first window is an eighth of ``window``: the device starts after tokenizing that much instead
        of a whole window, and the next (full) window is tokenized while it runs.
        """
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="embed", disable=not show_progress)
        cuts = [0, min(len(texts), max(1, window // 8))]
        while cuts[-1] < len(texts):
            cuts.append(min(len(texts), cuts[-1] + window))
        windows = ((a, texts[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))
        try:
            parts = [emb for _, emb, _ in self.iter_embed(windows, batch_size, progress=bar)]
        finally:
            bar.close()
        return np.concatenate(parts, axis=0)

    def iter_embed(self, windows: Iterable[tuple[Any, Sequence[str]]], batch_size: int = 128,
                   progress: Any = None) -> Iterator[tuple[Any, np.ndarray, int]]:
        """Embed ``(key, texts)`` windows in order, yielding ``(key, (n, D) float32, real tokens)``.

        A background thread reads, tokenizes and lays out (:func:`plan_window`) window k+1 while the device
        embeds window k: the host work (JSON parsing, WordPiece, sorting) hides behind the forward passes
        instead of adding to them. The thread does almost nothing under the GIL (the Rust tokenizer and
        large numpy operations release it), so it does not slow the thread that launches the GPU work.
        """
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for key, texts in windows:
                    win = None
                    if self.path_used == PACKED:
                        flat, lens = self.tokenize_flat(texts)
                        win = plan_window(flat, lens, batch_size, self.max_tokens)
                    if not put((key, texts, win)):
                        return
                put(None)
            except BaseException as err:  # re-raised in the consumer, message intact
                put(err)

        thread = threading.Thread(target=produce, daemon=True, name="encoder-tokenizer")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                key, texts, win = item
                emb = self.embed_window(texts, win, batch_size, progress=progress)
                yield key, emb, (win.n_tokens if win is not None else 0)
        finally:
            stop.set()
            thread.join(timeout=5)

    def embed_window(self, texts: Sequence[str], win: PackedWindow | None, batch_size: int,
                     progress: Any = None) -> np.ndarray:
        """One window -> (n, D) float32 in input order (one device->host copy for the whole window)."""
        if self.path_used == FALLBACK:  # ST sorts by length and pads per batch itself
            emb = np.asarray(self.st.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=False), dtype=np.float32)
            if progress is not None:
                progress.update(len(texts))
            return emb
        return self._embed_packed(win, progress).cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# streaming a file to disk
# ----------------------------------------------------------------------------------------------------------

EMBEDDINGS, IDS, STATE, PROGRESS_DIR = "embeddings.npy", "ids.jsonl", "embed_state.json", "progress"


def _iter_records(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, raw line) of every non-blank line: record k is the k-th of these."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError as err:  # a binary or non-UTF-8 file (decoded in blocks: no line number)
            bad = err.object[err.start:err.start + 1].hex()
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{bad}: {err.reason}); give a UTF-8 JSON-lines "
                             "file") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # a .gz that is corrupt or cut short
            raise ValueError(f"{path}: not a readable gzip file ({err})") from None


def _record_text(obj: Any, path: Path, lineno: int, text_field: str, title_field: str | None) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object")
    text = obj.get(text_field)
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field '{text_field}' missing or not a string")
    title = obj.get(title_field) if title_field else None
    return f"{title} {text}" if isinstance(title, str) and title else text


def _parse(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


def _count_and_write_ids(path: Path, out: Path, text_field: str, title_field: str | None,
                         id_field: str | None) -> int:
    """Pass 1: validate every record, write ``ids.jsonl`` in input order, return the record count."""
    n = 0
    tmp = out / f".{IDS}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as ids:
            for lineno, line in _iter_records(path):
                obj = _parse(line, path, lineno)
                _record_text(obj, path, lineno, text_field, title_field)
                if id_field is not None:
                    if id_field not in obj:
                        raise ValueError(f"{path}:{lineno}: missing id field '{id_field}'")
                    rid = obj[id_field]
                else:
                    rid = obj.get("_id", obj.get("id", n))
                ids.write(json.dumps(str(rid)) + "\n")
                n += 1
        if n == 0:
            raise ValueError(f"{path}: no records (the file is empty or blank)")
        os.replace(tmp, out / IDS)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _windows(path: Path, window: int, wanted: set[int], text_field: str,
             title_field: str | None) -> Iterator[tuple[int, int, list[str]]]:
    """(window index, first row, texts) for the windows in ``wanted``; others are skipped unparsed."""
    buf: list[tuple[int, str]] = []
    w = row0 = 0
    for row, (lineno, line) in enumerate(_iter_records(path)):
        if row and row % window == 0:
            if w in wanted:
                yield w, row0, [_record_text(_parse(ln, path, no), path, no, text_field, title_field) for no, ln in buf]
            buf, w, row0 = [], w + 1, row
        buf.append((lineno, line))
    if buf and w in wanted:
        yield w, row0, [_record_text(_parse(ln, path, no), path, no, text_field, title_field) for no, ln in buf]


def _dist(device: str | None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a process group is set up if needed:
    NCCL when the ranks run on GPUs (``device`` None or CUDA, and CUDA present), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if on_gpu:
            if local >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK {local} but this machine shows {torch.cuda.device_count()} CUDA device(s): start at "
                    "most one process per GPU (torchrun --nproc_per_node), or run CPU ranks (--device cpu)"
                )
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _done_windows(out: Path) -> set[int]:
    done: set[int] = set()
    for p in sorted((out / PROGRESS_DIR).glob("rank-*.json")):
        done.update(json.loads(p.read_text())["done"])
    return done


def embed_file(
    model: str | Path,
    input_path: str | Path,
    out: str | Path,
    text_field: str = "text",
    title_field: str | None = "title",
    id_field: str | None = None,
    batch_size: int = 128,
    window: int = 16384,
    dtype: str = "float16",
    max_seq_len: int | None = None,
    device: str | None = None,
    show_progress: bool = True,
    max_tokens: int | str | None = "auto",
    compile: bool | str = "auto",
) -> Path:
    """Embed every record of a JSON-lines file (``.gz`` allowed) into ``out/embeddings.npy`` + ``out/ids.jsonl``.

    Rows of ``embeddings.npy`` (N, D) follow input order. Re-running with the same arguments after an
    interruption skips the windows already written; different arguments on an existing ``out`` are an error.
    Under ``torchrun`` window w goes to rank ``w % world_size``; all ranks write the same memmap.
    ``max_tokens`` / ``compile``: packed-batch token budget and layer compilation (see :class:`Encoder`).
    """
    from tqdm.auto import tqdm

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    if batch_size < 1 or window < 1:
        raise ValueError("batch_size and window must be >= 1")
    input_path, out = Path(input_path), Path(out)
    if not input_path.is_file():
        raise FileNotFoundError(f"input not found: {input_path}")
    rank, world, local = _dist(device)
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local}"
    t_start = time.perf_counter()
    encoder = Encoder.load(model, device=device, max_seq_len=max_seq_len, max_tokens=max_tokens, compile=compile)

    stat = input_path.stat()
    settings = {
        "input": str(input_path.resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
        "model": str(Path(model).resolve()), "max_seq_len": encoder.max_seq_len, "dtype": dtype,
        "window": window, "text_field": text_field, "title_field": title_field, "id_field": id_field,
        "dim": encoder.dim,
    }
    key = sha256_json(settings)
    if rank == 0:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / STATE
        state = json.loads(state_path.read_text()) if state_path.is_file() else None
        if state is not None and state.get("key") != key:
            raise ValueError(
                f"{out} holds embeddings made with other settings ({state_path}); use a new --out or delete it"
            )
        if state is None or not (out / EMBEDDINGS).is_file() or not (out / IDS).is_file():
            try:
                n = _count_and_write_ids(input_path, out, text_field, title_field, id_field)
            except BaseException:
                if created:  # a bad input file leaves no output folder behind
                    shutil.rmtree(out, ignore_errors=True)
                raise
            np.lib.format.open_memmap(out / EMBEDDINGS, mode="w+", dtype=dtype, shape=(n, encoder.dim)).flush()
            (out / PROGRESS_DIR).mkdir(exist_ok=True)
            for stale in (out / PROGRESS_DIR).glob("rank-*.json"):
                stale.unlink()
            atomic_write_json(state_path, {"key": key, "n": n, "complete": False, **settings})
    _barrier(world)
    state = json.loads((out / STATE).read_text())
    n = state["n"]
    emb = np.lib.format.open_memmap(out / EMBEDDINGS, mode="r+")
    n_windows = (n + window - 1) // window
    done = _done_windows(out)
    mine = {w for w in range(n_windows) if w % world == rank and w not in done}
    my_progress = out / PROGRESS_DIR / f"rank-{rank}.json"
    my_done = sorted(json.loads(my_progress.read_text())["done"]) if my_progress.is_file() else []
    if done and rank == 0:
        logger.warning("embed: resuming, %d of %d windows already written", len(done), n_windows)

    rows_mine = sum(min(window, n - w * window) for w in mine)
    bar = tqdm(total=rows_mine, desc=f"embed[{rank}]", disable=not show_progress or rank != 0, unit="doc")
    windows = (((w, row0), texts) for w, row0, texts in _windows(input_path, window, mine, text_field, title_field))
    real_tokens = 0
    try:
        for (w, row0), vectors, tokens in encoder.iter_embed(windows, batch_size, progress=bar):
            emb[row0 : row0 + len(vectors)] = vectors.astype(dtype, copy=False)
            emb.flush()  # rows on disk before the progress file says so
            real_tokens += tokens
            my_done.append(w)
            atomic_write_json(my_progress, {"done": sorted(my_done)})
    finally:
        bar.close()
    del emb
    _barrier(world)
    if rank == 0:
        missing = set(range(n_windows)) - _done_windows(out)
        if missing:
            raise RuntimeError(f"embed: windows {sorted(missing)[:5]}... were not written; re-run to resume")
        state["complete"] = True
        atomic_write_json(out / STATE, state)
        write_manifest(
            out, "embed", config=None,
            inputs={"input": str(input_path), "model": str(model)},
            outputs={"embeddings": EMBEDDINGS, "ids": IDS, "shape": [n, encoder.dim], "dtype": dtype},
            timings={"total_s": time.perf_counter() - t_start, "real_tokens_rank0": real_tokens},
            settings=settings, path=encoder.path_used, world_size=world,
        )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def load_embeddings(out: str | Path) -> tuple[np.ndarray, list[str]]:
    """Open ``embed_file`` output: (N, D) memory-mapped array (read-only) and the N ids in input order."""
    out = Path(out)
    state = out / STATE
    if not state.is_file() or not json.loads(state.read_text()).get("complete"):
        raise ValueError(f"{out}: embeddings are incomplete (interrupted run?); re-run `mosaic-embed embed` to resume")
    with open(out / IDS, encoding="utf-8") as f:
        ids = [json.loads(line) for line in f]
    return np.load(out / EMBEDDINGS, mmap_mode="r"), ids


def iter_texts(input_path: str | Path, text_field: str = "text", title_field: str | None = "title") -> Iterator[str]:
    """The texts ``embed_file`` embedded, streamed in input order (row r of ``embeddings.npy`` is text r)."""
    path = Path(input_path)
    for lineno, line in _iter_records(path):
        yield _record_text(_parse(line, path, lineno), path, lineno, text_field, title_field)
