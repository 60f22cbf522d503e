"""``make demo`` / ``mosaic-embed demo``: the pipeline's stages, one after another, on the bundled sample corpus.

Each stage is a plain function call on the previous stage's output, with a tiny recipe, so the whole demo
runs on a laptop CPU. Stages are appended here as they are built (data -> pretrain -> GLUE -> encoder ->
index); each writes its own folder under ``out``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import read_manifest
from .config import DataConfig


def run_demo(out: str | Path = "runs/demo", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage that exists on the bundled corpus into ``out``; returns each stage's output folder."""
    from .data.shards import format_shards_summary, prepare_shards

    out = Path(out)
    results: dict[str, Any] = {}

    # 1. data: bundled Moby-Dick -> bert-base-uncased token shards (reused while the inputs are unchanged).
    log("== data: corpus -> token shards")
    # DataConfig() is recipes/data/default.yaml (a test checks they agree); building it directly keeps the demo
    # working from an installed wheel, which carries no recipes/ folder.
    data_cfg = DataConfig(out=out / "shards")
    results["shards"] = prepare_shards(data_cfg, log=log)
    log(format_shards_summary(read_manifest(results["shards"], expect_stage="data")))

    return results
