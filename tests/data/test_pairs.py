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
    with pytest.raises(ValueError, match="pair 2 lacks a negative but earlier pairs have 1"):
        load_pairs(p)


def test_tsv(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("query\tpositive\nq one\tdoc one\nq two\tdoc two\n")
    assert list(iter_pairs(p)) == [Pair("q one", "doc one"), Pair("q two", "doc two")]
    p.write_text("q one\tdoc one\nonly one column\n")
    with pytest.raises(ValueError, match=r"p.tsv:2: expected 2 or more"):
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


def test_several_negatives_per_pair_from_jsonl_and_tsv(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [{"query": f"q{i}", "positive": f"d{i}", "negatives": [f"n{i}a", f"n{i}b"]} for i in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_pairs(p)
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"] and ds["negative_2"][1] == "n1b"
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "negatives": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="pair 2 has 1 negative.* earlier pairs have 2"):
        load_pairs(p)
    p.write_text(json.dumps({"query": "a", "positive": "b", "negative": "c", "negatives": ["d"]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: give 'negative' or 'negatives', not both"):
        load_pairs(p)
    p.write_text(json.dumps({"query": "a", "positive": "b", "negatives": ["d", 3]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'negatives' must be a string"):
        load_pairs(p)
    t = tmp_path / "p.tsv"
    t.write_text("q1\td1\tn1\tm1\nq2\td2\tn2\tm2\n")
    assert load_pairs(t).column_names == ["anchor", "positive", "negative_1", "negative_2"]


def test_simcse_pairs_are_a_passage_and_itself():
    import random

    text = " ".join(f"w{i}" for i in range(300))
    p = mine_pair(text, "simcse", random.Random(0), max_words=64)
    assert p.query == p.positive and len(p.query.split()) == 64
    assert mine_pair("too short", "simcse", random.Random(0)) is None


class KeywordEncoder:
    """A stand-in teacher: a text's vector counts the topic words it contains (a deterministic 'model')."""

    def __init__(self, words):
        self.words = words
        self.calls = []

    def encode(self, texts, prompt_name=None):
        import numpy as np

        self.calls.append(prompt_name)
        v = np.array([[t.split().count(w) for w in self.words] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_teacher_filter_keeps_pairs_whose_positive_the_teacher_ranks_high():
    from mosaic_embed.data.pairs import pairs_to_dataset, teacher_filter

    words = ["storm", "market", "river", "music"]
    pairs = [Pair("storm news", "storm rain storm"), Pair("market up", "market price market"),
             Pair("river flood", "music concert music"),  # noise: the teacher finds the music document instead
             Pair("music hall", "music band")]
    teacher = KeywordEncoder(words)
    ds = pairs_to_dataset(pairs)
    kept, info = teacher_filter(ds, teacher, top_k=1)
    assert teacher.calls == ["document", "query"]
    # the reference: the own positive's rank among every positive, by the teacher's scores
    q, d = teacher.encode(ds["anchor"]), teacher.encode(ds["positive"])
    expect = [i for i in range(len(pairs)) if (q[i] @ d.T > q[i] @ d[i]).sum() < 1]
    assert kept["anchor"] == [pairs[i].query for i in expect] and "river flood" not in kept["anchor"]
    assert info == {"mined": 4, "kept": len(expect), "top_k": 1}
    assert len(teacher_filter(ds, teacher, top_k=4)[0]) == 4
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        teacher_filter(ds, teacher, top_k=0)


def test_hard_negatives_mined_by_a_teacher_respect_the_margin(tmp_path):
    import numpy as np

    from mosaic_embed.data.pairs import add_hard_negatives, pairs_to_dataset
    from mosaic_embed.encode import Encoder, build_encoder, save_encoder
    from tests.helpers import TOPICS, tiny_mosaic

    save_encoder(build_encoder(tiny_mosaic(tmp_path / "b"), "mean", True, 32, "cpu"), tmp_path / "t")
    teacher = Encoder.load(tmp_path / "t", device="cpu")
    texts = list(TOPICS.values())
    pairs = pairs_to_dataset([Pair(f"{t} news", body) for t, body in TOPICS.items()])
    extra = ["a cat and a dog", "the dog and the cat", "a star"]
    mined, info = add_hard_negatives(pairs, teacher, n=2, relative_margin=0.05, corpus=extra)
    assert mined.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert info["pairs"] == 6 and info["with_negatives"] == len(mined) > 0
    for row in mined:
        q, pos, n1, n2 = teacher.st.encode([row["anchor"], row["positive"], row["negative_1"], row["negative_2"]])
        assert row["positive"] not in (row["negative_1"], row["negative_2"])
        assert {row["negative_1"], row["negative_2"]} <= set(texts) | set(extra)
        for neg in (n1, n2):  # ST's cosine similarity, and the margin: below 95 % of the positive's score
            assert float(q @ neg) <= 0.95 * float(q @ pos) + 1e-5
        assert float(q @ n1) >= float(q @ n2) - 1e-5  # the top candidates, best first
    with_file_negatives = pairs_to_dataset([Pair(f"{t} news", body, ("x", "y")) for t, body in TOPICS.items()])
    single, _ = add_hard_negatives(with_file_negatives, teacher, n=1, relative_margin=0.0, corpus=extra)
    assert single.column_names == ["anchor", "positive", "negative"]  # mined negatives replace the file's
    assert not {"x", "y"} & set(single["negative"])
    with pytest.raises(ValueError, match="cannot give 9 negatives"):
        add_hard_negatives(pairs, teacher, n=9)
    assert np.isfinite(teacher.encode(texts)).all()
