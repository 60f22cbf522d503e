"""Embedding a file (encode/files.py): rows in input order, resume, identity of input and encoder, locks,
non-finite vectors, bad inputs, the embed CLI and torchrun."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mosaic_embed.artifacts import FolderLockedError, writer_lock
from mosaic_embed.cli import main
from mosaic_embed.config import EmbedConfig, EncodeConfig
from mosaic_embed.encode import Encoder, build_encoder, embed_file, load_embeddings, save_encoder
from tests.encode.conftest import N_TEXTS, TEXTS, write_docs
from tests.helpers import run_cli_torchrun, tiny_mosaic


def embed(model, docs, out, **kw):
    return embed_file(EmbedConfig(model=model, input=docs, out=out, **kw), show_progress=False)


def test_embed_file_writes_rows_in_input_order(encoders, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl")
    # on the CPU like the reference below: this checks order and files (a CUDA run's fp32 attention uses tf32)
    out = embed(encoders["mosaic-mean"], docs, tmp_path / "emb", window=7, dtype="float32",
                encode=EncodeConfig(batch_size=4, device="cpu"))
    emb, ids = load_embeddings(out)
    assert ids == [f"doc{i}" for i in range(len(TEXTS))]
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu")
    texts = [("t " if i % 3 == 0 else "") + TEXTS[i] for i in range(len(TEXTS))]
    np.testing.assert_allclose(emb, enc.encode(texts), rtol=1e-4, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "embed" and manifest["outputs"]["shape"] == [len(TEXTS), 32]


def test_embed_file_resumes_after_interruption(encoders, tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "docs.jsonl")
    full = embed(encoders["mosaic-mean"], docs, tmp_path / "full", window=5)
    ref, _ = load_embeddings(full)
    calls = {"n": 0}
    original = Encoder.embed_window

    def dies_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "embed_window", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed(encoders["mosaic-mean"], docs, tmp_path / "part", window=5)
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(tmp_path / "part")
    calls["n"] = -100  # no more interruptions
    embed(encoders["mosaic-mean"], docs, tmp_path / "part", window=5)
    assert calls["n"] == -100 + 6 - 2  # 26 docs / 5 = 6 windows; 2 were done before the interruption
    got, ids = load_embeddings(tmp_path / "part")
    assert got.dtype == np.float16 and len(ids) == len(TEXTS)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match=r"other settings \(window\)"):
        embed(encoders["mosaic-mean"], docs, tmp_path / "part", window=6)


def test_embed_file_bad_input_names_line(encoders, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' missing"):
        embed(encoders["mosaic-mean"], bad, tmp_path / "emb")
    assert not (tmp_path / "emb").exists()  # a bad input file leaves no output folder


def test_cli_embed_model_folder_that_is_no_encoder(tmp_path):
    """A shards / GLUE-output / empty folder as --model: exit 2 naming it, before any output exists."""
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "ok"}) + "\n")
    r = CliRunner().invoke(main, ["embed", "--model", str(tmp_path / "shards"), "--input", str(tmp_path / "in.jsonl"),
                                  "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'shards'}: not an encoder folder")
    assert not (tmp_path / "out").exists()


def test_cli_embed_empty_binary_and_non_utf8_inputs(encoders, tmp_path):
    """Exit 2, one error line naming the file, and no output folder (an empty file is not 0 embeddings)."""
    cases = {"empty.jsonl": (b"", "no records"), "blank.jsonl": (b"\n  \n", "no records"),
             "binary.jsonl": (bytes(range(128, 256)) * 4, ": not UTF-8 text (byte 0x80"),
             "latin1.jsonl": (json.dumps({"text": "ok"}).encode() + b"\n" + '{"text": "café"}'.encode("latin-1"),
                              ": not UTF-8 text (byte 0xe9"),
             "corrupt.jsonl.gz": (bytes(range(128, 256)), ": not a readable gzip file")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out-{name}"
        r = CliRunner().invoke(main, ["embed", "--model", str(encoders["mosaic-mean"]), "--input",
                                      str(tmp_path / name), "--out", str(out), "--device", "cpu"])
        last = r.output.strip().splitlines()[-1]  # after the weight-loading progress bar
        assert r.exit_code == 2 and last.startswith(f"error: {tmp_path / name}") and why in last, r.output
        assert not out.exists(), name


def test_embed_under_torchrun_two_ranks_merge_into_one_file(encoders, tmp_path):
    """Two gloo ranks on CPU: windows alternate between ranks, rows land in one memmap in input order."""
    docs = write_docs(tmp_path / "docs.jsonl")
    proc = run_cli_torchrun(2, ["embed", "--model", str(encoders["mosaic-mean"]), "--input", str(docs),
                                "--out", str(tmp_path / "emb"), "--window", "4", "--dtype", "float32",
                                "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb, ids = load_embeddings(tmp_path / "emb")
    assert ids == [f"doc{i}" for i in range(N_TEXTS)]
    assert sorted(p.name for p in (tmp_path / "emb" / "progress").iterdir()) == ["rank-0.json", "rank-1.json"]
    enc = Encoder.load(encoders["mosaic-mean"], device="cpu")
    texts = [("t " if i % 3 == 0 else "") + TEXTS[i] for i in range(N_TEXTS)]
    np.testing.assert_allclose(emb, enc.encode(texts), rtol=1e-4, atol=1e-5)


def test_embed_refuses_another_encoder_or_a_changed_input(encoders, tmp_path):
    """A run folder is tied to its encoder's identity and its input's content, not to their paths."""
    docs = write_docs(tmp_path / "docs.jsonl")
    model = shutil.copytree(encoders["mosaic-mean"], tmp_path / "model")
    embed(model, docs, tmp_path / "emb")
    # the folder at the same path now holds a retrained encoder (another seed's weights)
    shutil.rmtree(model)
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b2", seed=7), "mean", True, max_seq_len=48, device="cpu"), model)
    with pytest.raises(ValueError, match="made by another encoder"):
        embed(model, docs, tmp_path / "emb")
    with pytest.raises(ValueError, match="made by another encoder"):  # a resume is refused the same way
        state = json.loads((tmp_path / "emb" / "embed_state.json").read_text())
        state["complete"] = False
        (tmp_path / "emb" / "embed_state.json").write_text(json.dumps(state))
        embed(model, docs, tmp_path / "emb")
    shutil.rmtree(tmp_path / "emb")
    embed(model, docs, tmp_path / "emb")
    lines = docs.read_text().splitlines()
    docs.write_text("\n".join(reversed(lines)) + "\n")  # same size, other order
    with pytest.raises(ValueError, match="from another input"):
        embed(model, docs, tmp_path / "emb")


def test_embed_records_resolved_paths(encoders, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    docs = write_docs(tmp_path / "docs.jsonl")
    monkeypatch.chdir(tmp_path / "work")
    embed(encoders["mosaic-mean"], "../docs.jsonl", "../emb")
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["inputs"]["input"] == str(docs.resolve())
    assert manifest["encoder"]["path"] == str(encoders["mosaic-mean"].resolve())
    assert manifest["encoder"]["identity"] and manifest["encoder"]["max_seq_len"] == 48


def test_non_finite_vectors_are_an_error_naming_the_record(encoders, tmp_path, monkeypatch):
    docs = write_docs(tmp_path / "docs.jsonl", n=9)
    original = Encoder.embed_window

    def nan_for_third(self, texts, *args, **kwargs):
        out = original(self, texts, *args, **kwargs)
        for i, t in enumerate(texts):
            if t == TEXTS[2]:
                out[i] = np.nan
        return out

    monkeypatch.setattr(Encoder, "embed_window", nan_for_third)
    with pytest.raises(FloatingPointError, match=r"docs.jsonl:4: the encoder produced a non-finite embedding"):
        embed(encoders["mosaic-mean"], docs, tmp_path / "emb")  # record 3 is on line 4 (a blank line before it)


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(encoders, tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", n=5)
    out = tmp_path / "emb"
    with writer_lock(out, "another embed"):
        with pytest.raises(FolderLockedError, match="being written by another process"):
            embed(encoders["mosaic-mean"], docs, out)
        r = CliRunner().invoke(main, ["embed", "--model", str(encoders["mosaic-mean"]), "--input", str(docs),
                                      "--out", str(out), "--device", "cpu"])
        assert r.exit_code == 2 and "being written by another process" in r.output
    import socket

    (out / ".writer.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # dead pid
    embed(encoders["mosaic-mean"], docs, out)
    assert not (out / ".writer.lock").exists() and load_embeddings(out)[0].shape == (5, 32)


@pytest.mark.parametrize("length, message", [("0", "max_seq_len must be >= 3"),
                                             ("100000", "takes at most 8192 tokens")])
def test_max_seq_len_bounds_are_checked_up_front(encoders, tmp_path, length, message):
    docs = write_docs(tmp_path / "docs.jsonl", n=3)
    r = CliRunner().invoke(main, ["embed", "--model", str(encoders["mosaic-mean"]), "--input", str(docs),
                                  "--out", str(tmp_path / "emb"), "--device", "cpu", "--max-seq-len", length])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "emb").exists()


def test_bert_max_seq_len_is_bounded_by_its_position_table(encoders, tmp_path):
    with pytest.raises(Exception, match="takes at most 128 tokens"):
        Encoder.load(encoders["bert"], device="cpu", max_seq_len=129)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_embeddings_file_is_named(encoders, tmp_path, damage):
    docs = write_docs(tmp_path / "docs.jsonl", n=5)
    out = embed(encoders["mosaic-mean"], docs, tmp_path / "emb")
    path = out / "embeddings.npy"
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) - 40])
    with pytest.raises(ValueError, match=r"embeddings.npy: not a readable .npy file"):
        load_embeddings(out)
