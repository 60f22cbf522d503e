"""Corpus reading: every format, every skip reason, dedup, streaming, the summary, the bundled corpus."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mosaic_embed.data import corpus as corpus_mod
from mosaic_embed.data.corpus import (
    CorpusStats,
    bundled_corpus_path,
    corpus_files,
    file_format,
    format_corpus_summary,
    iter_documents,
    iter_pieces,
    split_text,
)


def read(path, **kwargs):
    stats = CorpusStats()
    docs = list(iter_documents(path, stats=stats, **kwargs))
    return docs, stats


def write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt",
    [("a.txt", "text"), ("a.MD", "text"), ("a.jsonl", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.json", "json"),
     ("a.csv", "csv"), ("a.tsv", "csv"), ("a.parquet", "parquet"), ("a.gz", None), ("a.pdf", None),
     (".txt", None), ("README", None)],
)
def test_file_format(name, fmt):
    assert file_format(name) == fmt


def test_txt_and_md_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\nSecond line.\n", encoding="utf-8")
    (tmp_path / "b.md").write_bytes(b"\xef\xbb\xbf# Title\n\nBody")  # a UTF-8 BOM is not part of the text
    docs, stats = read(tmp_path)
    assert docs == ["First line.\nSecond line.\n", "# Title\n\nBody"]
    assert stats.files_read == 2 and stats.documents == 2
    assert stats.characters == sum(map(len, docs))
    assert dict(stats.formats) == {"text": 2}


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_objects_and_strings(tmp_path, compress):
    path = tmp_path / ("c.jsonl.gz" if compress else "c.jsonl")
    write_jsonl(path, [{"text": "one", "id": 1}, "two", {"text": "three"}], compress=compress)
    with open(path, "ab") as f:  # blank lines are not records
        f.write(gzip.compress(b"\n\n") if compress else b"\n\n")
    docs, stats = read(path)
    assert docs == ["one", "two", "three"]
    assert not stats.skipped_records and not stats.skipped_files


def test_text_field_selects_the_key(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"body": "b1", "text": "t1"}, {"body": "b2", "text": "t2"}])
    assert read(tmp_path, text_field="body")[0] == ["b1", "b2"]
    assert read(tmp_path)[0] == ["t1", "t2"]


def test_json_list_object_and_strings(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x1"}, "x2", {"text": "x3"}]), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"text": "single", "title": "t"}), encoding="utf-8")
    docs, stats = read(tmp_path)
    assert docs == ["x1", "x2", "x3", "single"]
    assert stats.files_read == 2


def test_csv_with_quoted_multiline_text(tmp_path):
    (tmp_path / "a.csv").write_text(
        'id,text\n1,"Hello, world"\n2,"two\nlines with ""quotes"""\n3,plain\n', encoding="utf-8"
    )
    docs, _ = read(tmp_path)
    assert docs == ["Hello, world", 'two\nlines with "quotes"', "plain"]


def test_tsv_has_no_quoting(tmp_path):
    # GLUE-style TSV: quotes are ordinary characters, tabs separate columns.
    (tmp_path / "a.tsv").write_text('sentence\tlabel\n"it\'s" a "film\t1\nplain text\t0\n', encoding="utf-8")
    docs, _ = read(tmp_path, text_field="sentence")
    assert docs == ['"it\'s" a "film', "plain text"]


def test_parquet_is_read_batch_wise(tmp_path, monkeypatch):
    texts = [f"document {i}" for i in range(7)]
    pq.write_table(pa.table({"text": texts, "n": list(range(7))}), tmp_path / "p.parquet")
    batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(corpus_mod, "_PARQUET_BATCH", 3)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    docs, stats = read(tmp_path)
    assert docs == texts
    assert batches == [3, 3, 1]  # never the whole column at once
    assert dict(stats.formats) == {"parquet": 1}


