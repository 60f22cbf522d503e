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

Documents are produced one at a time (:func:`iter_documents` is a generator), and a long one in pieces: a
document longer than ``max_document_chars`` is cut, while it is read, into consecutive pieces of at most
that many characters (after the last whitespace of a piece where it has one in its second half, so words
stay whole; joined, the pieces give the document back). Memory is therefore bounded by that setting, not
by the shape of the files: a ``.txt``/``.md`` file is read in blocks, a JSON line or ``.json`` file too long
to hold is taken apart by a streaming reader that decodes the text's string in blocks and skips other
values without holding them. Each piece is a document for what follows (tokenizing, deduplication); the
summary counts the documents that were split. Two parsers cannot stream one value: a CSV/TSV field and a
Parquet cell are read whole, then split like any other document.

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
digests of the documents seen (about 100 bytes of memory per distinct document); the pieces of a split
document are compared piece by piece.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import hashlib
import itertools
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
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
#: Default longest document piece, in characters (``DataConfig.max_document_chars``): well above a book
#: chapter or a long article (the bundled corpus's longest chapter has 45k), so only outsized documents are cut.
MAX_DOCUMENT_CHARS = 100_000
_READ_CHARS = 1 << 16  # characters per read of a text or JSON file that is streamed
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
    documents: int = 0  # documents that gave at least one piece
    pieces: int = 0  # what was yielded: one per document, more for a split one
    split_documents: int = 0  # documents longer than max_document_chars, yielded in several pieces
    max_document_chars: int = MAX_DOCUMENT_CHARS
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
            "pieces": self.pieces,
            "split_documents": self.split_documents,
            "max_document_chars": self.max_document_chars,
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
    ]
    if summary.get("max_document_chars"):  # (summaries written before documents were split lack it)
        split = summary["split_documents"]
        lines.append(f"  documents over {summary['max_document_chars']:,} characters are split while read: "
                     + (f"{split:,} split, {summary['pieces']:,} pieces in all" if split else "none"))
    lines.append(f"  duplicate documents dropped: {summary['duplicates_dropped']:,}")
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
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> Iterator[str]:
    """Stream the documents of a corpus file or folder, in sorted file order, each a non-blank string of at
    most ``max_document_chars`` characters (a longer document comes as several, see the module docstring).

    Args:
        path: a corpus file or a folder (walked recursively); formats in the module docstring.
        text_field: the key (JSON) or column (CSV/TSV/Parquet) holding the text.
        stats: filled in while iterating (pass one in to read the counts afterwards).
        dedup: drop exact duplicate documents (counted in ``stats.duplicates``).
        max_document_chars: the longest piece yielded; longer documents are split while read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a single file of an unsupported type, or nothing usable was found
            (raised when the generator is exhausted, with the skip counts).
    """
    for _, piece in iter_pieces(path, text_field, stats, dedup, max_document_chars):
        yield piece


