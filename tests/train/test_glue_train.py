"""GLUE finetuning end to end on CPU with a tiny BERT: staging, outputs, checkpoints, packing, the CLI."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_bert, tiny_mosaic, write_polarity_task

FIXTURES = Path(__file__).parent.parent / "fixtures" / "glue"


def _tiny_vocab() -> list[str]:
    """[PAD]=0 and the other specials, then the fixtures' most frequent words and punctuation (128 entries)."""
    words: Counter = Counter()
    for f in sorted(FIXTURES.rglob("*.tsv")):
        words.update(re.findall(r"[a-z]+|[^\sa-z0-9]", f.read_text().lower()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(w for w, _ in words.most_common(128 - len(specials)))


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A tiny transformers BERT MLM checkpoint whose tokenizer knows the GLUE fixtures' words."""
    return tiny_bert(path, seed, mlm=True, dropout=0.1, vocab=_tiny_vocab())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "model")


def load_glue_config(recipe, overrides=(), **fields):
    from mosaic_embed.config import GlueConfig, load_config

    return load_config(GlueConfig, recipe, overrides, **fields)


def _cfg(model, out, **kw):
    kw.setdefault("data_dir", str(FIXTURES))
    return load_glue_config("tiny", (), model=str(model), out=str(out), **kw)


def test_config_recipe_merge_keeps_task_defaults(tmp_path):
    from mosaic_embed.config import ConfigError

    cfg = load_glue_config(None, ["hparams.rte.epochs=7"], model="m")
    rte = cfg.task_hparams("rte")
    assert rte.epochs == 7 and rte.lr == 1.0e-5 and rte.batch_size == 16
    paper = load_glue_config("mosaicbert", (), model="m")
    assert paper.hparams["mnli"].batch_size == 48 and paper.max_seq_len == 256
    assert paper.hparams["mrpc"].lr == 8.0e-5 and len(paper.hparams["stsb"].seeds) == 5
    assert load_glue_config(None, model="m", seeds=[4]).task_hparams("cola").seeds == [4]
    # a new task is a mapping entry, not a dataclass field; a task without one gets the custom recipe
    task = tmp_path / "reviews"
    custom = load_glue_config(None, ["hparams.reviews.epochs=9"], model="m",
                              custom_tasks=[{"path": str(task), "num_labels": 2}])
    assert custom.task_hparams("reviews").epochs == 9 and custom.task_hparams("reviews").lr == 3.0e-5
    assert custom.task_hparams("other") == custom.hparams["custom"]
    with pytest.raises(ConfigError, match="hparams.wnli: no GLUE or custom task of that name"):
        load_glue_config(None, ["hparams.wnli.lr=1e-5"], model="m")
    with pytest.raises(ConfigError, match="unknown key 'hparams.rte.epohcs'"):
        load_glue_config(None, ["hparams.rte.epohcs=3"], model="m")
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_glue_config(None, ["hparams.rte.lr=0"], model="m")
    with pytest.raises(ConfigError, match="model"):
        load_glue_config(None, ())


def test_staging_rte_starts_from_mnli_weights(tiny_model, tmp_path):
    """RTE's encoder at init must equal the MNLI-finetuned encoder, not the pretrained one; the head is new."""
    from mosaic_embed.train.glue import load_classifier, run_glue

    cfg = _cfg(tiny_model, tmp_path / "out", tasks=["mnli", "rte"], seeds=[3])
    results = run_glue(cfg)
    point = results["points"][0]
    assert point["tasks"]["rte"]["seeds"][0]["init"] == "mnli"
    assert point["tasks"]["mnli"]["seeds"][0]["init"] == "pretrained"
    mnli_dir = tmp_path / "out" / "models" / "mnli-seed3"
    assert (mnli_dir / "config.json").is_file()

    pre = load_classifier(tiny_model, 2)
    staged = load_classifier(tiny_model, 2, backbone_from=mnli_dir)
    mnli = load_classifier(mnli_dir, 3)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(staged.state_dict()[key], mnli.state_dict()[key])
    assert not torch.equal(staged.state_dict()[key], pre.state_dict()[key])  # MNLI finetuning moved it
    for k, v in mnli.state_dict().items():
        if not k.startswith("classifier."):  # encoder + pooler carry over, as in the paper's staging
            assert torch.equal(staged.state_dict()[k], v), k
    assert staged.classifier.weight.shape == (2, 32)  # a new 2-way head, not MNLI's 3-way one


def test_end_to_end_all_tasks_outputs(tiny_model, tmp_path):
    from mosaic_embed.train.glue import run_glue

    out = tmp_path / "out"
    results = run_glue(_cfg(tiny_model, out, tasks=["all"]))  # the tiny recipe's seeds: 2 for sst2/rte/stsb
    saved = json.loads((out / "results.json").read_text())
    assert saved["points"][0]["glue_average"] == pytest.approx(results["points"][0]["glue_average"])
    point = saved["points"][0]
    assert list(point["tasks"]) == ["mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb"]
    for name, t in point["tasks"].items():
        assert len(t["seeds"]) == (2 if name in ("sst2", "rte", "stsb") else 1)
        assert t["throughput"]["batches"] == "padded"  # HF BERT has no packed path
        assert t["throughput"]["train_examples_per_s"] > 0 and t["throughput"]["eval_tokens_per_s"] > 0
        for s in t["seeds"]:
            assert s["metrics"]  # every eval split scored
    mnli = point["tasks"]["mnli"]
    assert set(mnli["seeds"][0]["metrics"]) == {"dev_matched", "dev_mismatched"}
    assert set(point["tasks"]["stsb"]["seeds"][0]["metrics"]["dev"]) == {"pearson", "spearman"}
    assert {"dev/accuracy", "dev/f1", "score"} <= set(point["tasks"]["mrpc"]["summary"])
    g = point["glue_average"]
    assert g["complete"] and g["tasks"] == 8
    task_means = [t["summary"]["score"]["mean"] for t in point["tasks"].values()]
    assert g["mean"] == pytest.approx(sum(task_means) / 8)
    md = (out / "results.md").read_text()
    assert "| mnli | 1 |" in md and "| rte | 2 |" in md and "GLUE average" in md
    assert point["tasks"]["rte"]["summary"]["score"]["n"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "glue"


def test_custom_task_learns_and_checkpoint_sweep(tmp_path):
    """A separable custom task is learnt; --checkpoints evaluates every checkpoint with its pretraining time."""
    from mosaic_embed.train.glue import run_glue

    task = write_polarity_task(tmp_path / "polarity")

    run = tmp_path / "runs" / "tiny" / "checkpoints"
    for i, step in enumerate([100, 200]):
        d = make_tiny_bert(run / f"step-{step:06d}", seed=i)
        (d / "checkpoint_meta.json").write_text(json.dumps({"step": step, "wall_clock_s": 36.0 * step,
                                                            "tokens_seen": 1000 * step}))
    cfg = load_glue_config("tiny", ["hparams.custom.epochs=6", "hparams.custom.lr=3e-3",
                                   "hparams.custom.seeds=[1]"],
                           checkpoints=str(run / "*"), out=str(tmp_path / "sweep"), tasks=[],
                           custom_tasks=[{"path": str(task), "num_labels": 2}])
    results = run_glue(cfg)
    assert results["run"] == "tiny"
    pts = results["points"]
    assert [p["pretrain"]["step"] for p in pts] == [100, 200]
    assert [p["pretrain"]["wall_clock_s"] for p in pts] == [3600.0, 7200.0]
    for p in pts:
        acc = p["tasks"]["polarity"]["summary"]["dev/accuracy"]["mean"]
        assert acc >= 0.9, acc  # the words separate the classes: a working loop learns them
        train = p["tasks"]["polarity"]["seeds"][0]["train"]
        assert train["steady"]["tokens_per_s"] > 0 and train["steady"]["after_steps"] == 10  # 30 steps > 10
        assert "glue_average" not in p


def test_packed_batches_match_padded():
    """The unpadded collation carries the same tokens as the padded one, with hand-checked offsets."""
    import numpy as np

    from mosaic_embed.train.glue import Encoded, collate

    enc = Encoded([[2, 5, 3], [2, 6, 7, 8, 3], [2, 3]], [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]], np.array([0, 1, 0]))
    packed = collate(enc, [0, 1, 2], True, 0, torch.device("cpu"))
    assert packed["cu_seqlens"].tolist() == [0, 3, 8, 10] and packed["cu_seqlens"].dtype == torch.int32
    assert packed["max_seqlen"] == 5
    assert packed["input_ids"].tolist() == [2, 5, 3, 2, 6, 7, 8, 3, 2, 3]
    assert packed["token_type_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    padded = collate(enc, [0, 1, 2], False, 0, torch.device("cpu"))
    assert padded["input_ids"].shape == (3, 5)
    assert padded["input_ids"][padded["attention_mask"].bool()].tolist() == packed["input_ids"].tolist()


def test_pretraining_meta_and_errors(tiny_model, tmp_path):
    from mosaic_embed.train.glue import find_checkpoints, pretraining_meta, run_glue

    assert pretraining_meta(tiny_model)["wall_clock_s"] is None
    d = tmp_path / "ck"
    d.mkdir()
    (d / "checkpoint_meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint_meta.json: not valid JSON"):
        pretraining_meta(d)
    with pytest.raises(FileNotFoundError, match="no folder matches"):
        find_checkpoints(str(tmp_path / "nothing" / "*"))
    # a bad data file fails before any training, naming the file
    bad = tmp_path / "glue" / "SST-2"
    bad.mkdir(parents=True)
    (bad / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\nfine\t5\n")
    with pytest.raises(ValueError, match=r"SST-2/dev.tsv:2: label 5"):
        run_glue(_cfg(tiny_model, tmp_path / "o", tasks=["sst2"], data_dir=str(tmp_path / "glue")))
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_glue_and_plot(tiny_model, tmp_path):
    import shutil

    from click.testing import CliRunner

    from mosaic_embed.cli import main

    model = shutil.copytree(tiny_model, tmp_path / "step-000050")
    (model / "checkpoint_meta.json").write_text('{"step": 50, "wall_clock_s": 90.0, "tokens_seen": 6400}')
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["glue", "--model", str(model), "--tasks", "sst2,cola", "--seeds", "1,2",
                                  "--data-dir", str(FIXTURES), "--recipe", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["points"][0]["tasks"]) == ["sst2", "cola"]
    assert [s["seed"] for s in res["points"][0]["tasks"]["cola"]["seeds"]] == [1, 2]
    assert res["points"][0]["pretrain"]["wall_clock_s"] == 90.0
    r = CliRunner().invoke(main, ["plot", "pareto", str(out / "results.json"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.svg").stat().st_size > 0
    r = CliRunner().invoke(main, ["glue", "--model", str(tiny_model), "--tasks", "wnli", "--out", str(out)])
    assert r.exit_code == 2 and "unknown GLUE task 'wnli'" in r.output
    r = CliRunner().invoke(main, ["glue", "--model", str(tiny_model), "--task-dir", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 2 and "--num-labels" in r.output


def make_tiny_mosaic(path: Path, seed: int = 0) -> Path:
    """A tiny MosaicBERT MLM checkpoint (mosaic-bert-tiny) whose tokenizer knows the GLUE fixtures' words."""
    return tiny_mosaic(path, seed, mlm=True, dropout=0.1, vocab=_tiny_vocab(), max_position_embeddings=128)


@pytest.fixture(scope="module", name="tiny_mosaic")
def tiny_mosaic_model(tmp_path_factory) -> Path:
    return make_tiny_mosaic(tmp_path_factory.mktemp("tiny_mosaic") / "model")


def test_mosaicbert_packed_eval_matches_padded(tiny_mosaic):
    """The packed (unpadded) path gives the logits of the padded path on the same examples."""
    from transformers import AutoTokenizer

    from mosaic_embed.data.glue import load_glue_task
    from mosaic_embed.train.glue import collate, encode, load_classifier, supports_packed

    model = load_classifier(tiny_mosaic, 3).eval()
    assert supports_packed(model)
    tok = AutoTokenizer.from_pretrained(str(tiny_mosaic))
    enc = encode(tok, load_glue_task("mnli", FIXTURES).train, 64, regression=False)
    idx = list(range(len(enc)))
    with torch.no_grad():
        packed = model(**collate(enc, idx, True, 0, torch.device("cpu"))).logits
        padded = model(**collate(enc, idx, False, 0, torch.device("cpu"))).logits
    assert packed.shape == (len(enc), 3)
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


def test_mosaicbert_finetunes_packed_with_staging(tiny_mosaic, tmp_path):
    from mosaic_embed.train.glue import load_classifier, run_glue

    res = run_glue(_cfg(tiny_mosaic, tmp_path / "out", tasks=["mnli", "stsb"], seeds=[5]))
    tasks = res["points"][0]["tasks"]
    assert tasks["mnli"]["throughput"]["batches"] == "packed"
    assert tasks["stsb"]["seeds"][0]["init"] == "mnli"
    assert set(tasks["stsb"]["seeds"][0]["metrics"]["dev"]) == {"pearson", "spearman"}
    mnli_dir = tmp_path / "out" / "models" / "mnli-seed5"
    staged = load_classifier(tiny_mosaic, 1, backbone_from=mnli_dir).state_dict()
    mnli = load_classifier(mnli_dir, 3).state_dict()
    pre = load_classifier(tiny_mosaic, 1).state_dict()
    carried = [k for k in mnli if not k.startswith("classifier.")]
    assert any(k.startswith("pooler.") for k in carried)  # MosaicBERT's pooler sits outside bert.*
    for k in carried:
        assert torch.equal(staged[k], mnli[k]), k
    key = "bert.encoder.layers.0.attention.Wqkv.weight"
    assert not torch.equal(staged[key], pre[key])  # MNLI finetuning moved it
    assert staged["classifier.weight"].shape == (1, 32)


def test_non_finite_loss_names_the_step(tiny_model, tmp_path):
    """A diverging run stops with an error naming task, seed and step (losses are read back in batches)."""
    from mosaic_embed.train.glue import run_glue

    cfg = _cfg(tiny_model, tmp_path / "o", tasks=["sst2"], seeds=[1])
    cfg.hparams["sst2"].lr = 1.0e30  # Adam's first step then moves every weight by ~1e30: inf/nan logits
    with pytest.raises(FloatingPointError, match=r"sst2 seed 1: loss is nan at step \d+ of \d+"):
        run_glue(cfg)


def test_cli_wrong_model_folder_is_a_clear_error_before_any_output(tmp_path):
    """A missing folder, a non-model folder (shards, a GLUE output) or a model without tokenizer files: exit 2,
    one line naming the folder, and no --out folder (no hub-lookup traceback, no stray config.yaml)."""
    from click.testing import CliRunner

    from mosaic_embed.cli import main

    shards = tmp_path / "shards"
    (shards / "train").mkdir(parents=True)
    (shards / "manifest.json").write_text("{}")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text('{"model_type": "bert"}')
    out = tmp_path / "out"
    for model, why in [(tmp_path / "missing", "model folder not found"), (shards, "not a model folder (no config.json)"),
                       (no_tok, "no tokenizer files")]:
        r = CliRunner().invoke(main, ["glue", "--model", str(model), "--tasks", "rte", "--data-dir", str(FIXTURES),
                                      "--recipe", "tiny", "--out", str(out)])
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"error: {model}: {why}"), r.output
        assert not out.exists()


def test_glue_run_folder_works_from_any_directory_and_has_one_writer(tiny_model, tmp_path, monkeypatch):
    """Relative --checkpoints and --data-dir given in one directory; the results, read from another, name the
    checkpoints by resolved paths and the saved models relative to the results folder. A second writer of
    the same --out is refused before it writes anything."""
    import shutil

    from click.testing import CliRunner

    from mosaic_embed.artifacts import writer_lock
    from mosaic_embed.cli import main

    work = tmp_path / "work"
    ckpts = work / "runs" / "tiny" / "checkpoints"
    for step in (10, 20):
        d = shutil.copytree(tiny_model, ckpts / f"step-{step:06d}")
        (d / "checkpoint_meta.json").write_text(json.dumps({"step": step, "wall_clock_s": 1.0 * step}))
    shutil.copytree(FIXTURES, work / "glue")
    monkeypatch.chdir(work)
    args = ["glue", "--checkpoints", "runs/tiny/checkpoints/*", "--tasks", "rte", "--seeds", "1",
            "--data-dir", "glue", "--recipe", "tiny", "--out", "out", "--set", "save_models=true"]
    with writer_lock(work / "out", "another glue"):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "out is being written by another process (another glue" in r.output, r.output
        assert sorted(p.name for p in (work / "out").iterdir()) == [".writer.lock"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = work / "out"
    results = json.loads((out / "results.json").read_text())
    assert [p["model"] for p in results["points"]] == [str(ckpts / "step-000010"), str(ckpts / "step-000020")]
    for point in results["points"]:
        assert Path(point["pretrain"]["source"]).is_file()
        saved = point["tasks"]["rte"]["seeds"][0]["saved"]
        assert not Path(saved).is_absolute() and (out / saved / "config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["models"] == [p["model"] for p in results["points"]]
    assert manifest["inputs"]["checkpoints"] == str(work / "runs/tiny/checkpoints/*")
    assert manifest["inputs"]["data_dir"] == str(work / "glue")
    assert not (out / ".writer.lock").exists()
    r = CliRunner().invoke(main, ["plot", "pareto", str(out / "results.json"), "--out", "pareto"])
    assert r.exit_code == 0, r.output
    assert (elsewhere / "pareto.png").is_file()
