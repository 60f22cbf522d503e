"""Run folders and their files: atomic writes, content hashes and the ``manifest.json`` every stage leaves.

Nothing a stage writes is ever half-written: files go to a temporary sibling and are renamed into place,
folders are built under a temporary name and renamed when complete. A reader therefore sees either the
old artifact or the new one, never a torn one, even if the process is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give under the current umask.

    ``mkstemp``/``mkdtemp`` create 0600/0700 entries (private while half-written); once renamed into place an
    artifact must be as readable as any other file the user writes (a shared run or cache folder).
    """
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    >>> with atomic_directory("runs/x/final") as tmp:
    ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_fingerprint(folder: str | Path, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 over a folder's files (relative path and content, in sorted order), hidden files and the
    names in ``exclude`` left out: the identity of a saved model, wherever it is copied.

    Hashing a 500 MB model takes about a second, at every start-up that checks an identity; so the result is
    kept in ``~/.cache/mosaic_embed/fingerprints/`` keyed by the folder's path, and reused while every
    file's size and modification time are unchanged (git's index makes the same bet).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or rel.name in exclude or "__pycache__" in rel.parts:
            continue
        st = path.stat()
        files.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    cache = Path(os.environ.get("MOSAIC_EMBED_CACHE", "~/.cache/mosaic_embed")).expanduser() / "fingerprints" / (
        hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32] + ".json")
    stats = [list(f) for f in files]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached["files"] == stats:
            return cached["sha256"]
    h = hashlib.sha256()
    for rel, _, _ in files:
        h.update(rel.encode() + b"\0")
        h.update(sha256_file(folder / rel).encode())
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only home only costs the next start-up a re-hash
        atomic_write_json(cache, {"folder": str(folder.resolve()), "files": stats, "sha256": digest})
    return digest


def sha256_json(obj: Any) -> str:
    """Stable hash of JSON-able data (keys sorted): for cache keys built from settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str:
    """The source commit behind this run: ``$MOSAIC_COMMIT`` if set (a copy of the tree without .git, e.g.
    on a GPU host), else ``git rev-parse HEAD`` of the checkout this package is imported from, else "unknown".
    """
    if os.environ.get("MOSAIC_COMMIT"):
        return os.environ["MOSAIC_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def package_version() -> str:
    from . import __version__

    return __version__


def environment() -> dict[str, Any]:
    """What produced an artifact: versions that change numerics or formats."""
    env: dict[str, Any] = {
        "mosaic_embed": package_version(),
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for mod in ("torch", "transformers", "triton", "sentence_transformers", "datasets", "faiss"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", "?")
    return env


def write_manifest(
    run_dir: str | Path,
    stage: str,
    config: Any = None,
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    **extra: Any,
) -> Path:
    """Write ``run_dir/manifest.json``: stage, config, inputs (paths and hashes), outputs, timings, versions."""
    from .config import to_dict

    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(config) if config is not None else None,
        "inputs": inputs or {},
        "outputs": outputs or {},
        "timings": timings or {},
        "environment": environment(),
        **extra,
    }
    return atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def read_json(path: str | Path, what: str = "valid JSON") -> Any:
    """Parse a JSON file; a file that is not UTF-8 JSON is a ValueError naming it: ``{path}: not {what} (...)``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not {what} ({err})") from None


def read_manifest(run_dir: str | Path, expect_stage: str | None = None) -> dict[str, Any]:
    """Read a run folder's manifest; with ``expect_stage``, a manifest from another stage is an error."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {MANIFEST} (is this a mosaic-embed run folder?)")
    manifest = read_json(path, "a valid manifest")
    if expect_stage is not None and manifest.get("stage") != expect_stage:
        raise ValueError(f"{path}: made by stage '{manifest.get('stage')}', expected '{expect_stage}'")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# one writer per folder
# ----------------------------------------------------------------------------------------------------------

LOCK = ".writer.lock"


class FolderLockedError(RuntimeError):
    """Another live process is writing the folder (its pid, host and start time are in the message)."""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``), or None where unknown: with the
    pid it tells a lock holder from an unrelated process that was given the same pid later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime); the command name (field 2) may hold spaces, so count from its closing parenthesis
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    # the pid exists: it is the holder unless the holder's recorded start time says it is another process
    return started is None or _process_start(pid) in (None, started)


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str = "writer", remove_empty: bool = False) -> Iterator[Path]:
    """Hold ``folder/.writer.lock`` while writing a run folder or store: one writer at a time.

    The lock file is created with ``O_EXCL`` and names the holder (pid, its start time, host, command, since
    when). A second writer gets a :class:`FolderLockedError` naming the holder; readers never look at it. A
    lock left by a process that died (same host, pid gone or now another process) is stale: it is taken over,
    and that is said in the log. A lock from another host cannot be checked and is never broken silently
    (the message says how to remove it). On release the file is removed only if it is still this process's
    (a writer that deleted its folder, and a successor that locked it anew, keep theirs); ``remove_empty``
    then also removes the folder if nothing else is left in it (a scratch folder).
    """
    import logging
    import socket

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"pid": os.getpid(), "started": _process_start(os.getpid()), "host": socket.gethostname(), "what": what,
          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:6]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid, holder.get("started")):
                logging.getLogger(__name__).warning("%s: removing a stale lock of pid %s (no longer running)",
                                                    folder, pid)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise FolderLockedError(
                f"{folder} is being written by another process ({holder.get('what', 'writer')}, pid {pid} on "
                f"{host}, since {holder.get('since')}); wait for it to finish"
                + ("" if host == me["host"] else f", or delete {path} if that process is gone")
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        held = _holder(path)
        if held.get("pid") == me["pid"] and held.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if remove_empty:
            with contextlib.suppress(OSError):  # not empty (another writer's lock, files): leave it
                folder.rmdir()


def is_temporary(entry: str, name: str = "") -> bool:
    """Whether the folder entry named ``entry`` is what a killed writer leaves of the artifact ``name`` ("" = of
    any): a temporary of :func:`atomic_write_bytes` or :func:`atomic_directory` (``.NAME.*.tmp``) or a replaced
    folder (``.NAME.old-PID``)."""
    return entry.startswith(f".{name}." if name else ".") and (entry.endswith(".tmp") or ".old-" in entry)


def remove_temporaries(folder: str | Path, name: str = "") -> list[Path]:
    """Remove what killed writers leave in ``folder``: the temporaries of :func:`atomic_write_bytes` and
    :func:`atomic_directory` (``.NAME.*.tmp``) and replaced folders (``.NAME.old-PID``), of the artifact
    ``name`` ("" = of any). Call it only while holding the lock of everything written under those names
    (a live writer's temporaries look the same). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not is_temporary(entry.name, name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed
