"""Read a corpus: stream the documents of one file or of a folder tree, skipping what cannot be read.

A corpus is a file or a folder (walked recursively, in sorted order, hidden entries ignored) of

=================  ==================================================================================
``.txt``, ``.md``  the whole file is one document
``.jsonl``         one JSON value per line: an object (its ``text_field`` is the document) or a string
``.jsonl.gz``      the same, gzip-compressed
``.json``          a list of such objects or strings, or one object; parsed a file at a time
``.csv``, ``.tsv`` a header row naming the columns; the ``text_field`` column is the document
                   (``.tsv`` is split on tabs with no quoting, the GLUE convention)
``.parquet``       the ``text_field`` column, read in record batches through pyarrow
=================  ==================================================================================

Documents are produced one at a time (:func:`iter_documents` is a generator), so memory holds at most one
file of a ``.txt``/``.md``/``.json`` kind and one line, row or record batch of the others; never the corpus.

What is not usable is skipped and counted in :class:`CorpusStats`, by reason, with a few examples naming
the file (and line):

* whole files: ``unsupported-type`` (suffix not in the table), ``binary`` (a NUL byte), ``not-utf8``,
  ``empty`` (no bytes, only whitespace, or no rows), ``unreadable`` (permissions, broken link, corrupt
  gzip or parquet), ``invalid-json`` (a ``.json`` file that does not parse or holds no list or object),
  ``missing-field`` (a CSV/TSV/Parquet file without the text column, a JSON object without the field),
  ``non-text-field`` (a Parquet text column that does not hold strings);
* single records: ``bad-line`` (a JSON line that does not parse or is not an object or a string, a CSV
  row the parser rejects), ``bad-item`` (a JSON list item that is not an object or a string),
  ``missing-field`` (the record lacks the field or holds null), ``non-text-field`` (the field is not a
  string), ``empty-document`` (the text is only whitespace), ``not-utf8`` (a JSON string escaping an
  unpaired surrogate, which no UTF-8 tokenizer accepts).

Text files are checked for NUL bytes and strict UTF-8 (a leading BOM is allowed) in one streaming pass
before their first document is read, so a file is either used whole or skipped whole.

Exact duplicate documents (same text, byte for byte) are dropped and counted, by a set of 16-byte BLAKE2b
digests of the documents seen (about 100 bytes of memory per distinct document).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..artifacts import atomic_write_json

#: File name suffix -> reader. ``.jsonl.gz`` is matched before ``.gz`` would be.
FORMATS: dict[str, str] = {
    ".jsonl.gz": "jsonl",
    ".jsonl": "jsonl",
    ".json": "json",
    ".txt": "text",
    ".md": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}

#: How many example locations to keep per skip reason (the counts are always complete).
MAX_EXAMPLES = 5

_BLOCK = 1 << 20  # bytes per read in the UTF-8/NUL check
_PARQUET_BATCH = 1024  # rows per record batch: bounds memory on files with long documents


def bundled_corpus_path() -> Path:
    """The public-domain sample corpus shipped in ``mosaic_embed/resources/corpus`` (Moby-Dick, 139 chapters)."""
    return Path(__file__).resolve().parent.parent / "resources" / "corpus"


def file_format(path: str | Path) -> str | None:
    """The reader for a file name (``"text"``, ``"jsonl"``, ``"json"``, ``"csv"``, ``"parquet"``), or None."""
    name = Path(path).name.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def corpus_files(path: str | Path) -> list[Path]:
    """Every non-hidden entry that is not a folder under ``path`` (or ``[path]`` for a file), sorted.

    Unsupported files are listed too: :func:`iter_documents` counts them as skipped, and a cache key built
    from this list changes when any of them does.
    """
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        raise FileNotFoundError(f"corpus not found: {root}")
    if not root.is_dir():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, .cache, editor state) are never corpus; prune them from the walk.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    # Sorted by path components (a/b/c.txt before a/z.txt), not in os.walk's files-before-subfolders order.
    return sorted(found, key=lambda p: p.relative_to(root).parts)


@dataclass
class CorpusStats:
    """What reading a corpus found: counts of files, documents, characters, and everything skipped, by reason.

    Filled in by :func:`iter_documents` as it streams; complete once the generator is exhausted.
    """

    path: str = ""
    text_field: str = "text"
    files_seen: int = 0
    files_read: int = 0
    documents: int = 0
    characters: int = 0
    duplicates: int = 0
    formats: Counter = field(default_factory=Counter)
    skipped_files: Counter = field(default_factory=Counter)
    skipped_records: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip_file(self, reason: str, path: Path, detail: str) -> None:
        self.skipped_files[reason] += 1
        self._example(f"file:{reason}", f"{path}: {detail}")

    def skip_record(self, reason: str, where: str, detail: str) -> None:
        self.skipped_records[reason] += 1
        self._example(f"record:{reason}", f"{where}: {detail}")

    def _example(self, key: str, text: str) -> None:
        examples = self.examples.setdefault(key, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "text_field": self.text_field,
            "files_seen": self.files_seen,
            "files_read": self.files_read,
            "documents": self.documents,
            "characters": self.characters,
            "duplicates_dropped": self.duplicates,
            "files_by_format": dict(sorted(self.formats.items())),
            "skipped_files": dict(sorted(self.skipped_files.items())),
            "skipped_records": dict(sorted(self.skipped_records.items())),
            "examples": self.examples,
        }

    def format(self) -> str:
        """A few human-readable lines (what ``mosaic-embed data prepare`` prints)."""
        return format_corpus_summary(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write the summary as JSON (atomically)."""
        return atomic_write_json(path, self.to_dict())


