"""`make demo`: every stage on the bundled corpus, end to end on CPU (about a minute)."""

import json

from click.testing import CliRunner

from mosaic_embed.artifacts import read_manifest
from mosaic_embed.cli import main
from mosaic_embed.index.store import VectorStore


def test_demo_runs_every_stage_and_reuses_its_pretraining(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shards = read_manifest(out / "shards", expect_stage="data")
    assert shards["corpus_summary"]["documents"] == 139
    assert shards["outputs"]["train"]["documents"] + shards["outputs"]["validation"]["documents"] == 139
    pretrain = read_manifest(out / "pretrain" / "final", expect_stage="pretrain")
    assert pretrain["final_eval"]["eval_loss"] < 10.0  # fell from ln(30528) ~ 10.3
    passages = [json.loads(line) for line in (out / "passages.jsonl").read_text().splitlines()]
    assert len({p["text"] for p in passages}) == len(passages)  # repeated passages kept once
    store = VectorStore(out / "store")
    assert len(store) == len(passages)
    assert read_manifest(out / "embeddings", expect_stage="embed")["encoder"]["max_seq_len"] == 128
    for query in ("the white whale", "Queequeg and his harpoon"):
        assert f"query: {query}" in result.output

    again = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert f"reusing {out / 'pretrain' / 'final'}" in again.output