def iter_pieces(
    path: str | Path,
    text_field: str = "text",
    stats: CorpusStats | None = None,
    dedup: bool = True,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> Iterator[tuple[int, str]]:
    """:func:`iter_documents` with the number of the document each piece comes from (0, 1, ...; the pieces of
    one split document share it), for callers that keep a document's pieces together."""
    if max_document_chars < 1:
        raise ValueError(f"max_document_chars must be >= 1, got {max_document_chars}")
    root = Path(path)
    files = corpus_files(root)
    if not root.is_dir() and file_format(root) is None:
        supported = ", ".join(FORMATS)
        raise ValueError(f"{root}: unsupported corpus file type (supported: {supported})")
    stats = stats if stats is not None else CorpusStats()
    stats.path, stats.text_field, stats.max_document_chars = str(root), text_field, max_document_chars
    seen: set[bytes] = set()
    for file in files:
        stats.files_seen += 1
        fmt = file_format(file)
        if fmt is None:
            stats.skip_file("unsupported-type", file, f"suffix not one of {', '.join(FORMATS)}")
            continue
        n = kept = 0  # pieces of the current document seen, and kept
        for first, text in _read_file(file, fmt, text_field, stats, max_document_chars):
            if first:
                stats.documents += 1 if kept else 0
                n = kept = 0
            n += 1
            if n == 2:
                stats.split_documents += 1
            if dedup:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    stats.duplicates += 1
                    continue
                seen.add(digest)
            kept += 1
            stats.pieces += 1
            stats.characters += len(text)
            yield stats.documents, text
        stats.documents += 1 if kept else 0
    if stats.documents == 0:
        skipped = dict(stats.skipped_files) | {f"record:{k}": v for k, v in stats.skipped_records.items()}
        raise ValueError(
            f"{root}: no documents found ({stats.files_seen} files seen; skipped: {skipped or 'nothing'}; "
            f"duplicates: {stats.duplicates}; text field '{text_field}')"
        )


def split_text(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The text ``"".join(chunks)`` as consecutive pieces of at most ``max_chars`` characters, each cut after
    its last whitespace if that lies in its second half (else at ``max_chars``). Joined they give the text
    back. Holds at most ``max_chars`` characters plus one chunk, however long the text."""
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size <= max_chars:
            continue
        buf, pos = "".join(parts), 0
        while len(buf) - pos > max_chars:  # more than one piece's worth: the next piece is complete
            end = pos + max_chars
            cut = max(buf.rfind(c, pos + max_chars // 2, end) for c in " \n\t\r")
            cut = end if cut < 0 else cut + 1
            yield buf[pos:cut]
            pos = cut
        parts, size = [buf[pos:]], len(buf) - pos
    if size:
        yield "".join(parts)


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


def record_id(obj: dict[str, Any], path: str | Path, lineno: int, id_field: str | None, position: int) -> str:
    """A JSON-lines record's id: ``id_field`` when one is named (then required), else ``_id``, ``id``, or the
    record's position in the file."""
    if id_field is not None:
        if id_field not in obj:
            raise ValueError(f"{path}:{lineno}: missing id field '{id_field}'")
        return str(obj[id_field])
    return str(obj.get("_id", obj.get("id", position)))


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


class _Streamed:
    """One document read in chunks (a whole ``.txt`` file, a JSON string too long to hold), from ``where``.

    ``error`` is set if the input turned out broken part-way (what was read stays used; the reader reports
    the record)."""

    def __init__(self, chunks: Iterator[str], where: str) -> None:
        self.chunks, self.where, self.error = chunks, where, None

    def pieces(self, max_chars: int, stats: CorpusStats) -> Iterator[str]:
        blank = True
        for piece in split_text(self.chunks, max_chars):
            if not piece.strip():
                continue
            blank = False
            try:
                piece.encode("utf-8")
            except UnicodeEncodeError as err:
                stats.skip_record("not-utf8", self.where, f"unpaired surrogate at character {err.start} of a "
                                  f"{len(piece):,}-character piece (that piece skipped)")
                continue
            yield piece
        if blank and self.error is None:
            stats.skip_record("empty-document", self.where, "only whitespace")


def _read_file(path: Path, fmt: str, text_field: str, stats: CorpusStats, max_chars: int) -> Iterator[tuple[bool, str]]:
    """Yield ``(first, piece)`` for the pieces of one file's documents, ``first`` on each document's first
    piece; skips are recorded in ``stats``. A long document is read here piece by piece, so an I/O error
    part-way is caught here too."""
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
        for item in reader(path, text_field, stats, _in_memory_limit(max_chars)):
            if not counted:  # a file counts as read once it gives its first record
                stats.files_read += 1
                stats.formats[fmt] += 1
                counted = True
            if item is None:  # a record skipped by the reader, already counted
                continue
            yielded += 1
            pieces = split_text((item,), max_chars) if isinstance(item, str) else item.pieces(max_chars, stats)
            first = True
            for piece in pieces:
                if piece.strip():  # (a stretch of whitespace inside a long document: nothing to learn from)
                    yield first, piece
                    first = False
    # permissions, corrupt gzip, I/O errors; a decode error here means the file changed after its check
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        detail = f"{type(err).__name__}: {err}"
        if yielded:
            detail += f" (after {yielded} documents were read)"
        stats.skip_file("unreadable", path, detail)


def _in_memory_limit(max_chars: int) -> int:
    """Characters of one JSON line or ``.json`` file parsed in memory (fast); longer ones are streamed."""
    return max(1 << 16, 2 * max_chars)


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


def _read_text(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[_Streamed]:
    # _check_text has already proven the file UTF-8 and not blank; the whole file is one document, read in blocks
    def chunks() -> Iterator[str]:
        with open(path, encoding="utf-8-sig") as f:
            while chunk := f.read(_READ_CHARS):
                yield chunk

    yield _Streamed(chunks(), str(path))


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[str | _Streamed | None]:
    with open_text(path) as f:
        lineno = 0
        while line := f.readline(limit):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(line) == limit and not line.endswith("\n"):  # a line too long to hold: stream it
                rest = _LineRest(f, limit)
                stream = _JsonStream(rest.read, line)
                if (yield from _stream_record(stream, where, text_field, stats, "bad-line")) and stream.peek():
                    stats.skip_record("bad-line", where, f"extra data after the record at {stream.where()}")
                rest.drain()  # what an error left unread of the line
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                stats.skip_record("bad-line", where, f"not JSON ({err.msg} at column {err.colno})")
                yield None
                continue
            yield _from_value(value, where, text_field, stats, "bad-line")


def _read_json(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[str | _Streamed | None]:
    if path.stat().st_size > limit:  # bytes >= characters: too long to hold, stream it
        yield from _stream_json_file(path, text_field, stats, limit)
        return
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


# ----------------------------------------------------------------------------------------------------------
# streaming JSON: a value too long to hold, taken apart in blocks
# ----------------------------------------------------------------------------------------------------------


class _JsonError(ValueError):
    """The JSON being streamed is not valid (message: what was expected, where)."""


_WS = re.compile(r"[ \t\n\r]*")
#: Inside a string: plain characters and whole escapes, up to the closing quote (or something invalid).
_STRING_RUN = re.compile(r'(?:[^"\\\x00-\x1f]+|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")
_SCALAR = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null")
_KEY_LIMIT = 1 << 12  # an object key longer than this is not a corpus record's
_DECODER = json.JSONDecoder()


class _LineRest:
    """The rest of the current line of a text file, in parts of at most ``size`` characters."""

    def __init__(self, f: IO[str], size: int) -> None:
        self.f, self.size, self.done = f, size, False

    def read(self) -> str:
        if self.done:
            return ""
        part = self.f.readline(self.size)
        self.done = not part or part.endswith("\n")
        return part

    def drain(self) -> None:
        while self.read():
            pass


class _JsonStream:
    """A JSON text read in blocks (``read()`` returns the next one, "" at the end), parsed just enough to take
    one huge value apart: short values go through ``json`` at C speed, a long string comes out decoded in
    chunks, a long value of another kind is skipped. Memory: about one block plus one short value."""

    def __init__(self, read: Callable[[], str], buf: str = "") -> None:
        self._read, self.buf, self.pos, self.offset = read, buf, 0, 0

    def fill(self) -> bool:
        """Append the next block to what is left unread; False at the end of the input."""
        block = self._read()
        if not block:
            return False
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos:] + block, 0
        return True

    def where(self) -> str:
        return f"character {self.offset + self.pos:,}"

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the input), not consumed."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _JsonError(f"expected '{char}' at {self.where()}")
        self.pos += 1

    def value(self, limit: int) -> tuple[bool, Any]:
        """``(True, value)`` for the next value if it ends within ``limit`` characters; ``(False, None)``, nothing
        consumed, for a longer one."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                # a value cut off by the end of the block fails near the block's end, or as an open string
                cut = err.pos >= len(self.buf) - 16 or err.msg.startswith("Unterminated string")
                if not cut:
                    raise _JsonError(f"{err.msg} at character {self.offset + err.pos:,}") from None
                if len(self.buf) - self.pos >= limit:
                    return False, None
                if not self.fill():
                    raise _JsonError(f"{err.msg}: the input ends inside the value at {self.where()}") from None
                continue
            if end == len(self.buf) and len(self.buf) - self.pos < limit and self.fill():
                continue  # a number or literal at the block's end may go on in the next block
            self.pos = end
            return True, value

    def string_chunks(self) -> Iterator[str]:
        """At a string: its decoded content in chunks (about one per block read), consuming it and its quote.

        Each chunk is a run of whole escapes and plain characters decoded by ``json`` itself; a chunk never
        ends between the two escapes of a surrogate pair, so they decode to one character as ``json`` does.
        """
        self.expect('"')
        while True:
            end = _STRING_RUN.match(self.buf, self.pos).end()
            closed = end < len(self.buf) and self.buf[end] == '"'
            if not closed and _ends_in_high_surrogate(self.buf, self.pos, end):
                end -= 6  # its low half is in the next block
            if end > self.pos:
                yield json.loads('"' + self.buf[self.pos:end] + '"')
                self.pos = end
            if closed:
                self.pos += 1
                return
            if len(self.buf) - self.pos > 12:  # stopped short of the block's end: not an escape cut by it
                raise _JsonError(f"a control character or an invalid escape inside a string at {self.where()}")
            if not self.fill():
                raise _JsonError("the input ends inside a string")

    def skip(self, limit: int) -> None:
        """Consume the next value without holding it: short ones parsed, long strings streamed, long arrays
        and objects walked (brackets matched, scalars checked; separators are not checked)."""
        if self.value(limit)[0]:
            return
        depth: list[str] = []
        while True:
            char = self.peek()
            if char == '"':
                for _ in self.string_chunks():
                    pass
            elif char in "[{":
                depth.append("]" if char == "[" else "}")
                self.pos += 1
            elif char in "]}":
                if not depth or depth.pop() != char:
                    raise _JsonError(f"an unmatched '{char}' at {self.where()}")
                self.pos += 1
            elif char in ",:":
                self.pos += 1
            elif char == "":
                raise _JsonError("the input ends inside a value")
            else:
                while len(self.buf) - self.pos < 64 and self.fill():
                    pass
                m = _SCALAR.match(self.buf, self.pos)
                if m is None or m.end() == self.pos:
                    raise _JsonError(f"an invalid value at {self.where()}")
                self.pos = m.end()
            if not depth:
                return


def _ends_in_high_surrogate(buf: str, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` (whole escapes and plain characters) ends with the escape of a high surrogate."""
    if end - start < 6 or not _HIGH_SURROGATE.fullmatch(buf, end - 6, end):
        return False
    backslashes = len(buf[start:end - 5]) - len(buf[start:end - 5].rstrip("\\"))
    return backslashes % 2 == 1  # an odd run: the last backslash starts the escape, not an escaped backslash


_JSON_KINDS = {"[": "list", "t": "bool", "f": "bool", "n": "NoneType"}
_VALUE_LIMIT = 1 << 16  # a value that is not the text is parsed in memory up to this long, else skipped


def _streamed_string(stream: _JsonStream, where: str) -> _Streamed:
    """The string at the stream's position as a document read in chunks; an invalid string ends the document
    and leaves its error in ``.error``."""
    doc = _Streamed(iter(()), where)

    def chunks() -> Iterator[str]:
        try:
            yield from stream.string_chunks()
        except _JsonError as err:
            doc.error = str(err)

    doc.chunks = chunks()
    return doc


def _stream_record(stream: _JsonStream, where: str, text_field: str, stats: CorpusStats,
                   reason: str) -> Generator[_Streamed | str | None, None, bool]:
    """Yield the document of one record too long to hold (a JSON line, a ``.json`` list item or file): a
    string is the document, an object holds it under ``text_field``. Returns False if the record is broken,
    counted as ``reason`` (text read before the break was used, and the detail says so): the caller cannot
    tell where the next record starts."""
    doc = None
    try:
        char = stream.peek()
        if char == '"':
            doc = _streamed_string(stream, where)
            yield doc
            if doc.error:
                raise _JsonError(doc.error)
        elif char == "{":
            for item in _object_text(stream, where, text_field, stats):
                doc = item if isinstance(item, _Streamed) else doc
                yield item
        else:
            stream.skip(_VALUE_LIMIT)
            kind = _JSON_KINDS.get(char, "int" if char in "-0123456789" else "value")
            stats.skip_record(reason, where, f"a JSON {kind}, not an object or a string")
            yield None
    except _JsonError as err:
        used = " (the text read before it was used)" if doc is not None else ""
        stats.skip_record(reason, where, f"not JSON ({err}){used}")
        yield None
        return False
    return True


def _object_text(stream: _JsonStream, where: str, text_field: str,
                 stats: CorpusStats) -> Iterator[_Streamed | str | None]:
    """At ``{``: yield the ``text_field`` member's text (as a :class:`_Streamed`), skipping every other member,
    then consume the object. Raises :class:`_JsonError` where it is not valid JSON."""
    stream.expect("{")
    found = stream.peek() == "}"
    if found:  # an empty object
        stats.skip_record("missing-field", where, f"no '{text_field}'")
        yield None
    while not found or stream.peek() != "}":
        if stream.peek() != '"':
            raise _JsonError(f"expected a key at {stream.where()}")
        ok, key = stream.value(_KEY_LIMIT)
        if not ok:
            raise _JsonError(f"a key longer than {_KEY_LIMIT:,} characters at {stream.where()}")
        stream.expect(":")
        if key == text_field and not found:
            found = True
            if stream.peek() == '"':
                doc = _streamed_string(stream, where)
                yield doc
                if doc.error:
                    raise _JsonError(doc.error)
            else:
                ok, value = stream.value(_VALUE_LIMIT)
                if not ok:
                    stream.skip(_VALUE_LIMIT)
                    value = []  # long and not a string: a list or an object
                yield _usable(value, where, text_field, stats)
        else:
            stream.skip(_VALUE_LIMIT)
        char = stream.peek()
        if char == "}":
            break
        if char != ",":
            raise _JsonError(f"expected ',' or '}}' at {stream.where()}")
        stream.pos += 1
    stream.expect("}")
    if not found:
        stats.skip_record("missing-field", where, f"no '{text_field}'")
        yield None


def _stream_json_file(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[str | _Streamed | None]:
    """A ``.json`` file too long to hold: its list's items (each parsed in memory when short) or its object.
    A syntax error stops the file there: what came before it was used, the rest is skipped (``invalid-json``)."""
    with open(path, encoding="utf-8-sig") as f:
        stream = _JsonStream(lambda: f.read(_READ_CHARS))
        try:
            char = stream.peek()
            if char == "{":
                if not (yield from _stream_record(stream, str(path), text_field, stats, "bad-item")):
                    return
            elif char == "[":
                stream.pos += 1
                if stream.peek() == "]":
                    stats.skip_file("empty", path, "an empty JSON list")
                    return
                for i in itertools.count():
                    where = f"{path}:item {i}"
                    try:
                        ok, value = stream.value(limit)
                    except _JsonError as err:  # a short item that does not parse
                        stats.skip_record("bad-item", where, f"not JSON ({err})")
                        ok = value = None
                    if ok:
                        yield _from_value(value, where, text_field, stats, "bad-item")
                    elif ok is None or not (yield from _stream_record(stream, where, text_field, stats, "bad-item")):
                        stats.skip_file("invalid-json", path, f"item {i} is not valid JSON; items after it skipped")
                        return
                    char = stream.peek()
                    if char == "]":
                        stream.pos += 1
                        break
                    if char != ",":
                        raise _JsonError(f"expected ',' or ']' after item {i} at {stream.where()}")
                    stream.pos += 1
            else:
                stats.skip_file("invalid-json", path, "top level is not a JSON list or object")
                return
            if stream.peek() != "":
                raise _JsonError(f"extra data at {stream.where()} (one JSON value per line? name the file .jsonl)")
        except _JsonError as err:
            stats.skip_file("invalid-json", path, f"{err}; the rest of the file skipped")


def _read_csv(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[str | None]:
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


def _read_parquet(path: Path, text_field: str, stats: CorpusStats, limit: int) -> Iterator[str | None]:
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