def format_corpus_summary(summary: dict[str, Any]) -> str:
    """Render :meth:`CorpusStats.to_dict` (also as read back from a manifest) as a few lines."""
    lines = [
        f"corpus {summary['path']}: {summary['files_read']:,} of {summary['files_seen']:,} files read, "
        f"{summary['documents']:,} documents, {summary['characters']:,} characters",
        f"  duplicate documents dropped: {summary['duplicates_dropped']:,}",
    ]
    for kind in ("files", "records"):
        skipped = summary[f"skipped_{kind}"]
        if not skipped:
            lines.append(f"  skipped {kind}: none")
            continue
        lines.append(f"  skipped {kind}: " + ", ".join(f"{reason} {n:,}" for reason, n in skipped.items()))
        for reason in skipped:
            for example in summary["examples"].get(f"{kind[:-1]}:{reason}", [])[:2]:
                lines.append(f"    {reason}: {example}")
    return "\n".join(lines)


def iter_documents(
    path: str | Path,
    text_field: str = "text",
    stats: CorpusStats | None = None,
    dedup: bool = True,
) -> Iterator[str]:
    """Stream the documents of a corpus file or folder, in sorted file order, each a non-blank string.

    Args:
        path: a corpus file or a folder (walked recursively); formats in the module docstring.
        text_field: the key (JSON) or column (CSV/TSV/Parquet) holding the text.
        stats: filled in while iterating (pass one in to read the counts afterwards).
        dedup: drop exact duplicate documents (counted in ``stats.duplicates``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a single file of an unsupported type, or nothing usable was found
            (raised when the generator is exhausted, with the skip counts).
    """
    root = Path(path)
    files = corpus_files(root)
    if not root.is_dir() and file_format(root) is None:
        supported = ", ".join(FORMATS)
        raise ValueError(f"{root}: unsupported corpus file type (supported: {supported})")
    stats = stats if stats is not None else CorpusStats()
    stats.path, stats.text_field = str(root), text_field
    seen: set[bytes] = set()
    for file in files:
        stats.files_seen += 1
        fmt = file_format(file)
        if fmt is None:
            stats.skip_file("unsupported-type", file, f"suffix not one of {', '.join(FORMATS)}")
            continue
        for text in _read_file(file, fmt, text_field, stats):
            if dedup:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    stats.duplicates += 1
                    continue
                seen.add(digest)
            stats.documents += 1
            stats.characters += len(text)
            yield text
    if stats.documents == 0:
        skipped = dict(stats.skipped_files) | {f"record:{k}": v for k, v in stats.skipped_records.items()}
        raise ValueError(
            f"{root}: no documents found ({stats.files_seen} files seen; skipped: {skipped or 'nothing'}; "
            f"duplicates: {stats.duplicates}; text field '{text_field}')"
        )