def test_folder_is_walked_recursively_in_sorted_order_hidden_ignored(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "b" / "c").mkdir()
    (tmp_path / "b" / "c" / "d.txt").write_text("bcd", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("git", encoding="utf-8")
    docs, stats = read(tmp_path)
    assert docs == ["a", "bcd", "bz"]
    assert stats.files_seen == 3
    assert [p.name for p in corpus_files(tmp_path)] == ["a.txt", "d.txt", "z.txt"]


def test_iteration_is_lazy(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}", encoding="utf-8")
    stats = CorpusStats()
    it = iter_documents(tmp_path, stats=stats)
    assert next(it) == "doc 0"
    assert stats.files_seen == 1  # the later files are not opened yet


# ---------------------------------------------------------------------------------------------------------
# skip reasons
# ---------------------------------------------------------------------------------------------------------


def test_every_file_skip_reason_is_counted_with_its_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "usable"}])
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "zero.txt").write_bytes(b"")
    (tmp_path / "spaces.md").write_text("  \n\t\n", encoding="utf-8")
    (tmp_path / "nothing.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "does-not-exist.txt")
    (tmp_path / "broken.json").write_text('{"text": "unterminated', encoding="utf-8")
    (tmp_path / "scalar.json").write_text("42", encoding="utf-8")
    (tmp_path / "nofield.json").write_text('{"body": "x"}', encoding="utf-8")
    (tmp_path / "emptylist.json").write_text("[]", encoding="utf-8")
    (tmp_path / "nocol.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    (tmp_path / "header_only.csv").write_text("id,text\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")

    docs, stats = read(tmp_path)
    assert docs == ["usable"]
    assert dict(stats.skipped_files) == {
        "unsupported-type": 1,
        "binary": 1,
        "not-utf8": 1,
        "empty": 6,  # zero.txt, spaces.md, nothing.jsonl.gz, emptylist.json, header_only.csv, norows.parquet
        "unreadable": 3,  # corrupt gzip, dangling link, bad parquet
        "invalid-json": 2,  # broken.json, scalar.json
        "missing-field": 3,  # nofield.json, nocol.csv, nocol.parquet
        "non-text-field": 1,
    }
    assert stats.files_seen == 19 and stats.files_read == 1
    examples = "\n".join(sum(stats.examples.values(), []))
    for name in ["paper.pdf", "image.txt", "latin1.txt", "header_only.csv", "corrupt.jsonl.gz", "dangling.txt",
                 "broken.json", "nofield.json", "nocol.csv", "ints.parquet", "bad.parquet"]:
        assert str(tmp_path / name) in examples, name
    assert "NUL byte at offset 8" in examples
    assert "invalid UTF-8 at byte 3" in examples
    assert "top level is a JSON int" in examples
    assert str(good) not in examples


def test_a_file_is_used_whole_or_skipped_whole(tmp_path):
    # The bad byte sits after many good lines: the file must not contribute its first documents.
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(2000)).encode()
    (tmp_path / "late.jsonl").write_bytes(lines + b'{"text": "\xff"}\n')
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "ok"}])
    docs, stats = read(tmp_path)
    assert docs == ["ok"]
    assert dict(stats.skipped_files) == {"not-utf8": 1}


@pytest.fixture(params=["in-memory", "streamed"])
def streaming(request, monkeypatch):
    """Run a test twice: JSON parsed whole, and every JSON line or file over 8 characters taken apart by the
    streaming reader in blocks of 5 characters (escapes, keys and values cut by block ends)."""
    if request.param == "streamed":
        monkeypatch.setattr(corpus_mod, "_in_memory_limit", lambda max_chars: 8)
        monkeypatch.setattr(corpus_mod, "_READ_CHARS", 5)
    return request.param


def test_every_record_skip_reason_is_counted_with_file_and_line(tmp_path, streaming):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join([
            '{"text": "good one"}',
            "{not json",
            "[1, 2]",
            '{"title": "no text"}',
            '{"text": null}',
            '{"text": 12}',
            '{"text": "   "}',
            '{"text": "lone \\ud800 surrogate"}',
            '{"text": "good two"}',
        ]) + "\n",
        encoding="utf-8",
    )
    (tmp_path / "items.json").write_text(json.dumps(["fine", 3, {"text": "also fine"}]), encoding="utf-8")
    (tmp_path / "short.csv").write_text("id,text\n1\n2,has text\n", encoding="utf-8")
    (tmp_path / "malformed.csv").write_text('id,text\n1,"ok"\n2,"broken"quote\n3,never read\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), tmp_path / "nulls.parquet")

    docs, stats = read(tmp_path)
    assert docs == ["fine", "also fine", "ok", "good one", "good two", "p1", "p2", "has text"]
    assert dict(stats.skipped_records) == {
        "bad-line": 3,  # "{not json", "[1, 2]", the malformed CSV row
        "bad-item": 1,
        "missing-field": 4,  # no key, null, short CSV row, parquet null
        "non-text-field": 1,
        "empty-document": 1,
        "not-utf8": 1,
    }
    assert not stats.skipped_files
    ex = stats.examples
    assert any(e.startswith(f"{path}:2: not JSON") for e in ex["record:bad-line"])
    assert f"{path}:4: no 'text'" in ex["record:missing-field"]
    assert any(e.startswith(f"{tmp_path / 'items.json'}:item 1") for e in ex["record:bad-item"])
    assert any(e.startswith(f"{tmp_path / 'malformed.csv'}:3: CSV error") for e in ex["record:bad-line"])
    assert any(e.startswith(f"{tmp_path / 'nulls.parquet'}:row 1") for e in ex["record:missing-field"])


def test_json_lines_named_json_get_a_hint(tmp_path):
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "ok.txt").write_text("ok", encoding="utf-8")
    _, stats = read(tmp_path)
    assert stats.skipped_files == {"invalid-json": 1}
    assert "name the file .jsonl" in stats.examples["file:invalid-json"][0]


