"""Distillation (train/distill.py): a teacher's embeddings on a corpus -> a MosaicBERT student; cached and
resumable teacher embeddings, projections, tokenizers of both sides, named errors, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mosaic_embed  # noqa: F401
from mosaic_embed.cli import main
from mosaic_embed.config import DistillConfig, load_config
from mosaic_embed.encode import PACKED, Encoder, build_encoder, save_encoder
from mosaic_embed.train.distill import build_student, cut_passages, distill, load_teacher
from tests.helpers import SPECIAL, TOPICS, WORDS, tiny_bert, tiny_mosaic, write_beir, write_pairs_jsonl

TINY_STUDENT = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "attn_impl": "torch"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = root / "teacher"
    save_encoder(build_encoder(tiny_bert(root / "teacher-backbone", seed=5), "mean", True, 48, "cpu"), teacher)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (topic, body) in enumerate(list(TOPICS.items()) * 6):
            f.write(json.dumps({"text": f"{topic} {body} " * (i % 3 + 1) + WORDS[i % len(WORDS)]}) + "\n")
    return root, teacher, corpus


def cfg_for(root, teacher, corpus, out, **kw):
    flags = dict(teacher=teacher, corpus=corpus, out=root / out, student="mosaic-bert-tiny",
                 student_overrides=TINY_STUDENT)
    flags.update(kw)
    return load_config(DistillConfig, "tiny", [], **flags)


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_cut_passages():
    text = " ".join(f"w{i}" for i in range(25))
    # a 5-word tail (< 8 words) is dropped
    assert cut_passages(text, 10) == [" ".join(f"w{i}" for i in range(10)), " ".join(f"w{i}" for i in range(10, 20))]
    assert cut_passages(" ".join(["x"] * 30), 10) == [" ".join(["x"] * 10)] * 3
    assert cut_passages("one two", 10) == []


def test_student_learns_the_teachers_vectors_through_a_projection(setup):
    """A random 16-wide student, a 32-d teacher: a Dense 16 -> 32 is trained with it; after training its
    vectors are far closer to the teacher's than the same student's at initialisation."""
    root, teacher, corpus = setup
    cfg = cfg_for(root, teacher, corpus, "student", max_steps=25, lr=5e-3, eval_beir=write_beir(root / "beir"))
    out = distill(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "distill" and manifest["outputs"]["student"]["projection"] == [16, 32]
    assert manifest["outputs"]["normalize"] is True and manifest["timings"]["teacher_cached"] is False
    assert 0.0 <= manifest["metrics"]["ndcg@10"] <= 1.0
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Normalize"]
    student = Encoder.load(out, device="cpu")
    assert student.path_used == PACKED and student.dim == 32
    passages = [json.loads(line)["text"]
                for line in open(next((root / ".distill-cache").glob("*/passages.jsonl")))]
    target = Encoder.load(teacher, device="cpu").encode(passages, prompt_name="document")
    init, _ = build_student(cfg, load_teacher(teacher), root / "init")
    before = _cos(init.encode(passages), target).mean()
    after = _cos(student.encode(passages), target).mean()
    assert after > before + 0.2 and after > 0.8, (before, after)
    np.testing.assert_allclose(student.encode(passages[:4]), student.st.encode(passages[:4]), atol=1e-5)


def test_teacher_embeddings_are_cached_and_resume_after_an_interruption(setup, monkeypatch):
    root, teacher, corpus = setup
    calls = []
    original = Encoder.embed_window

    def dies_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "embed_window", dies_once)
    cfg = cfg_for(root, teacher, corpus, "resumed", cache_dir=root / "cache2", max_steps=2)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg)
    assert not (root / "resumed").exists()
    (state,) = (root / "cache2").glob("*/teacher/embed_state.json")
    assert json.loads(state.read_text())["complete"] is False
    distill(cfg)  # picks the teacher run up where it stopped
    first = json.loads((root / "resumed" / "manifest.json").read_text())
    assert first["timings"]["teacher_cached"] is False and len(calls) == 2
    distill(cfg_for(root, teacher, corpus, "again", cache_dir=root / "cache2", max_steps=2, loss="mse"))
    again = json.loads((root / "again" / "manifest.json").read_text())
    assert again["timings"]["teacher_cached"] is True and again["timings"]["teacher_s"] == 0.0
    assert len(calls) == 2  # the teacher did not run again
    assert again["config"]["loss"] == "mse"


def test_students_from_folders_with_their_own_tokenizer(setup):
    """A pretrained MosaicBERT folder with another vocabulary than the teacher's: each tokenizes its own text.
    A student of the teacher's width gets no projection."""
    root, teacher, corpus = setup
    letters = list("abcdefghijklmnopqrstuvwxyz")
    other_vocab = SPECIAL + WORDS[::-1] + letters + [f"##{c}" for c in letters]
    other_vocab = list(dict.fromkeys(other_vocab))[:128]
    other_vocab += [f"[unused{i}]" for i in range(128 - len(other_vocab))]
    backbone = tiny_mosaic(root / "own-vocab", seed=2, mlm=True, vocab=other_vocab)
    out = distill(cfg_for(root, teacher, corpus, "from-folder", student=str(backbone), student_overrides={}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["student"]["projection"] is None and manifest["outputs"]["student"]["kind"] == "model folder"
    assert Encoder.load(out, device="cpu").tokenizer.convert_tokens_to_ids(WORDS[-1]) == len(SPECIAL)
    # and an encoder folder as the student: its pooling is kept
    enc = root / "cls-encoder"
    save_encoder(build_encoder(tiny_mosaic(root / "b2", seed=4), "cls", False, 32, "cpu"), enc)
    out = distill(cfg_for(root, teacher, corpus, "from-encoder", student=str(enc), student_overrides={}))
    assert Encoder.load(out, device="cpu").pooling == "cls"


def test_distill_then_finetune_on_pairs(setup):
    root, teacher, corpus = setup
    pairs = write_pairs_jsonl(root / "pairs.jsonl", n=16)
    out = distill(cfg_for(root, teacher, corpus, "tuned", finetune={"pairs": str(pairs)}))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "distill" and manifest["finetune"]["outputs"]["steps"] == 2
    assert manifest["distilled"] == str(root / "tuned.distilled")
    assert json.loads((root / "tuned.distilled" / "manifest.json").read_text())["stage"] == "distill"
    assert Encoder.load(out, device="cpu").path_used == PACKED


def test_inputs_are_checked_with_named_errors(setup, tmp_path):
    root, teacher, corpus = setup
    with pytest.raises(ValueError, match=r"teacher .*teacher-backbone: not a sentence-transformers model"):
        distill(cfg_for(root, root / "teacher-backbone", corpus, "x"))
    bert = tiny_bert(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"student .*bert: a 'bert' model; .*convert --from-hf"):
        distill(cfg_for(root, teacher, corpus, "x", student=str(bert), student_overrides={}))
    with pytest.raises(ValueError, match="not a folder and not a preset"):
        distill(cfg_for(root, teacher, corpus, "x", student="mosaic-bert-huge"))
    no_tok = tiny_mosaic(tmp_path / "no-tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no-tok: no usable tokenizer"):
        distill(cfg_for(root, teacher, corpus, "x", student=str(no_tok), student_overrides={}))
    with pytest.raises(ValueError, match="student_overrides.hidden_sise: not a field"):
        distill(cfg_for(root, teacher, corpus, "x", student_overrides={"hidden_sise": 8}))
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        distill(cfg_for(root, teacher, tmp_path / "nope.jsonl", "x"))
    empty = tmp_path / "tiny.jsonl"
    empty.write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(ValueError, match="passage"):
        distill(cfg_for(root, teacher, empty, "x"))
    assert not (root / "x").exists()
    with pytest.raises(ValueError, match="student: required"):
        load_config(DistillConfig, None, [], teacher=teacher, corpus=corpus, out=tmp_path / "o")


def test_cli_distill_tiny_recipe(setup):
    root, teacher, corpus = setup
    r = CliRunner().invoke(main, ["distill", "--recipe", "tiny", "--teacher", str(teacher), "--corpus", str(corpus),
                                  "--student", "mosaic-bert-tiny", "--out", str(root / "cli"), "--max-passages", "10",
                                  "--set", "logging_steps=1"])
    assert r.exit_code == 0, r.output
    assert "{'loss'" not in r.output and "{'train_runtime'" not in r.output, r.output  # one bar, no raw logs
    manifest = json.loads((root / "cli" / "manifest.json").read_text())
    assert manifest["outputs"]["passages"] == 10 and manifest["outputs"]["student"]["projection"] is None
    r = CliRunner().invoke(main, ["distill", "--teacher", str(root / "nope"), "--corpus", str(corpus),
                                  "--student", "mosaic-bert-tiny", "--out", str(root / "cli2")])
    assert r.exit_code == 2 and r.output.startswith("error: teacher"), r.output