# ----------------------------------------------------------------------------------------------------------
# strict line readers: JSON lines and TSV files whose every line must be right (BEIR sets, pairs, embed input)
# ----------------------------------------------------------------------------------------------------------


def open_text(path: str | Path) -> IO[str]:
    """Open a UTF-8 text file (a leading BOM is dropped), transparently gunzipping ``*.gz``."""
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, raw line) of every non-blank line of a text file (``.gz`` allowed).

    A file that is not UTF-8 text, or a ``.gz`` that is corrupt or cut short, is a ``ValueError`` naming it.
    """
    path = Path(path)
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError as err:  # decoded in blocks: no line number to give
            bad = err.object[err.start:err.start + 1].hex()
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{bad}: {err.reason})") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from None


def parse_json_object(line: str, path: str | Path, lineno: int) -> dict[str, Any]:
    """One JSON-lines record; anything but a JSON object is a ``ValueError("FILE:LINE: ...")``."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON-lines file (``.gz`` allowed).

    The one strict JSON-lines reader (BEIR folders, training pairs, embedding input): every line must be a
    JSON object, and the first that is not is an error naming the file and line. (Corpus reading, above,
    is the tolerant kind: it skips and counts bad records instead.)
    """
    for lineno, line in iter_lines(path):
        yield lineno, parse_json_object(line, path, lineno)


def iter_tsv(path: str | Path, is_header: Callable[[list[str]], bool]) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of every non-blank line; a first line ``is_header`` accepts is skipped."""
    for lineno, line in iter_lines(path):
        parts = line.rstrip("\n\r").split("\t")
        if lineno == 1 and is_header([p.strip().lower() for p in parts]):
            continue
        yield lineno, parts


# ----------------------------------------------------------------------------------------------------------
# one file
# ----------------------------------------------------------------------------------------------------------


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_text(path: Path) -> tuple[str, str] | None:
    """Stream a text-kind file once: ``(reason, detail)`` if it is binary, not UTF-8 or blank, else None."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="strict")
    offset, blank = 0, True
    with _open_binary(path) as f:
        while block := f.read(_BLOCK):
            nul = block.find(b"\x00")
            if nul >= 0:
                return "binary", f"NUL byte at offset {offset + nul}"
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError as err:
                return "not-utf8", f"invalid UTF-8 at byte {offset + err.start}"
            blank = blank and not text.strip()
            offset += len(block)
        try:
            blank = blank and not decoder.decode(b"", final=True).strip()
        except UnicodeDecodeError:
            return "not-utf8", "truncated UTF-8 sequence at end of file"
    if offset == 0:
        return "empty", "0 bytes" + (" after decompression" if path.name.lower().endswith(".gz") else "")
    if blank:
        return "empty", "only whitespace"
    return None


def _read_file(path: Path, fmt: str, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """Yield the non-blank documents of one file; skips are recorded in ``stats``."""
    yielded = 0
    try:
        if path.is_symlink() and not path.exists():
            stats.skip_file("unreadable", path, "broken symbolic link")
            return
        if not path.is_file():
            stats.skip_file("unsupported-type", path, "not a regular file")
            return
        if fmt != "parquet":
            problem = _check_text(path)
            if problem is not None:
                stats.skip_file(problem[0], path, problem[1])
                return
        reader = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}.get(
            fmt, _read_parquet
        )
        counted = False
        for text in reader(path, text_field, stats):
            if not counted:  # a file counts as read once it gives its first record
                stats.files_read += 1
                stats.formats[fmt] += 1
                counted = True
            if text is None:  # a record skipped by the reader, already counted
                continue
            yielded += 1
            yield text
    # permissions, corrupt gzip, I/O errors; a decode error here means the file changed after its check
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        detail = f"{type(err).__name__}: {err}"
        if yielded:
            detail += f" (after {yielded} documents were read)"
        stats.skip_file("unreadable", path, detail)


def _usable(text: Any, where: str, text_field: str, stats: CorpusStats) -> str | None:
    """The record's text if it is a non-blank string; otherwise count why not and return None."""
    if text is None:
        stats.skip_record("missing-field", where, f"no '{text_field}'")
        return None
    if not isinstance(text, str):
        stats.skip_record("non-text-field", where, f"'{text_field}' is {type(text).__name__}, not a string")
        return None
    if not text.strip():
        stats.skip_record("empty-document", where, "only whitespace")
        return None
    try:  # JSON may escape lone surrogates (\ud800) that no UTF-8 tokenizer accepts
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        stats.skip_record("not-utf8", where, f"unpaired surrogate at character {err.start}")
        return None
    return text


