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

    # 2. pretrain: a tiny MosaicBERT (recipes/pretrain/tiny.yaml) on those shards, fp32 on CPU, ~1 minute.
    from .config import PretrainConfig, load_config
    from .train.pretrain import latest_checkpoint, pretrain

    log("== pretrain: MLM on the shards -> a backbone in pretrain/final")
    pre_dir = out / "pretrain"
    pre_cfg = load_config(PretrainConfig, "tiny", [f"out={pre_dir}", f"data.out={out / 'shards'}"], stage="pretrain")
    if (pre_dir / "final" / "manifest.json").is_file():
        log(f"reusing {pre_dir / 'final'} (delete it to pretrain again)")
    else:  # a demo interrupted mid-way continues from its last checkpoint
        pretrain(pre_cfg, resume=latest_checkpoint(pre_dir) is not None)
    final = read_manifest(pre_dir / "final", expect_stage="pretrain")
    log(f"pretrained {final['outputs']['parameters']:,} parameters on {final['tokens_seen']:,} tokens in "
        f"{final['timings']['wall_clock_s']:.0f} s; validation MLM loss {final['final_eval']['eval_loss']:.3f}, "
        f"accuracy {final['final_eval']['eval_accuracy']:.3f}")
    results["pretrain"] = pre_dir / "final"

    return results
