"""Encoder folders (encode/st.py): the remote-code export, loading with and without mosaic_embed importable,
and the encoder identity that stores and embedding runs check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mosaic_embed.encode import build_encoder, encoder_identity, save_encoder, st
from mosaic_embed.encode.st import RemoteCodeError, _rewrite_module
from tests.helpers import tiny_mosaic


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    model = build_encoder(tiny_mosaic(root / "backbone"), "mean", True, max_seq_len=32, device="cpu")
    save_encoder(model, root / "encoder")
    return root


def test_remote_code_rewrites_package_imports():
    import re

    from transformers.dynamic_module_utils import get_imports

    source, needs = _rewrite_module("mosaic_embed.model.modeling")
    assert "from .model_blocks import" in source and "from .model_configuration import" in source
    assert "mosaic_embed.model.blocks" in needs
    blocks, blocks_needs = _rewrite_module("mosaic_embed.model.blocks")
    assert "from .kernels_dispatch import" in blocks and "mosaic_embed.data.packing" in blocks_needs
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

    pkg = tmp_path / "mosaic_embed_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cfg.py").write_text("from transformers import PretrainedConfig\nclass C(PretrainedConfig):\n    model_type = 'probe'\n")
    (pkg / "mod.py").write_text("from . import helper\nfrom .cfg import C\nclass M:\n    pass\n")
    (pkg / "helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(st, "PACKAGE", "mosaic_embed_probe")
    import importlib

    mod, cfg = importlib.import_module("mosaic_embed_probe.mod"), importlib.import_module("mosaic_embed_probe.cfg")
    source, needs = st._rewrite_module("mosaic_embed_probe.mod")
    assert "from . import helper as helper" in source and "mosaic_embed_probe.helper" in needs
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RemoteCodeError, match="helper.py"):
        st.export_remote_code(out, {"AutoConfig": cfg.C, "AutoModel": mod.M})


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


def test_identity_follows_weights_and_config_not_location(encoder_dir, tmp_path):
    """A copy elsewhere has the same identity; another seed's weights, or another pooling, do not."""
    ident = encoder_identity(encoder_dir / "encoder")
    copy = shutil.copytree(encoder_dir / "encoder", tmp_path / "moved")
    (copy / "manifest.json").write_text("{}")  # run metadata is not identity
    assert encoder_identity(copy) == ident
    other = build_encoder(tiny_mosaic(tmp_path / "b2", seed=1), "mean", True, max_seq_len=32, device="cpu")
    save_encoder(other, tmp_path / "other")
    assert encoder_identity(tmp_path / "other") != ident
    cls = build_encoder(encoder_dir / "backbone", "cls", True, max_seq_len=32, device="cpu")
    save_encoder(cls, tmp_path / "cls")
    assert encoder_identity(tmp_path / "cls") != ident
    with pytest.raises(FileNotFoundError, match="not a folder"):
        encoder_identity(tmp_path / "missing")


@pytest.mark.parametrize("first", [
    "from mosaic_embed.model import MosaicBertModel",  # modeling.py imports AutoModel's module half-way
    "import mosaic_embed; from transformers import AutoTokenizer",  # the Auto modules before our models
    "from transformers import AutoModel; import mosaic_embed",  # transformers first, then the registration
])
def test_auto_classes_know_mosaic_bert_whatever_the_import_order(encoder_dir, first):
    """Fresh processes: whichever of transformers and mosaic_embed comes first, AutoConfig, AutoTokenizer and
    AutoModel load a MosaicBERT folder (no remote-code prompt: stdin is closed)."""
    import subprocess
    import sys

    code = first + textwrap.dedent("""
        import sys
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        path = sys.argv[1]
        print(type(AutoConfig.from_pretrained(path)).__name__, type(AutoModel.from_pretrained(path)).__name__,
              AutoTokenizer.from_pretrained(path)("a cat")["input_ids"][0])
    """)
    done = subprocess.run([sys.executable, "-c", code, str(encoder_dir / "backbone")], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:2] == ["MosaicBertConfig", "MosaicBertModel"]