def _from_value(value: Any, where: str, text_field: str, stats: CorpusStats, reason: str) -> str | None:
    """A parsed JSON value -> its text: a string is the text, an object holds it under ``text_field``."""
    if isinstance(value, str):
        return _usable(value, where, text_field, stats)
    if isinstance(value, dict):
        return _usable(value.get(text_field), where, text_field, stats)
    stats.skip_record(reason, where, f"a JSON {type(value).__name__}, not an object or a string")
    return None


def _read_text(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str | None]:
    # _check_text has already proven the file UTF-8 and not blank.
    yield path.read_text(encoding="utf-8-sig")


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str | None]:
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                stats.skip_record("bad-line", where, f"not JSON ({err.msg} at column {err.colno})")
                yield None
                continue
            yield _from_value(value, where, text_field, stats, "bad-line")


def _read_json(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str | None]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        hint = " (one JSON value per line? name the file .jsonl)" if err.msg == "Extra data" else ""
        stats.skip_file("invalid-json", path, f"{err.msg} at line {err.lineno} column {err.colno}{hint}")
        return
    if isinstance(value, dict):
        if text_field not in value:
            stats.skip_file("missing-field", path, f"the object has no '{text_field}' (keys: {sorted(value)[:10]})")
            return
        yield _usable(value[text_field], str(path), text_field, stats)
    elif isinstance(value, list):
        if not value:
            stats.skip_file("empty", path, "an empty JSON list")
            return
        for i, item in enumerate(value):
            yield _from_value(item, f"{path}:item {i}", text_field, stats, "bad-item")
    else:
        stats.skip_file("invalid-json", path, f"top level is a JSON {type(value).__name__}, not a list or object")


def _read_csv(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str | None]:
    tsv = path.name.lower().endswith(".tsv")
    # Documents are long; the csv module's default 128 KiB field limit would reject whole books.
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8-sig", newline="") as f:
        # strict: a malformed quoted field is an error to report, not a row to mangle silently.
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ",", "strict": True}
        reader = csv.DictReader(f, **dialect)
        columns = reader.fieldnames or []
        if text_field not in columns:
            stats.skip_file("missing-field", path, f"no column '{text_field}' (columns: {columns[:10]})")
            return
        rows = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # the parser cannot resynchronise after this: stop the file here
                # line_num counts the lines read before the failing one
                where = f"{path}:{reader.line_num + 1}"
                stats.skip_record("bad-line", where, f"CSV error ({err}); rest of file skipped")
                yield None
                return
            rows += 1
            yield _usable(row.get(text_field), f"{path}:{reader.line_num}", text_field, stats)
        if rows == 0:
            stats.skip_file("empty", path, "a header but no rows")


def _read_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        stats.skip_file("unreadable", path, f"not a readable Parquet file ({err})")
        return
    with contextlib.closing(pf):
        schema = pf.schema_arrow
        if text_field not in schema.names:
            stats.skip_file("missing-field", path, f"no column '{text_field}' (columns: {schema.names[:10]})")
            return
        col_type = schema.field(text_field).type
        if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
            stats.skip_file("non-text-field", path, f"column '{text_field}' is {col_type}, not a string")
            return
        if pf.metadata.num_rows == 0:
            stats.skip_file("empty", path, "no rows")
            return
        row = 0
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[text_field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except pa.ArrowException as err:  # a corrupt page: the rest of the file cannot be trusted
                stats.skip_record("bad-line", f"{path}:row {row}", f"Parquet error ({err}); rest of file skipped")
                yield None
                return
            for text in batch.column(0).to_pylist():
                yield _usable(text, f"{path}:row {row}", text_field, stats)
                row += 1
