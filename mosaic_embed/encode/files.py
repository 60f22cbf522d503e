"""Embedding a file: JSON lines -> ``embeddings.npy`` (memory-mapped, input order) + ``ids.jsonl``, resumable.

``embed_file(cfg)`` streams an input of any size (one pass validates every record, writes the ids and
hashes the file; one pass embeds), writes ``embeddings.npy`` through ``np.lib.format.open_memmap`` and
checkpoints progress per window, so an interrupted run resumes where it stopped. Under ``torchrun`` window
w goes to rank ``w % world_size`` and all ranks write the one memmap.

A run folder is tied to what made it: the input's content hash and the encoder's identity (a hash of its
weights and configuration) are recorded, and resuming or extending a folder with another input or another
encoder is refused. One writer at a time (``artifacts.writer_lock``). A vector that is not finite is an
error naming the record it came from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    atomic_write_json,
    read_json,
    remove_temporaries,
    sha256_file,
    sha256_json,
    write_manifest,
    writer_lock,
)
from ..config import EmbedConfig
from ..data.corpus import iter_lines, parse_json_object, record_id
from ..runtime import dist_state
from .packed import Encoder

logger = logging.getLogger(__name__)

EMBEDDINGS, IDS, STATE, PROGRESS_DIR = "embeddings.npy", "ids.jsonl", "embed_state.json", "progress"


def record_text(obj: dict[str, Any], path: Path, lineno: int, text_field: str, title_field: str | None) -> str:
    """The text embedded for one record: ``title text`` when it has a non-empty title, else ``text``."""
    text = obj.get(text_field)
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field '{text_field}' missing or not a string")
    title = obj.get(title_field) if title_field else None
    return f"{title} {text}" if isinstance(title, str) and title else text


def _count_and_write_ids(cfg: EmbedConfig, out: Path) -> int:
    """Pass 1: validate every record, write ``ids.jsonl`` in input order, return the record count."""
    n = 0
    tmp = out / f".{IDS}.tmp"
    path = cfg.input
    try:
        with open(tmp, "w", encoding="utf-8") as ids:
            for lineno, line in iter_lines(path):
                obj = parse_json_object(line, path, lineno)
                record_text(obj, path, lineno, cfg.text_field, cfg.title_field)
                ids.write(json.dumps(record_id(obj, path, lineno, cfg.id_field, n)) + "\n")
                n += 1
        if n == 0:
            raise ValueError(f"{path}: no records (the file is empty or blank)")
        tmp.replace(out / IDS)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _windows(cfg: EmbedConfig, wanted: set[int]) -> Iterator[tuple[int, int, list[int], list[str]]]:
    """(window index, first row, line numbers, texts) for the windows in ``wanted``; others are skipped unparsed."""
    path, window = cfg.input, cfg.window
    buf: list[tuple[int, str]] = []
    w = row0 = 0

    def texts() -> list[str]:
        return [record_text(parse_json_object(ln, path, no), path, no, cfg.text_field, cfg.title_field)
                for no, ln in buf]

    for row, (lineno, line) in enumerate(iter_lines(path)):
        if row and row % window == 0:
            if w in wanted:
                yield w, row0, [no for no, _ in buf], texts()
            buf, w, row0 = [], w + 1, row
        buf.append((lineno, line))
    if buf and w in wanted:
        yield w, row0, [no for no, _ in buf], texts()


def _done_windows(out: Path) -> set[int]:
    done: set[int] = set()
    for p in sorted((out / PROGRESS_DIR).glob("rank-*.json")):
        done.update(read_json(p)["done"])
    return done


def embed_settings(cfg: EmbedConfig, encoder: Encoder, input_sha256: str) -> dict[str, Any]:
    """What the vectors of a run folder depend on; a folder is only ever resumed or reused with the same."""
    return {
        "input": str(cfg.input.resolve()), "input_sha256": input_sha256,
        "encoder": encoder.describe(), "dtype": cfg.dtype, "window": cfg.window,
        "text_field": cfg.text_field, "title_field": cfg.title_field, "id_field": cfg.id_field,
        "prompt_name": cfg.prompt_name,
    }


def _check_finite(vectors: np.ndarray, lines: list[int], cfg: EmbedConfig) -> None:
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = int(np.argmax(bad))
        raise FloatingPointError(
            f"{cfg.input}:{lines[first]}: the encoder produced a non-finite embedding (NaN/inf) for this record "
            f"({int(bad.sum())} such records in its window); the encoder's weights may be broken"
        )


def embed_file(cfg: EmbedConfig, show_progress: bool = True) -> Path:
    """Embed every record of ``cfg.input`` into ``cfg.out/embeddings.npy`` + ``cfg.out/ids.jsonl``; returns ``cfg.out``.

    Re-running with the same config after an interruption skips the windows already written; an existing
    folder made from another input, encoder or settings is an error.
    """
    out = Path(cfg.out)
    if not Path(cfg.input).is_file():
        raise FileNotFoundError(f"input not found: {cfg.input}")
    t_start = time.perf_counter()
    state_dist = dist_state(cfg.encode.device if cfg.encode.device != "auto" else None)
    rank, world = state_dist.process_index, state_dist.num_processes
    encoder = Encoder.load(cfg.model, cfg.encode)
    t_loaded = time.perf_counter()

    created = not out.exists()
    try:
        # a second writer stops here, before it reads or removes anything of the folder
        with writer_lock(out, "mosaic-embed embed") if rank == 0 else contextlib.nullcontext():
            try:
                _embed_locked(cfg, encoder, out, rank, world, state_dist, show_progress, t_start, t_loaded)
            except BaseException:
                if rank == 0 and created and not (out / STATE).is_file():
                    shutil.rmtree(out, ignore_errors=True)  # a bad input leaves no output folder behind
                raise
    finally:
        if world > 1:
            state_dist.destroy_process_group()
    return out


def _embed_locked(cfg: EmbedConfig, encoder: Encoder, out: Path, rank: int, world: int, state_dist: Any,
                  show_progress: bool, t_start: float, t_loaded: float) -> None:
    """The body of :func:`embed_file`, run while rank 0 holds the folder's lock."""
    from tqdm.auto import tqdm

    if rank == 0:
        remove_temporaries(out)  # of a killed writer: the lock is ours
        remove_temporaries(out / PROGRESS_DIR)
        settings = embed_settings(cfg, encoder, sha256_file(cfg.input))
        key = sha256_json(settings)
        state_path = out / STATE
        state = read_json(state_path) if state_path.is_file() else None
        if state is not None and state.get("key") != key:
            raise ValueError(f"{out} holds embeddings made {_difference(state, settings)}; "
                             "use a new --out or delete it")
        if state is None or not (out / EMBEDDINGS).is_file() or not (out / IDS).is_file():
            n = _count_and_write_ids(cfg, out)
            np.lib.format.open_memmap(out / EMBEDDINGS, mode="w+", dtype=cfg.dtype,
                                      shape=(n, encoder.dim)).flush()
            (out / PROGRESS_DIR).mkdir(exist_ok=True)
            for stale in (out / PROGRESS_DIR).glob("rank-*.json"):
                stale.unlink()
            atomic_write_json(state_path, {"key": key, "n": n, "complete": False, **settings})
    state_dist.wait_for_everyone()
    n_tokens, t_first = _embed_windows(cfg, encoder, out, rank, world, show_progress, tqdm)
    state_dist.wait_for_everyone()
    if rank == 0:
        state = read_json(out / STATE)
        n = state["n"]
        missing = set(range((n + cfg.window - 1) // cfg.window)) - _done_windows(out)
        if missing:
            raise RuntimeError(f"embed: windows {sorted(missing)[:5]}... were not written; re-run to resume")
        state["complete"] = True
        atomic_write_json(out / STATE, state)
        write_manifest(
            out, "embed", cfg,
            inputs={"input": str(Path(cfg.input).resolve()), "input_sha256": state["input_sha256"],
                    "model": str(Path(cfg.model).resolve())},
            outputs={"embeddings": EMBEDDINGS, "ids": IDS, "shape": [n, encoder.dim], "dtype": cfg.dtype},
            timings={"total_s": time.perf_counter() - t_start, "load_s": t_loaded - t_start,
                     "first_window_after_load_s": (t_first - t_loaded) if t_first else None,
                     "real_tokens_rank0": n_tokens},
            encoder=state["encoder"], path=encoder.path_used, world_size=world,
        )
    return out


def _difference(state: dict[str, Any], settings: dict[str, Any]) -> str:
    """Say which recorded setting differs: the encoder, the input, or another option."""
    if state.get("encoder", {}).get("identity") != settings["encoder"]["identity"]:
        return "by another encoder (its weights or configuration differ)"
    if state.get("input_sha256") != settings["input_sha256"]:
        return "from another input (its content changed)"
    changed = sorted(k for k in settings if k not in ("encoder", "input_sha256") and state.get(k) != settings[k])
    return "with other settings (" + ", ".join(changed or ["encoder settings"]) + ")"


def _embed_windows(cfg: EmbedConfig, encoder: Encoder, out: Path, rank: int, world: int, show_progress: bool,
                   tqdm: Any) -> tuple[int, float | None]:
    """Embed this rank's windows that are not done yet; returns (real tokens embedded, the clock when the
    first window was on disk: the start-up a user waits for)."""
    n = read_json(out / STATE)["n"]
    window = cfg.window
    emb = np.lib.format.open_memmap(out / EMBEDDINGS, mode="r+")
    n_windows = (n + window - 1) // window
    done = _done_windows(out)
    mine = {w for w in range(n_windows) if w % world == rank and w not in done}
    my_progress = out / PROGRESS_DIR / f"rank-{rank}.json"
    my_done = sorted(read_json(my_progress)["done"]) if my_progress.is_file() else []
    if done and rank == 0:
        logger.warning("embed: resuming, %d of %d windows already written", len(done), n_windows)
    rows_mine = sum(min(window, n - w * window) for w in mine)
    bar = tqdm(total=rows_mine, desc=f"embed[{rank}]", disable=not show_progress or rank != 0, unit="doc")
    windows = (((w, row0, lines), texts) for w, row0, lines, texts in _windows(cfg, mine))
    real_tokens, t_first = 0, None
    try:
        for (w, row0, lines), vectors, tokens in encoder.iter_embed(windows, progress=bar, prompt_name=cfg.prompt_name):
            _check_finite(vectors, lines, cfg)
            emb[row0 : row0 + len(vectors)] = vectors.astype(cfg.dtype, copy=False)
            emb.flush()  # rows on disk before the progress file says so
            real_tokens += tokens
            my_done.append(w)
            atomic_write_json(my_progress, {"done": sorted(my_done)})
            t_first = t_first or time.perf_counter()
    finally:
        bar.close()
        del emb
    return real_tokens, t_first


def load_embeddings(out: str | Path) -> tuple[np.ndarray, list[str]]:
    """Open ``embed_file`` output: (N, D) memory-mapped array (read-only) and the N ids in input order.

    An interrupted run, a missing or truncated file is an error naming the file and what is wrong.
    """
    out = Path(out)
    state_path = out / STATE
    if not state_path.is_file() or not read_json(state_path).get("complete"):
        raise ValueError(f"{out}: embeddings are incomplete (interrupted run?); re-run `mosaic-embed embed` to resume")
    state = read_json(state_path)
    path = out / EMBEDDINGS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the embedding run folder is incomplete)")
    try:
        vectors = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # zero bytes, a cut-off header, or data shorter than declared
        size = path.stat().st_size
        raise ValueError(f"{path}: not a readable .npy file ({size} bytes: {err}); re-run `mosaic-embed embed` "
                         "into a new folder") from None
    if vectors.ndim != 2 or vectors.shape[0] != state["n"]:
        raise ValueError(f"{path}: shape {vectors.shape} but the run embedded {state['n']} records")
    with open(out / IDS, encoding="utf-8") as f:
        ids = [json.loads(line) for line in f]
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{out / IDS}: {len(ids)} ids for {vectors.shape[0]} embedding rows")
    return vectors, ids


def iter_texts(input_path: str | Path, text_field: str = "text", title_field: str | None = "title") -> Iterator[str]:
    """The texts ``embed_file`` embedded, streamed in input order (row r of ``embeddings.npy`` is text r)."""
    path = Path(input_path)
    for lineno, line in iter_lines(path):
        yield record_text(parse_json_object(line, path, lineno), path, lineno, text_field, title_field)
