"""Contrastive encoders: loss gradients (naive vs ST's MNRL, cached, gathered over 2 gloo ranks), training,
export, and loading the folder with and without mosaic_embed importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import run_cli_torchrun
from encoder_helpers import TOPICS, tiny_mosaic, write_beir, write_pairs_jsonl

import mosaic_embed  # noqa: F401
from mosaic_embed.config import ContrastiveConfig, from_dict
from mosaic_embed.train.contrastive import (
    RemoteCodeError,
    _rewrite_module,
    build_encoder,
    make_loss,
    save_encoder,
    train_encoder,
)

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
        loss_fn = make_loss(model, ContrastiveConfig(loss="mnrl", gather_across_devices=True, scale=SCALE))
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


def test_remote_code_rewrites_package_imports():
    import re

    from transformers.dynamic_module_utils import get_imports

    source, needs = _rewrite_module("mosaic_embed.model.modeling")
    assert "from .kernels_attention import" in source and "from .model_configuration import" in source
    assert "mosaic_embed.kernels.attention" in needs and "mosaic_embed.model.padding" in needs
    # only "from .name import ..." remains: the one form transformers' loader follows and copies
    assert not re.search(r"^\s*from\s+\.\.", source, flags=re.M)
    compile(source, "model_modeling.py", "exec")
    path = _module_file_for_test(source)
    assert "mosaic_embed" not in get_imports(path)


def _module_file_for_test(source):
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    f.write(source)
    f.close()
    return f.name


def test_remote_code_rejects_unfollowable_imports(tmp_path, monkeypatch):
    """A module reached only through 'from . import module' would be missing on the remote side."""
    import mosaic_embed.train.contrastive as contrastive

    pkg = tmp_path / "mosaic_embed_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cfg.py").write_text("from transformers import PretrainedConfig\nclass C(PretrainedConfig):\n    model_type = 'probe'\n")
    (pkg / "mod.py").write_text("from . import helper\nfrom .cfg import C\nclass M:\n    pass\n")
    (pkg / "helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(contrastive, "PACKAGE", "mosaic_embed_probe")
    import importlib

    mod, cfg = importlib.import_module("mosaic_embed_probe.mod"), importlib.import_module("mosaic_embed_probe.cfg")
    source, needs = contrastive._rewrite_module("mosaic_embed_probe.mod")
    assert "from . import helper as helper" in source and "mosaic_embed_probe.helper" in needs
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RemoteCodeError, match="helper.py"):
        contrastive.export_remote_code(out, {"AutoConfig": cfg.C, "AutoModel": mod.M})


def test_loads_after_import_without_trust_remote_code(encoder_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(encoder_dir / "encoder"), device="cpu")
    assert type(model[0].auto_model).__module__ == "mosaic_embed.model.modeling"


BLOCKED_LOAD = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mosaic_embed" or name.startswith("mosaic_embed."):
                raise ImportError("mosaic_embed is not installed here")
    sys.meta_path.insert(0, Block())
    try:
        import mosaic_embed
        raise SystemExit("mosaic_embed was importable")
    except ImportError:
        pass
    import numpy as np
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
    assert "mosaic_embed" not in sys.modules
    emb = model.encode(sys.argv[3:])
    np.save(sys.argv[1] + "/../remote.npy", emb)
    print(type(model[0].auto_model).__module__)
    # A second folder in the same process: its copy of the Triton kernel module registers its custom ops
    # under its own namespace instead of colliding with the first copy's.
    other = SentenceTransformer(sys.argv[2], trust_remote_code=True, device="cpu")
    import importlib, torch
    namespaces = set()
    for m in (model, other):
        pkg = type(m[0].auto_model).__module__.rsplit(".", 1)[0]
        flash = importlib.import_module(pkg + ".kernels_flash_attn_alibi")
        namespaces.add(flash._REMOTE_OP_NAMESPACE)
        assert callable(getattr(torch.ops, flash._REMOTE_OP_NAMESPACE).flash_attn_varlen_alibi_fwd)
    assert len(namespaces) == 2, namespaces
    """
)


def test_loads_with_remote_code_where_mosaic_embed_is_absent(encoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    texts = ["the storm hit the city", "a cat"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    import shutil

    shutil.copytree(encoder_dir / "encoder", tmp_path / "second-encoder")
    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, str(encoder_dir / "encoder"),
                           str(tmp_path / "second-encoder"), *texts],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model_modeling" in proc.stdout and "mosaic_embed" not in proc.stdout
    remote = np.load(encoder_dir / "remote.npy")
    local = SentenceTransformer(str(encoder_dir / "encoder"), device="cpu").encode(texts)
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-6)


def test_train_encoder_under_torchrun_gathers_negatives(encoder_dir, tmp_path):
    """Two gloo ranks on CPU: a real DDP run, gathered negatives on, only rank 0 writes the folder."""
    pairs = write_pairs_jsonl(tmp_path / "p.jsonl", n=24)
    proc = run_cli_torchrun(2, ["train-encoder", "--recipe", "tiny", "--model", str(encoder_dir / "backbone"),
                                "--pairs", str(pairs), "--out", str(tmp_path / "enc"), "--max-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["gathered_negatives"] is True
    assert manifest["outputs"]["steps"] == 2
