"""Training pairs: file formats, BEIR folders, mined pairs, and errors naming file and line."""

import gzip
import json

import pytest

from mosaic_embed.data.pairs import Pair, iter_pairs, load_pairs, mine_pair, mine_pairs, split_sentences
from tests.helpers import write_beir, write_pairs_jsonl


def test_jsonl_and_gz(tmp_path):
    p = write_pairs_jsonl(tmp_path / "p.jsonl", n=5)
    ds = load_pairs(p)
    assert ds.column_names == ["anchor", "positive"] and len(ds) == 5
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(p.read_bytes())
    assert load_pairs(gz)["anchor"] == ds["anchor"]


def test_negatives_column(tmp_path):
    ds = load_pairs(write_pairs_jsonl(tmp_path / "p.jsonl", n=4, negatives=True))
    assert ds.column_names == ["anchor", "positive", "negative"]


def test_mixed_negatives_rejected(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"query": "a", "positive": "b", "negative": "c"}) + "\n"
                 + json.dumps({"query": "a", "positive": "d"}) + "\n")
    with pytest.raises(ValueError, match="pair 2 lacks a negative"):
        load_pairs(p)


def test_tsv(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("query\tpositive\nq one\tdoc one\nq two\tdoc two\n")
    assert list(iter_pairs(p)) == [Pair("q one", "doc one"), Pair("q two", "doc two")]
    p.write_text("q one\tdoc one\nonly one column\n")
    with pytest.raises(ValueError, match=r"p.tsv:2: expected 2 or 3"):
        list(iter_pairs(p))


def test_bad_jsonl_names_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"query": "a", "positive": "b"}) + "\n\n" + json.dumps({"query": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:3: missing field 'positive'"):
        load_pairs(p)
    p.write_text(json.dumps({"query": 3, "positive": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'query' must be a string"):
        load_pairs(p)


def test_unknown_format_and_missing(tmp_path):
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown pairs format"):
        iter_pairs(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError):
        iter_pairs(tmp_path / "nope.jsonl")


def test_beir_folder_pairs(tmp_path):
    folder = write_beir(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no qrels/train.tsv"):
        list(iter_pairs(folder))
    pairs = list(iter_pairs(folder, beir_split="test"))
    assert len(pairs) == 6 and pairs[0] == Pair("storm news", "storm the storm brought rain and fire to the city road")


def test_split_sentences():
    assert split_sentences("He saw it! Then? No.") == ["He saw it!", "Then?", "No."]
    assert split_sentences("One two. Three four.") == ["One two.", "Three four."]


def test_first_sentence_pair():
    import random

    text = "The storm hit the coast on Monday. " + " ".join(f"W{i}" for i in range(200)) + "."
    p = mine_pair(text, "first-sentence", random.Random(0), min_words=8, max_words=50)
    assert p.query == "The storm hit the coast on Monday."
    assert p.positive.split() == [f"W{i}" for i in range(50)]


def test_span_pairs_are_disjoint():
    import random

    words = [f"w{i}" for i in range(300)]
    rng = random.Random(1)
    for _ in range(50):
        p = mine_pair(" ".join(words), "spans", rng, min_words=8, max_words=64)
        q, d = p.query.split(), p.positive.split()
        assert 8 <= len(q) and 8 <= len(d) <= 64
        assert not set(q) & set(d)
    assert mine_pair("too short", "spans", rng) is None


def test_mine_pairs_streams_and_caps():
    docs = (f"Sentence number {i} is here. " + "body " * 40 for i in range(10**9))  # infinite-ish: must stream
    pairs = list(mine_pairs(docs, strategy="mixed", max_pairs=7, seed=0))
    assert len(pairs) == 7
    with pytest.raises(ValueError, match="unknown pair-mining strategy"):
        list(mine_pairs([], strategy="nope"))


def test_auto_pairs_from_corpus(tmp_path):
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": f"Headline number {i} is big. " + "More words here " * 10}) + "\n")
    ds = load_pairs("auto", corpus=corpus, strategy="first-sentence")
    assert len(ds) == 12 and ds["anchor"][3] == "Headline number 3 is big."
    with pytest.raises(ValueError, match="needs a corpus"):
        load_pairs("auto")
