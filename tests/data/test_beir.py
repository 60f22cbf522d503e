"""BEIR loader: the layout, its validation, and errors that name the file and line."""

import gzip
import json

import pytest

from mosaic_embed.data.beir import doc_text, load_beir, load_qrels
from tests.helpers import write_beir


def test_load_beir_roundtrip(tmp_path):
    data = load_beir(write_beir(tmp_path / "b"))
    assert len(data.corpus) == 12 and len(data.queries) == 6
    assert data.qrels["q0"] == {"d0": 1}
    assert data.doc_text("d0").startswith("storm the storm")
    assert doc_text({"title": "", "text": "x"}) == "x"


def test_gzipped_corpus(tmp_path):
    folder = write_beir(tmp_path / "b")
    raw = (folder / "corpus.jsonl").read_bytes()
    (folder / "corpus.jsonl").unlink()
    with gzip.open(folder / "corpus.jsonl.gz", "wb") as f:
        f.write(raw)
    assert len(load_beir(folder).corpus) == 12


def test_bad_line_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "b")
    with open(folder / "corpus.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:13: not valid JSON"):
        load_beir(folder)


def test_missing_field(tmp_path):
    folder = write_beir(tmp_path / "b")
    with open(folder / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": "q9"}) + "\n")
    with pytest.raises(ValueError, match=r"queries.jsonl:7: missing field 'text'"):
        load_beir(folder)


def test_qrel_to_unknown_doc_is_an_error(tmp_path):
    folder = write_beir(tmp_path / "b")
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("q1\tnope\t1\n")
    with pytest.raises(ValueError, match="corpus-id 'nope'"):
        load_beir(folder)


def test_qrels_bad_columns(tmp_path):
    p = tmp_path / "q.tsv"
    p.write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(ValueError, match=r"q.tsv:2: expected 3"):
        load_qrels(p)


def test_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="splits present: test"):
        load_beir(write_beir(tmp_path / "b"), split="dev")