def test_encoder_loads_without_transformers(encoder_dir):
    """A fresh process embeds with a plain MosaicBERT folder without importing transformers or torch._dynamo:
    the inference model holds the saved weights, equal to MosaicBertModel's vectors."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys
        import numpy as np
        from mosaic_embed.encode import Encoder
        enc = Encoder.load(sys.argv[1], device="cpu")
        np.save(sys.argv[2], enc.encode(["the storm brought rain", "a cat"]))
        print(type(enc.backbone).__name__, "transformers" in sys.modules, "torch._dynamo" in sys.modules)
    """)
    out = encoder_dir / "fast.npy"
    done = subprocess.run([sys.executable, "-c", code, str(encoder_dir / "encoder"), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # neither transformers nor torch._dynamo (a second or more each on a small CPU) for a process that only
    # embeds
    assert done.stdout.split() == ["MosaicBertInferenceModel", "False", "False"]
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(encoder_dir / "encoder"), device="cpu").encode(["the storm brought rain", "a cat"])
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-4, atol=1e-5)


def test_direct_read_tokenizes_as_transformers_does(tmp_path):
    """The Rust tokenizer read from tokenizer.json gives transformers' ids (special tokens, truncation at
    max_seq_len on the tokenizer's side), and ``Encoder.tokenizer`` still offers transformers' wrapper."""
    import json

    from mosaic_embed.encode import Encoder

    folder = tmp_path / "enc"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), "mean", True, max_seq_len=12, device="cpu"), folder)
    texts = ["the storm brought rain " * 12, "a cat", "", "Ünïcödé  café\tnews\n", "market price news"]
    for side in ("right", "left"):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": side}))
        enc = Encoder.load(folder, device="cpu")
        assert enc._tokenizer is None  # not loaded until something asks for it
        ref = enc.tokenizer(texts, truncation=True, max_length=12)["input_ids"]
        assert enc.tokenize(texts) == ref
        assert max(map(len, ref)) == 12


def test_long_texts_are_tokenized_from_a_whole_word_prefix_with_the_same_ids(tmp_path):
    """Long texts are cut to whole words before tokenizing (a fraction of the tokenizer's work for long
    documents); the ids equal transformers' truncation of the whole text: prefixes that fill max_seq_len are
    kept, the rest (words of many characters per token) are tokenized again whole."""
    import random

    from mosaic_embed.encode import Encoder
    from mosaic_embed.encode.packed import PREFIX_CHARS_PER_TOKEN, cuts_to_whole_words, whole_word_prefix

    folder = tmp_path / "enc"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), "mean", True, max_seq_len=12, device="cpu"), folder)
    enc = Encoder.load(folder, device="cpu")
    assert cuts_to_whole_words(enc._backend) and enc._prefix_chars == PREFIX_CHARS_PER_TOKEN * 12
    rng = random.Random(0)
    words = ["the", "storm", "Brought", "rain,", "café", "naïve", "東京", "1999", "e-mail", "don't", "ｆｕｌｌ"]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in (3, 20, 40, 80)]
    texts += ["\n".join(words * 6), "\t".join(words * 6), "x" * 500, "word " * 3 + "y" * 300,
              "internationalization " * 12, "  leading spaces " * 20, "",
              "see: " + " ".join(["z" * 110] * 8)]  # words over WordPiece's 100 characters: one [UNK] each
    ref = enc.tokenizer(texts, truncation=True, max_length=12)["input_ids"]
    assert enc.tokenize(texts) == ref
    limit = enc._prefix_chars
    cut = [t for t in texts if whole_word_prefix(t, limit) is not t]
    refilled = [t for t in cut if len(enc._backend.encode(whole_word_prefix(t, limit)).ids) < 12]
    assert len(cut) >= 6 and refilled  # both ways through: prefixes kept, and prefixes tokenized again whole
    assert whole_word_prefix("a b c", 3) == "a" and whole_word_prefix("abcdef", 3) == "abcdef"