def test_examples_are_capped_counts_are_not(tmp_path):
    (tmp_path / "bad.jsonl").write_text("x\n" * 50, encoding="utf-8")
    (tmp_path / "ok.txt").write_text("ok", encoding="utf-8")
    _, stats = read(tmp_path)
    assert stats.skipped_records["bad-line"] == 50
    assert len(stats.examples["record:bad-line"]) == corpus_mod.MAX_EXAMPLES


# ---------------------------------------------------------------------------------------------------------
# long documents: split while read, streamed JSON
# ---------------------------------------------------------------------------------------------------------


def test_split_text_gives_bounded_pieces_that_join_to_the_text():
    import random

    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab \n\tcé") for _ in range(rng.randint(0, 400)))
        max_chars = rng.randint(1, 60)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        pieces = list(split_text(chunks, max_chars))
        assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
        for p in pieces[:-1]:  # a piece ends at whitespace whenever its second half holds some
            tail = p[len(p) - (len(p) - max_chars // 2):] if len(p) == max_chars else ""
            assert p[-1].isspace() or not any(c.isspace() for c in tail[:-1])


def test_long_documents_are_split_while_read(tmp_path):
    words = [f"w{i}" for i in range(3000)]
    long_text = " ".join(words)  # ~16k characters
    (tmp_path / "a.txt").write_text(long_text, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "short"}, {"text": long_text[:5000]}])
    stats = CorpusStats()
    pieces = list(iter_pieces(tmp_path, stats=stats, dedup=False, max_document_chars=1000))
    by_doc: dict[int, list[str]] = {}
    for number, piece in pieces:
        assert len(piece) <= 1000
        by_doc.setdefault(number, []).append(piece)
    assert ["".join(p) for p in by_doc.values()] == [long_text, "short", long_text[:5000]]
    assert all(p.endswith(" ") for p in by_doc[0][:-1])  # cut between words, never inside one
    assert stats.documents == 3 and stats.split_documents == 2 and stats.pieces == len(pieces)
    assert "documents over 1,000 characters are split while read: 2 split" in stats.format()
    assert stats.to_dict()["max_document_chars"] == 1000
    # the pieces are documents for what follows: iter_documents yields them
    assert list(iter_documents(tmp_path, dedup=False, max_document_chars=1000)) == [p for _, p in pieces]


def test_an_io_error_while_a_long_document_streams_skips_the_rest_of_its_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("word " * 1000, encoding="utf-8")
    (tmp_path / "b.txt").write_text("next file", encoding="utf-8")
    real = corpus_mod._read_text

    def failing(path, *args):
        for doc in real(path, *args):
            if path.name == "a.txt":
                def chunks(inner=doc.chunks):
                    yield next(inner)
                    raise OSError("device went away")
                doc.chunks = chunks()
            yield doc

    monkeypatch.setattr(corpus_mod, "_read_text", failing)
    monkeypatch.setattr(corpus_mod, "_READ_CHARS", 1000)
    docs, stats = read(tmp_path, max_document_chars=300)
    assert docs[-1] == "next file" and 1 <= len(docs) - 1 <= 4  # a.txt's pieces read before the error, then b.txt
    assert stats.skipped_files == {"unreadable": 1}
    assert "device went away (after 1 documents were read)" in stats.examples["file:unreadable"][0]


def _tricky_text(rng, n):
    alphabet = list("ab cd\n\t\"\\/é€") + ["\U0001F600", "[", "]", "{", "}", ",", ":", "\x7f"]
    return "".join(rng.choice(alphabet) for _ in range(n)) + "."


def test_streamed_json_gives_what_json_gives(tmp_path, monkeypatch):
    """Records full of escapes (surrogate pairs among them), other keys before and after the text holding
    nested values and brackets inside strings: read at 5 characters per block, as json.loads reads them."""
    import random

    rng = random.Random(1)
    records = []
    for i in range(40):
        rec = {"n": i, "other": {"x": [1, -2.5e3, True, None, "s\"]}", {"y": [[]]}]}} if i % 3 == 0 else {}
        rec["text"] = _tricky_text(rng, rng.randint(1, 500))
        if i % 2:
            rec["after"] = ["[{\\", _tricky_text(rng, 40), {"t": "not the text"}]
        records.append(rec if i % 7 else rec["text"])
    lines = "".join(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n" for i, r in enumerate(records))
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"meta": records[:3], "text": "the one document"}), encoding="utf-8")
    expected = [r["text"] if isinstance(r, dict) else r for r in records]
    reference = read(tmp_path, dedup=False)[0]
    assert reference == expected * 2 + ["the one document"]
    monkeypatch.setattr(corpus_mod, "_in_memory_limit", lambda max_chars: 16)
    monkeypatch.setattr(corpus_mod, "_READ_CHARS", 5)
    docs, stats = read(tmp_path, dedup=False)
    assert docs == reference and not stats.skipped_records and not stats.skipped_files
    pieces, stats = read(tmp_path, dedup=False, max_document_chars=50)  # streamed and split
    assert "".join(pieces) == "".join(reference) and max(map(len, pieces)) <= 50
    assert stats.documents == len(reference) and stats.pieces == len(pieces) > len(reference)


