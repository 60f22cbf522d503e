"""Reading a pretraining run's checkpoints: which exist, and how long each was pretrained (no torch import).

A run folder (``train/pretrain.py``) holds ``checkpoints/step-NNNNNN/`` folders, each complete once its
``checkpoint_meta.json`` exists (they appear by rename), and ``final/`` with a ``manifest.json``. These
readers need only the file system, so tools that steer long runs (``benchmarks/pareto/run.py``) or list
their points start in a fraction of a second instead of importing the trainer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..artifacts import read_json

CHECKPOINT_META = "checkpoint_meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir_or_ckpts: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with ``checkpoint_meta.json``), sorted by step."""
    root = Path(run_dir_or_ckpts)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / CHECKPOINT_META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def pretraining_meta(model_dir: str | Path) -> dict[str, Any]:
    """How long the checkpoint was pretrained: ``checkpoint_meta.json``, else the folder's ``manifest.json``.

    Returns ``{"wall_clock_s", "step", "tokens_seen", "source"}`` (values None when unknown).
    """
    model_dir = Path(model_dir)
    meta: dict[str, Any] = {"wall_clock_s": None, "step": None, "tokens_seen": None, "source": None}
    cm = model_dir / CHECKPOINT_META
    if cm.is_file():
        data = read_json(cm)
        if "wall_clock_s" not in data:
            raise ValueError(f"{cm}: no 'wall_clock_s' field")
        meta.update({k: data.get(k) for k in ("wall_clock_s", "step", "tokens_seen")}, source=str(cm.resolve()))
        return meta
    mf = model_dir / "manifest.json"
    if mf.is_file():
        data = read_json(mf)
        # A pretraining manifest keeps the run's totals; accept the few names a run may use for them.
        pools = [data, data.get("timings") or {}, data.get("outputs") or {}, data.get("final") or {}]
        for pool in pools:
            if not isinstance(pool, dict):
                continue
            for key in ("wall_clock_s", "train_wall_clock_s", "train_s", "pretrain_s", "total_s"):
                if isinstance(pool.get(key), int | float) and meta["wall_clock_s"] is None:
                    meta["wall_clock_s"] = float(pool[key])
            for key in ("step", "steps", "global_step"):
                if isinstance(pool.get(key), int) and meta["step"] is None:
                    meta["step"] = pool[key]
            if isinstance(pool.get("tokens_seen"), int) and meta["tokens_seen"] is None:
                meta["tokens_seen"] = pool["tokens_seen"]
        if meta["wall_clock_s"] is not None:
            meta["source"] = str(mf.resolve())
    return meta


__all__ = ["CHECKPOINT_META", "latest_checkpoint", "list_checkpoints", "pretraining_meta"]
