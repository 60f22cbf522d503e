"""Tokenization in worker processes, for the Encoder on a GPU.

The Rust tokenizer encodes a batch on all cores with the GIL released, but what follows is Python: one
``ids`` list per text, then flattening those lists into arrays. In the process that also launches the GPU
work those seconds hold the GIL the launching thread needs, and the tokenizer's own thread pool takes the
cores it runs on. Here each worker process owns a single-threaded copy of the tokenizer and returns two
numpy arrays per chunk of texts, so the embedding process only concatenates them.

This module imports neither torch nor transformers: workers are started with ``spawn`` (``fork`` would
copy a CUDA context and the tokenizer's thread pool) and import only what they run.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Texts per task: fewer and the per-task overhead (pickling, a queue round trip) shows; more and a window
#: is cut into too few pieces to use every worker.
MIN_CHUNK = 256


def flatten(seqs: Sequence[Sequence[int]], dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (T,) ids back to back and (B,) int64 lengths (two ``np.fromiter`` passes, no copies)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def default_workers(cpu_count: int | None = None) -> int:
    """Worker processes when the Encoder runs on a GPU: all cores but two (the launching thread and the
    thread feeding the workers), at most 8 (measured enough to stay ahead of an H200), none below 4 cores."""
    cores = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                    else os.cpu_count() or 1)
    return 0 if cores < 4 else min(8, cores - 2)


_TOKENIZER: Any = None  # the worker's own tokenizer (set by _start_worker)


def _start_worker(tokenizer_json: str, max_len: int, side: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    from tokenizers import Tokenizer

    global _TOKENIZER
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len, direction=side)
    _TOKENIZER = tokenizer


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return flatten([e.ids for e in _TOKENIZER.encode_batch(texts, add_special_tokens=True)], np.int32)


def _ready() -> int:
    return os.getpid()


class TokenizerWorkers:
    """A pool of ``workers`` processes, each with a copy of one fast tokenizer truncating at ``max_len``.

    ``tokenize_flat(texts)`` cuts the texts into chunks, one task each, and returns what
    :meth:`mosaic_embed.encode.Encoder.tokenize_flat` returns: (T,) int32 ids back to back, (N,) int64 lengths.
    ``start()`` launches the processes without waiting for them, so they start while other work runs.
    """

    def __init__(self, tokenizer_json: str, max_len: int, side: str = "right", workers: int = 4):
        if workers < 1:
            raise ValueError(f"TokenizerWorkers: workers must be >= 1, got {workers}")
        self.workers = workers
        self._args = (tokenizer_json, int(max_len), side)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> list[Future]:
        """Launch the processes (once); returns a future per worker that resolves when it is up."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=self._args)
        return [self._pool.submit(_ready) for _ in range(self.workers)]

    def tokenize_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = list(texts)
        if self._pool is None:
            self.start()
        size = max(MIN_CHUNK, -(-len(texts) // (2 * self.workers)))  # ~2 tasks per worker: uneven chunks even out
        futures = [self._pool.submit(_encode_chunk, texts[i : i + size]) for i in range(0, len(texts), size)]
        parts = [f.result() for f in futures]
        if not parts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> TokenizerWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
