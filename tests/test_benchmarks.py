"""The benchmark scripts run end to end at tiny sizes on CPU (their GPU figures come from the device)."""

from __future__ import annotations

import json

import pytest

from mosaic_embed.encode import PACKED
from tests.encode.conftest import encoders  # noqa: F401, F811  (the shared fixture)
from tests.helpers import TOPICS, write_beir, write_pairs_jsonl


def load_benchmark(name):
    """benchmarks/NAME.py as a module (NAME may name a subfolder: ``pareto/run``)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    module_name = "bench_" + name.replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_encode_throughput_benchmark_runs_at_tiny_size(tmp_path):
    bench = load_benchmark("encode_throughput")
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": " ".join(f"word{i}x{j}" for j in range(150 + i))}) + "\n")
    texts = bench.make_texts(corpus, 40, seed=1)
    assert len(texts) == 40 and all(8 <= len(t.split()) <= 200 for t in texts)
    out = tmp_path / "r.json"
    result = bench.main(["--tiny", "--n", "16", "--warmup", "4", "--device", "cpu",
                         "--corpus", str(corpus), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["speedup"] == pytest.approx(result["ours"]["sentences_per_s"] / result["baseline"]["sentences_per_s"])
    assert saved["ours"]["path"] == PACKED and saved["baseline"]["attn_impl"] == "sdpa"
    assert saved["ours"]["tokens"] > 16 * 8 and saved["n_texts"] == 16
    # the CPU row: one network on both sides (a BertModel, and it converted), so the vectors must agree
    same = bench.main(["--same-model", "--shape", "tiny", "--n", "16", "--warmup", "4", "--device", "cpu",
                       "--check", "16", "--corpus", str(corpus), "--out", str(tmp_path / "same.json")])
    assert same["ours"]["params"] == pytest.approx(same["baseline"]["params"], rel=0.01)  # vocab padded to 64
    assert same["ours"]["check_vs_baseline"]["min_cosine"] > 0.9999 and "one network" in same["same_model"]


def test_retrieval_news_benchmark_merges_systems(encoders, tmp_path):  # noqa: F811
    pytest.importorskip("bm25s")  # a dev extra (the BM25 baseline): absent where only the runtime is installed
    bench = load_benchmark("retrieval_news")
    beir = write_beir(tmp_path / "news")
    out = tmp_path / "r.json"
    bench.main(["--systems", "bm25", "--data", str(beir), "--out", str(out)])
    bench.main(["--systems", "mosaic+pairs", "--encoder", str(encoders["mosaic-mean"]), "--data", str(beir),
                "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["ndcg@10"]) == {"bm25", "mosaic+pairs"} and set(doc["recall@100"]) == {"bm25", "mosaic+pairs"}
    assert doc["details"]["bm25"]["ndcg@10"] == doc["ndcg@10"]["bm25"]
    assert set(doc["alibi_extrapolation"]["mosaic+pairs"]) == {"128", "256", "512"}
    assert [r["system"] for r in doc["runs"]] == ["bm25", "mosaic+pairs"]
    assert doc["gpu_minutes"]["bm25"] == 0.0


def test_startup_benchmark_runs_the_real_cli(tmp_path):
    bench = load_benchmark("startup")
    beir = write_beir(tmp_path / "beir")
    result = bench.main(["--beir", str(beir), "--tiny", "--device", "cpu", "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved == result and len(saved["rows"]) == 10
    by = {r["what"]: r for r in saved["rows"]}
    first = [w for w in by if w.endswith("first run on this machine)")]  # untimed by the targets: warm-up
    assert len(first) == 3 and all(by[w]["target_s"] is None for w in first)
    (timed,) = [r for w, r in by.items() if w.startswith("eval-retrieval") and w not in first]
    assert timed["target_s"] == 10.0
    assert by["mosaic-embed --version"]["seconds"] < 5  # no torch import to print a version
    assert all(r["seconds"] > 0 for r in saved["rows"])


def test_retrieval_domain_benchmark_every_system_at_tiny_size(encoders, tmp_path):  # noqa: F811
    """The rows of benchmarks/retrieval_domain.py at toy size on CPU, in two invocations merged into one JSON
    (a re-run row replaces the old one), with the plot. The teacher stands in for MiniLM: a tiny BERT
    sentence-transformers folder. (minilm+pairs and distill-base run the code of mosaic-minilm+pairs and
    distill-small with another model; their full-size configs are checked below.)"""
    pytest.importorskip("bm25s")
    bench = load_benchmark("retrieval_domain")
    beir = write_beir(tmp_path / "news")
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=24)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (topic, body) in enumerate(list(TOPICS.items()) * 4):
            f.write(json.dumps({"text": f"The {topic} story number {i} is here. It says {body} about {topic}. " * 3})
                    + "\n")
    out = tmp_path / "results" / "retrieval_domain.json"
    common = ["--tiny", "--beir", str(beir), "--pairs", str(pairs), "--corpus", str(corpus), "--distill-corpus",
              str(corpus), "--pretrain-corpus", str(corpus), "--teacher", str(encoders["bert"]),
              "--work", str(tmp_path / "work"), "--out", str(out), "--max-seq-len", "48"]
    first = ["bm25", "minilm", "mosaic-minilm", "mosaic-minilm+adapt", "mosaic-minilm+pairs", "scratch",
             "distill-small"]
    bench.main(["--systems", ",".join(first), *common])
    second = ["mosaic-minilm+crop", "mosaic-minilm+simcse", "scratch+crop", "mosaic-minilm+adapt+pairs", "bm25"]
    doc = bench.main(["--systems", ",".join(second), *common])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(doc)) and out.with_suffix(".png").stat().st_size > 1000
    systems = [r["system"] for r in saved["rows"]]
    expected = set(first + second) | {"distill-small+pairs"}
    assert set(systems) == expected and len(systems) == len(expected)  # bm25 ran twice, one row
    keys = {"system", "backbone", "labels", "ndcg@10", "recall@100", "gpu_minutes", "sentences_per_s"}
    for r in saved["rows"]:
        assert keys <= set(r) and r["backbone"] in ("mosaic_bert", "minilm", "bm25")
        assert 0.0 <= r["ndcg@10"] <= 1.0 and 0.0 <= r["recall@100"] <= 1.0 and r["gpu_minutes"] == 0.0
        assert (r["sentences_per_s"] is None) == (r["backbone"] == "bm25")
    by = {r["system"]: r for r in saved["rows"]}
    assert by["mosaic-minilm"]["details"]["path"] == PACKED and by["minilm"]["details"]["path"] != PACKED
    # the converted teacher computes the teacher's vectors: the same quality
    assert by["mosaic-minilm"]["ndcg@10"] == pytest.approx(by["minilm"]["ndcg@10"], abs=1e-6)
    assert [by[s]["labels"] for s in ("distill-small", "distill-small+pairs", "scratch", "scratch+crop")] == [
        False, True, True, False]
    adapt = by["mosaic-minilm+adapt"]["details"]["train"]["pairs"]
    assert adapt["teacher_filter"]["mined"] == 24 and "hard_negatives" in adapt
    # adapt, then finetune: built on the first invocation's +adapt folder, both stages' minutes counted
    assert by["mosaic-minilm+adapt+pairs"]["labels"] is True
    assert by["mosaic-minilm+adapt+pairs"]["details"]["train"]["model"].endswith("mosaic-minilm_adapt")
    assert saved["device"].startswith("cpu") and saved["commit"] and len(saved["runs"]) == 2
    assert set(saved["targets"]) == {"without_labels", "with_labels"}
    assert saved["packed_vs_sentence_transformers"]["same_run"] is True
    with pytest.raises(SystemExit, match="unknown systems"):
        bench.main(["--systems", "nope", *common])


def test_retrieval_domain_full_size_configs_are_valid(tmp_path):
    """What the GPU run will train: every system's full-size stage configs load from the shipped recipes (a
    typo in a recipe or a budget fails here, not on the GPU host)."""
    from mosaic_embed.config import ContrastiveConfig, DistillConfig, PretrainConfig

    bench = load_benchmark("retrieval_domain")
    args = ["--systems", "bm25", "--work", str(tmp_path), "--teacher", str(tmp_path), "--beir", str(tmp_path)]
    run = bench.Run(bench.parse_args(args))
    kinds = {}
    for system in bench.SYSTEMS:
        for cfg in run.configs(system):
            kinds.setdefault(system, []).append(type(cfg).__name__)
            if isinstance(cfg, ContrastiveConfig):  # MiniLM's length; today's scratch pipeline trains at 128
                assert cfg.max_seq_len == (128 if system.startswith("scratch") else 256), system
                assert cfg.precision == "auto", system
            if isinstance(cfg, DistillConfig):
                assert cfg.finetune.pairs and cfg.precision == "auto" and cfg.max_steps > 0
            if isinstance(cfg, PretrainConfig):
                assert cfg.model.preset == "mosaic-bert-small" and cfg.train.max_steps == 1500
    assert kinds["mosaic-minilm+adapt"] == ["ContrastiveConfig"] and kinds["scratch"] == ["PretrainConfig",
                                                                                        "ContrastiveConfig"]
    adapt = run.configs("mosaic-minilm+adapt")[0]
    assert (adapt.mining, adapt.teacher_filter, adapt.hard_negatives) == ("first-sentence", 1, 1)
    assert run.configs("mosaic-minilm+simcse")[0].mining == "simcse"
    assert run.configs("distill-base")[0].student == "mosaic-bert-base"
    changed = bench.Run(bench.parse_args([*args, "--set", "distill-small.max_steps=7"]))
    assert changed.configs("distill-small")[0].max_steps == 7
    with pytest.raises(SystemExit, match="SYSTEM.KEY=VALUE"):
        bench.Run(bench.parse_args([*args, "--set", "nope.max_steps=7"]))



def test_index_bench_runs_at_tiny_size(tmp_path):
    bench = load_benchmark("index_bench")
    out = tmp_path / "index.json"
    doc = bench.main(["--n", "800", "--dim", "16", "--queries", "30", "--clusters", "12", "--repeats", "1",
                      "--work", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == doc["rows"] and len(doc["rows"]) == 5
    for row in doc["rows"]:
        assert set(row) >= {"factory", "recommended", "build_s", "qps", "raw_faiss_qps", "overhead", "recall@10"}
        assert row["qps"] > 0 and row["raw_faiss_qps"] > 0
        assert row["overhead"] == pytest.approx(1 - row["qps"] / row["raw_faiss_qps"], abs=1e-3)
    flat = next(r for r in doc["rows"] if r["factory"] == "Flat")
    assert flat["recall@10"] == 1.0 and flat["recommended"]
    sq8 = next(r for r in doc["rows"] if r["factory"].startswith("SQ8"))
    assert sq8["recall@10"] >= 0.9  # rescored with the float vectors
    assert not list((tmp_path / "work").iterdir())  # the stores are removed after measuring


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from mosaic_embed.config import IndexConfig
    from mosaic_embed.encode import build_encoder, save_encoder
    from mosaic_embed.index.ingest import build_from_input
    from tests.helpers import tiny_mosaic

    root = tmp_path_factory.mktemp("bench_store")
    save_encoder(build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=48, device="cpu"),
                 root / "encoder")
    beir = write_beir(root / "news")
    store = build_from_input(beir / "corpus.jsonl", root / "store", IndexConfig(), root / "encoder")
    return {"root": root, "beir": beir, "encoder": root / "encoder", "store": store}


def test_serve_load_runs_at_tiny_size(tiny_store, tmp_path):
    bench = load_benchmark("serve_load")
    out = tmp_path / "serve.json"
    doc = bench.main(["--store", str(tiny_store["store"]), "--clients", "2,3", "--seconds", "2", "--max-requests",
                      "15", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == doc["rows"]
    assert [(r["clients"], r["batching"]) for r in doc["rows"]] == [(2, True), (3, True), (2, False), (3, False)]
    for row in doc["rows"]:
        assert row["errors"] == 0 and 0 < row["requests"] <= 15 and row["p99_ms"] >= row["p50_ms"] > 0
    assert set(doc["batching_gain"]) == {"2", "3"} and doc["device"].startswith("cpu")


def test_store_news_runs_at_tiny_size(tiny_store, tmp_path):
    import gzip

    bench = load_benchmark("store_news")
    beir = tiny_store["beir"]
    corpus = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    with gzip.open(beir / "train_pairs.jsonl.gz", "wt") as f:
        for doc in corpus:
            f.write(json.dumps({"query": (doc["title"] or "cat") + " story", "positive": doc["text"]}) + "\n")
    out = tmp_path / "news.json"
    doc = bench.main(["--data", str(beir), "--model", str(tiny_store["encoder"]), "--val", "8", "--device", "cpu",
                      "--work", str(tmp_path / "work"), "--out", str(out)])
    assert set(doc) >= {"dense", "lexical", "hybrid", "default", "default_mode", "hybrid_ge_best_single"}
    assert doc["details"]["validation_queries"] == 8 and doc["details"]["test_queries"] == 6
    fusion = doc["details"]["fusion"]
    assert fusion["tuned"]["best"] >= max(fusion["tuned"]["scores"]["dense"], fusion["tuned"]["scores"]["lexical"])
    assert json.loads(out.read_text())["dense"] == doc["dense"]


# ---- benchmarks/pareto: the recipes of the study, and its runner at tiny size ----------------------------

#: What every recipe of the study must build: our model's switches (or transformers' BERT) and the masking.
MOSAIC = dict(position="alibi", mlp="geglu", unpad=True, low_precision_layernorm=True,
              attention_probs_dropout_prob=0.0, attn_impl="auto")
BERT_MODE = dict(position="learned", mlp="gelu", unpad=False, low_precision_layernorm=False,
                 attention_probs_dropout_prob=0.1, attn_impl="auto")
PARETO_RECIPES = {
    "mosaic-small": (MOSAIC, 0.30),
    "mosaic-small-padded": ({**MOSAIC, "unpad": False}, 0.30),
    "mosaic-small-torch-attn": ({**MOSAIC, "attn_impl": "torch"}, 0.30),
    "bert-mode": (BERT_MODE, 0.15),
    "bert-mode-glu": ({**BERT_MODE, "mlp": "geglu"}, 0.15),
    "bert-mode-alibi": ({**BERT_MODE, "position": "alibi"}, 0.15),
    "bert-mode-lpln": ({**BERT_MODE, "low_precision_layernorm": True}, 0.15),
    "bert-mode-mask30": (BERT_MODE, 0.30),
    "bert-mode-no-attn-dropout": ({**BERT_MODE, "attention_probs_dropout_prob": 0.0}, 0.15),
}


def test_pareto_recipes_load_and_build_the_intended_models():
    """Each recipe loads as a PretrainConfig and builds the model its name promises, at MosaicBERT-Small's shape;
    every bert-mode-X differs from bert-mode in exactly one switch (Fig. 4's "BERT + one change"), and all
    recipes share the optimizer, schedule, batch and data settings."""
    from pathlib import Path

    import torch
    from transformers import BertForMaskedLM

    from mosaic_embed.config import PretrainConfig, load_config, to_dict
    from mosaic_embed.data.tokenizer import load_tokenizer
    from mosaic_embed.model import MosaicBertForMaskedLM
    from mosaic_embed.train.pretrain import build_model

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto" / "recipes"
    assert {p.stem for p in folder.glob("*.yaml")} == {*PARETO_RECIPES, "bert-small"}
    tok = load_tokenizer(None)
    cfgs = {name: load_config(PretrainConfig, folder / f"{name}.yaml") for name in [*PARETO_RECIPES, "bert-small"]}
    shared = {k: v for k, v in to_dict(cfgs["bert-small"].train).items() if k not in ("mask_prob", "lr")}
    switches = {}
    for name, cfg in cfgs.items():
        assert {k: v for k, v in to_dict(cfg.train).items() if k not in ("mask_prob", "lr")} == shared, name
        assert to_dict(cfg.data) == to_dict(cfgs["bert-small"].data), name
        with torch.device("meta"):  # the real modules and shapes, without allocating or initialising weights
            model = build_model(cfg.model, tok)
        c = model.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (512, 8, 8, 2048)
        if name == "bert-small":
            assert type(model) is BertForMaskedLM and cfg.train.mask_prob == 0.15
            assert c.attention_probs_dropout_prob == 0.1 and c._attn_implementation == "sdpa"
            continue
        flags, mask = PARETO_RECIPES[name]
        assert type(model) is MosaicBertForMaskedLM and cfg.train.mask_prob == mask, name
        assert {k: getattr(c, k) for k in flags} == flags, name
        layer = model.bert.encoder.layers[0]
        assert layer.mlp.wi.out_features == (4096 if c.mlp == "geglu" else 2048), name
        assert (model.bert.embeddings.position_embeddings is None) == (c.position == "alibi"), name
        switches[name] = {**flags, "mask_prob": mask}
        del model
    for name, s in switches.items():
        if name.startswith("bert-mode-"):
            changed = {k for k in s if s[k] != switches["bert-mode"][k]}
            assert len(changed) == 1, (name, changed)


def test_pareto_study_runs_every_phase_at_tiny_size(tmp_path, capsys):
    """sweep -> pretrain (stopped after 6 steps, then resumed) -> finetune -> merge -> plot, as the GPU runs go:
    chained commands, each idempotent, in a work folder; the results file has the issue's keys."""
    bench = load_benchmark("pareto/run")
    work, out = tmp_path / "work", tmp_path / "out"
    base = ["--tiny", "--work", str(work), "--jobs", "2", "--export", str(out)]
    # command 1: both sweeps, then the first pretraining process stops after 6 of its 10 steps
    assert bench.main(["all", *base, "--segment-steps", "6"]) == bench.EXIT_DEADLINE
    said = capsys.readouterr().out
    assert "sweep mosaic-small: winner lr" in said and "stopped at step 6" in said
    mosaic_run = work / "pretrain" / "mosaic-small"
    assert (mosaic_run / "checkpoints" / "step-000006").is_dir() and not (mosaic_run / "final").exists()
    assert "stopped at step 6" in (out / "status.txt").read_text()
    # a stopped run is not continued without --resume
    assert bench.main(["pretrain", *base]) == 1
    assert "pass --resume" in capsys.readouterr().err
    # command 2: resume, pretrain the other model, finetune, merge, plot
    assert bench.main(["all", *base, "--resume"]) == 0
    doc = json.loads((work / "pareto.json").read_text())
    assert doc["kind"] == "mosaic_embed.pareto"
    assert [r["name"] for r in doc["runs"]] == ["mosaic-small", "bert-small", "bert-mode"]
    # the ablation: one probe run of probe_steps at its baseline's winner, no timed checkpoints, its end point only
    ablation = doc["runs"][2]
    assert ablation["lr"] == doc["sweeps"]["bert-small"]["winner"] and doc["sweeps"]["bert-mode"]["steps"] == 3
    assert {p["checkpoint"] for p in ablation["points"]} == {"final"} and len(ablation["points"]) == 2 * 3
    assert not list((work / "pretrain" / "bert-mode" / "checkpoints").glob("step-*"))
    for run in doc["runs"][:2]:
        assert {"name", "lr", "tokens_per_s", "points"} <= set(run) and run["tokens_per_s"] > 0
        assert run["lr"] == doc["sweeps"][run["name"]]["winner"] == run["sweep"]["winner"]
        for p in run["points"]:
            assert {"minutes", "tokens", "task", "seed", "metric"} <= set(p) and 0.0 <= p["metric"] <= 1.0
        checkpoints = {p["checkpoint"] for p in run["points"]}
        assert "final" in checkpoints and len(checkpoints) <= 2  # max_points of tiny.yaml
        assert len(run["points"]) == len(checkpoints) * 2 * 3  # x tasks x seeds
    assert sorted(doc["sweeps"]["mosaic-small"]["runs"]) == ["0.004"]
    mosaic = doc["runs"][0]
    assert mosaic["segments"] == 2 and "step-000006" not in {p["checkpoint"] for p in mosaic["points"]}
    assert (work / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"pareto.json", "pareto.png", "pareto.svg", "pareto_work.tar.gz", "status.txt"} <= {
        p.name for p in out.iterdir()}
    # command 3: nothing left, nothing redone
    before = (work / "pareto.json").read_text()
    assert bench.main(["all", *base, "--resume"]) == 0
    assert "finished in an earlier session" in capsys.readouterr().out
    assert json.loads((work / "pareto.json").read_text())["runs"] == json.loads(before)["runs"]


def test_pareto_sweep_grid_winner_extension_and_lr_from(tmp_path):
    """The sweep's decisions, from its records alone: the lowest validation loss wins; a winning edge adds one
    value past it (sweep_extend); diverged runs never win; lr_from takes another model's winner."""
    from types import SimpleNamespace

    from mosaic_embed.config import from_dict

    bench = load_benchmark("pareto/run")
    study = from_dict(bench.StudyConfig, {
        "models": {"a": {"recipe": "mosaic-small", "lrs": [1e-3, 2e-3]}, "b": {"recipe": "bert-mode", "lr_from": "a"}},
        "tasks": [{"name": "t"}], "seeds": [1], "sweep_extend": 1, "sweep_factor": 2.0})
    ctx = SimpleNamespace(study=study, previous={"sweeps": {}}, sweep_dir=lambda m: tmp_path / m)

    def rec(**losses):
        return {bench.lr_tag(float(k.replace("_", "."))): {"lr": float(k.replace("_", ".")), "eval_loss": v,
                                                            "diverged": v is None} for k, v in losses.items()}

    assert bench.sweep_grid(ctx, "a", {}) == ([1e-3, 2e-3], None)  # nothing run yet
    assert bench.sweep_grid(ctx, "a", rec(**{"0_001": 3.0, "0_002": 3.5})) == ([5e-4, 1e-3, 2e-3], None)  # extends down
    assert bench.sweep_grid(ctx, "a", rec(**{"0_0005": 3.2, "0_001": 3.0, "0_002": 3.5}))[1] == 1e-3
    # the new edge wins again: extension is spent, the edge is the answer (the summary says so)
    assert bench.sweep_grid(ctx, "a", rec(**{"0_0005": 2.9, "0_001": 3.0, "0_002": 3.5})) == ([5e-4, 1e-3, 2e-3], 5e-4)
    # a diverged top edge does not extend the grid upwards and never wins
    assert bench.sweep_grid(ctx, "a", rec(**{"0_001": 3.0, "0_002": None}))[0] == [5e-4, 1e-3, 2e-3]
    with pytest.raises(RuntimeError, match="every learning rate of the sweep diverged"):
        bench.sweep_grid(ctx, "a", rec(**{"0_001": None, "0_002": None}))
    # lr_from: waits for the other model's sweep, then one run at its winner
    with pytest.raises(bench.ConfigError, match="takes its lr from a, whose sweep is not finished"):
        bench.sweep_grid(ctx, "b", {})
    ctx.previous = {"sweeps": {"a": {"runs": rec(**{"0_0005": 3.2, "0_001": 3.0, "0_002": 3.5})}}}
    assert bench.sweep_grid(ctx, "b", {}) == ([1e-3], None)
    assert bench.sweep_grid(ctx, "b", rec(**{"0_001": 3.1})) == ([1e-3], 1e-3)
    with pytest.raises(ValueError, match="must be a model with a grid of its own, listed before it"):
        from_dict(bench.StudyConfig, {"models": {"b": {"recipe": "x", "lr_from": "a"}, "a": {"recipe": "y", "lrs": [1e-3]}},
                                      "tasks": [{"name": "t"}], "seeds": [1]})


# ---- benchmarks/pretrain_throughput: --smoke with model overrides ---------------------------------------


def test_pretrain_throughput_smoke_with_overrides(tmp_path, monkeypatch):
    """--smoke (a tiny model on CPU) runs a plain mosaic row and the same row with its own override beside it,
    ``--set`` reaching every mosaic row; a run with overrides writes only ``--out``."""
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = " ".join(TOPICS.values())
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i} {words} {i}"}) + "\n" for i in range(40)))
    bench = load_benchmark("pretrain_throughput")
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", [
        "pretrain_throughput.py", "--smoke", "--corpus", str(corpus), "--steps", "1", "--warmup", "1",
        "--global-batch", "4", "--microbatch", "4", "--set", "geglu_impl=torch",
        "--rows", "mosaic-eager,mosaic-eager:layernorm_impl=torch", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["mosaic_overrides"] == {"geglu_impl": "torch"}
    rows = result["rows"]
    assert [r.get("error") for r in rows] == [None, None]
    assert [r["overrides"] for r in rows] == [{"geglu_impl": "torch"}, {"geglu_impl": "torch", "layernorm_impl": "torch"}]
    assert rows[1]["model"].endswith("[geglu_impl=torch,layernorm_impl=torch]")
    monkeypatch.setattr(sys, "argv", ["pretrain_throughput.py", "--smoke", "--rows", "mosaic-eager:no_such_field=1"])
    with pytest.raises(SystemExit, match="no_such_field"):
        bench.main()