def test_a_broken_long_record_is_skipped_after_its_text(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "_in_memory_limit", lambda max_chars: 16)
    monkeypatch.setattr(corpus_mod, "_READ_CHARS", 7)
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "first record text", "x": [1, 2}\n'  # broken after the text
                    '{"text": "second record text"}\n'
                    '{"id": "no text field in this long record"}\n'
                    '{"text": 12345678901234567890}\n'
                    '"a top-level string record"   x\n'  # extra data after the value
                    '{"text": "third" "oops"}\n', encoding="utf-8")
    items = '[{"text": "item zero"}, "one", {"text": "item two is long", "x": ]}, "never read"]'
    (tmp_path / "b.json").write_text(items, encoding="utf-8")
    docs, stats = read(tmp_path)
    assert docs == ["first record text", "second record text", "a top-level string record", "third", "item zero",
                    "one", "item two is long"]
    assert dict(stats.skipped_records) == {"bad-line": 3, "missing-field": 1, "non-text-field": 1, "bad-item": 1}
    ex = stats.examples["record:bad-line"]
    assert any(e.startswith(f"{path}:1: not JSON") and "the text read before it was used" in e for e in ex)
    assert any(e.startswith(f"{path}:5: extra data after the record") for e in ex)
    assert stats.skipped_files == {"invalid-json": 1}
    assert "item 2 is not valid JSON; items after it skipped" in stats.examples["file:invalid-json"][0]


# ---------------------------------------------------------------------------------------------------------
# dedup, errors, summary
# ---------------------------------------------------------------------------------------------------------


def test_exact_duplicates_are_dropped_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "same"}, {"text": "other"}, {"text": "same"}])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "same"}, {"text": "same "}], compress=True)
    (tmp_path / "c.txt").write_text("other", encoding="utf-8")
    docs, stats = read(tmp_path)
    assert docs == ["same", "other", "same "]  # "same " differs by a space: not an exact duplicate
    assert stats.duplicates == 3 and stats.documents == 3
    docs, stats = read(tmp_path, dedup=False)
    assert len(docs) == 6 and stats.duplicates == 0


def test_missing_path_and_unsupported_single_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus not found: .*nope"):
        list(iter_documents(tmp_path / "nope"))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=r"x\.pdf: unsupported corpus file type"):
        list(iter_documents(tmp_path / "x.pdf"))


def test_no_documents_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    write_jsonl(tmp_path / "wrong.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=rf"{tmp_path}: no documents found .*'empty': 1.*record:missing-field.*'text'"):
        list(iter_documents(tmp_path))
    empty_dir = tmp_path / "void"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="void: no documents found"):
        list(iter_documents(empty_dir))


def test_summary_is_printed_and_saved(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "hello"}, {"text": "world"}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "{bad\n")
    (tmp_path / "z.bin").write_bytes(b"\x00")
    _, stats = read(tmp_path)
    text = stats.format()
    assert "1 of 2 files read, 2 documents, 10 characters" in text
    assert "duplicate documents dropped: 1" in text
    assert "skipped files: unsupported-type 1" in text
    assert "skipped records: bad-line 1" in text and "a.jsonl:4" in text
    saved = json.loads(stats.save(tmp_path / "out" / "summary.json").read_text())
    assert saved["documents"] == 2 and saved["duplicates_dropped"] == 1
    assert saved["skipped_records"] == {"bad-line": 1}
    assert format_corpus_summary(saved) == text  # the saved JSON renders the same summary


def test_bundled_corpus():
    path = bundled_corpus_path()
    assert (path / "moby_dick.jsonl.gz").is_file()
    assert sum(p.stat().st_size for p in corpus_files(path)) <= 5 * 2**20
    docs, stats = read(path)
    assert stats.documents == 139 and stats.duplicates == 0 and not stats.skipped_files
    assert docs[0].startswith("CHAPTER 1. Loomings.")
    assert (path.parent / "README.md").read_text().count("public domain") >= 1