def test_tokenizers_that_join_words_across_spaces_are_not_cut():
    """Byte-level BPE or SentencePiece (spaces belong to the next token) and regex normalizers: whole texts."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    from mosaic_embed.encode.packed import cuts_to_whole_words

    tok = Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert cuts_to_whole_words(tok)
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
    assert cuts_to_whole_words(tok)
    tok.add_tokens(["New York"])  # matched across a space before pre-tokenizing
    assert not cuts_to_whole_words(tok)
    tok = Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.normalizer = normalizers.Replace("  ", " ")
    assert not cuts_to_whole_words(tok)
    tok.normalizer = None
    for pre in (pre_tokenizers.ByteLevel(), pre_tokenizers.Metaspace(), None):
        tok.pre_tokenizer = pre
        assert not cuts_to_whole_words(tok)


@pytest.mark.parametrize("pooling, normalize, length", [("mean", True, 48), ("cls", True, 20), ("mean", False, 33)])
def test_direct_read_agrees_with_sentence_transformers(tmp_path, pooling, normalize, length):
    """The packed path reads plain folders without sentence-transformers: same length, pooling, vectors."""
    from sentence_transformers import SentenceTransformer

    from mosaic_embed.encode import Encoder
    from mosaic_embed.encode.st import read_packed_folder

    folder = tmp_path / "enc"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), pooling, normalize, max_seq_len=length, device="cpu"),
                 folder)
    parts = read_packed_folder(folder)
    ref = SentenceTransformer(str(folder), device="cpu")
    assert (parts.pooling, parts.normalize, parts.max_seq_len, parts.dim) == (pooling, normalize,
                                                                             ref.max_seq_length, 32)
    texts = ["the storm brought rain " * 12, "a cat", "market price news"]
    enc = Encoder.load(folder, device="cpu")
    assert enc._st is None  # read directly
    np.testing.assert_allclose(enc.encode(texts), ref.encode(texts), rtol=1e-4, atol=1e-5)


def test_folders_the_direct_read_does_not_mirror_go_to_sentence_transformers(tmp_path):
    import json

    from mosaic_embed.encode.st import read_packed_folder

    folder = tmp_path / "enc"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), "mean", True, max_seq_len=40, device="cpu"), folder)
    assert read_packed_folder(folder) is not None
    cases = {
        "sentence_bert_config.json": lambda c: {**c, "do_lower_case": True},
        "1_Pooling/config.json": lambda c: {**c, "pooling_mode": "max"},
        "modules.json": lambda c: [*c, {"idx": 3, "name": "3", "path": "3_Dense", "type": "x.Dense"}],
    }
    for name, change in cases.items():
        f = folder / name
        original = f.read_text()
        f.write_text(json.dumps(change(json.loads(original))))
        assert read_packed_folder(folder) is None, name
        f.write_text(original)
    st_cfg = folder / "config_sentence_transformers.json"  # prompts are read (the Encoder applies them)
    st_cfg.write_text(json.dumps({**json.loads(st_cfg.read_text()), "prompts": {"query": "query: ", "document": None}}))
    assert read_packed_folder(folder).prompts == {"query": "query: ", "document": ""}
    # the older layout's explicit max_seq_length is honoured, as sentence-transformers does
    sb = folder / "sentence_bert_config.json"
    sb.write_text(json.dumps({**json.loads(sb.read_text()), "max_seq_length": 24}))
    assert read_packed_folder(folder).max_seq_len == 24
    assert read_packed_folder(tmp_path / "b") is None  # a bare backbone folder: no modules.json


def test_a_broken_tokenizer_file_is_named(tmp_path):
    from mosaic_embed.encode import Encoder

    folder = tmp_path / "enc"
    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), "mean", True, max_seq_len=12, device="cpu"), folder)
    (folder / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizers file"):
        Encoder.load(folder, device="cpu")
