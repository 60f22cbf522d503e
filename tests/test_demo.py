"""`make demo`: every stage on the bundled corpus, end to end on CPU, ending with relevant hits and scores."""

import json

from click.testing import CliRunner

from mosaic_embed.artifacts import read_manifest
from mosaic_embed.cli import main
from mosaic_embed.data.beir import load_beir
from mosaic_embed.index.store import VectorStore


def test_demo_runs_every_stage_and_reuses_its_pretraining(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shards = read_manifest(out / "shards", expect_stage="data")
    assert shards["corpus_summary"]["documents"] == 139
    pretrain = read_manifest(out / "pretrain" / "final", expect_stage="pretrain")
    assert pretrain["final_eval"]["eval_loss"] < 10.0  # fell from ln(30528) ~ 10.3
    chapters = load_beir(out / "chapters")
    assert len(chapters.queries) == 20 and all(q.startswith("q") for q in chapters.queries)
    store = VectorStore(out / "store")
    assert len(store) >= len(chapters.corpus) and store.lexical is not None
    for query in ("a sermon about Jonah and the whale", "Queequeg's little idol"):
        assert f"query: {query}" in result.output
    # the labelled scores are printed and are real numbers; with the converted MiniLM the dense encoder and the
    # hybrid store beat the tiny encoder trained for a minute
    import re

    names = ("BM25 (lexical, through the store)", "tiny encoder pretrained here (dense)",
             "all-MiniLM-L6-v2 as MosaicBERT (dense)", "hybrid store (dense + BM25, RRF)")
    scores = {n: float(m.group(1)) for n in names if (m := re.search(re.escape(n) + r"\s+([01]\.\d{3})", result.output))}
    assert "BM25 (lexical, through the store)" in scores and "hybrid store (dense + BM25, RRF)" in scores
    if (out / "minilm-mosaic").exists():
        assert scores["all-MiniLM-L6-v2 as MosaicBERT (dense)"] > scores["tiny encoder pretrained here (dense)"]
        # the Jonah sermon is chapter 9: a relevant passage comes first
        hits = store.search_texts(["a sermon about Jonah and the whale"], k=1, mode="hybrid")[0].hits
        assert hits[0].id.startswith(("c9-", "c8-"))

    again = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert f"reusing {out / 'pretrain' / 'final'}" in again.output
    assert "it was pretrained" in again.output
    json.dumps(scores)
