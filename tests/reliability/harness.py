"""Kill -9 harness: run a real ``mosaic-embed`` process, kill it at a seeded point, check what it left.

A *kill point* is a milestone the process makes visible on disk (a lock file, the n-th checkpoint, the n-th
embedded window) plus a seeded random delay after it: the kill lands somewhere in the work that follows,
a different place for each seed, the same place class every run. Tests then resume (or re-run) the stage
and compare the result with an uninterrupted run.

To add a stage (``index build``/``index add``): pick milestones from what the stage writes (``file_appears``,
``count_at_least``, ``file_contains``), call :func:`kill_at` with the stage's command line, run it again to completion, and
check :func:`leftovers` of the folders it writes and the result against an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Names a writer uses for what is not finished yet (artifacts.py temporaries, staging folders, the lock).
PARTIAL_MARKERS = (".tmp", ".old-", ".partial", ".staging", ".writer")


def cli(*args: str) -> list[str]:
    """The console command, run as ``python -m mosaic_embed.cli`` with this interpreter and import path."""
    return [sys.executable, "-m", "mosaic_embed.cli", *map(str, args)]


def env() -> dict[str, str]:
    """One thread (the same arithmetic as an in-process run under :func:`one_thread`), no GPU, no rank
    variables of an outer launcher."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    return e


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch in this process with one thread, as the subprocesses do, so results compare bitwise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a kill reaches any child it made), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300.0) -> bool:
    """Poll until ``condition()`` holds (True) or the process has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError(f"{proc.args[3:6]}: milestone not reached in {timeout:.0f} s")


def file_appears(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()


def count_at_least(folder: Path, pattern: str, n: int) -> Callable[[], bool]:
    return lambda: len(list(folder.glob(pattern))) >= n


def file_contains(path: Path, text: str) -> Callable[[], bool]:
    def condition() -> bool:
        try:
            return text in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return condition


@dataclass
class KillPoint:
    """``milestone`` (a description and its condition) then ``delay`` seconds: where the kill lands."""

    name: str
    condition: Callable[[], bool]
    delay: float


def seeded_delays(seed: int, n: int, low: float, high: float) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(low, high), 3) for _ in range(n)]


@dataclass
class Killed:
    point: str
    killed: bool  # False: the process finished before the kill landed
    returncode: int | None
    log: str


def kill_at(cmd: list[str], point: KillPoint, log: Path, timeout: float = 300.0) -> Killed:
    """Run ``cmd``, wait for the kill point's milestone and delay, then SIGKILL its process group."""
    proc = start(cmd, log)
    try:
        reached = wait_until(proc, point.condition, timeout)
        if reached and proc.poll() is None:
            time.sleep(point.delay)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Killed(point.name, killed, proc.returncode, log.read_text(errors="replace"))


def leftovers(*folders: Path) -> list[Path]:
    """Everything under ``folders`` whose name marks an unfinished write (temporaries, staging, locks)."""
    found = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob(".*") if any(m in p.name for m in PARTIAL_MARKERS)]
    return sorted(found)
