"""Metadata filters: ``lang = "en" and year >= 2020`` -> a parameterised SQL condition over the document store.

Only this grammar is accepted (anything else is a ``ValueError`` that points at the offending position):

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expr ")" | comparison
    comparison := FIELD OP VALUE | FIELD ["not"] "in" "(" VALUE ("," VALUE)* ")" | FIELD "is" ["not"] "null"
    OP         := "=" | "==" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    VALUE      := "double-quoted" | 'single-quoted' (backslash escapes) | number | true | false
    FIELD      := name ("." name)*   (a metadata key, dotted for nested objects; ``_id`` = the document id)

Semantics (the same as the brute-force reference in the tests): a comparison holds only when the field is
present and of the value's type (a number compares with numbers, a string with strings, booleans only with
``=``/``!=``), so ``year >= 2020`` never matches ``"year": "2021"``; ``is null`` holds for a missing field or a
JSON null. ``not`` negates the whole condition (``not lang = "en"`` includes documents without ``lang``).
Field names never reach the SQL text: each JSON path is a bound parameter, as is each value, so a filter cannot
run arbitrary SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_FILTER_CHARS = 4096
MAX_IN_VALUES = 1024
MAX_DEPTH = 32

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
_OPS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


@dataclass(frozen=True)
class Where:
    """A parsed filter: ``sql`` (a condition over the ``documents`` table) and its bound ``params``."""

    text: str
    sql: str
    params: tuple[Any, ...]


class _Tokens:
    def __init__(self, text: str):
        self.text = text
        self.items: list[tuple[str, Any, int]] = []  # (kind, value, position)
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c.isspace():
                i += 1
            elif c in "(),":
                self.items.append((c, c, i))
                i += 1
            elif c in "<>!=":
                op = text[i : i + 2] if text[i : i + 2] in _OPS else c
                if op not in _OPS:
                    raise self.error(f"unknown operator {op!r}", i)
                self.items.append(("op", _OPS[op], i))
                i += len(op)
            elif c in "\"'":
                j, out = i + 1, []
                while j < n and text[j] != c:
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    out.append(text[j])
                    j += 1
                if j >= n:
                    raise self.error("unterminated string", i)
                self.items.append(("value", "".join(out), i))
                i = j + 1
            elif (m := _NUMBER.match(text, i)) and (c != "-" or m.end() > i + 1):
                raw = m.group()
                value: Any = float(raw) if any(ch in raw for ch in ".eE") else int(raw)
                self.items.append(("value", value, i))
                i = m.end()
            elif m := _FIELD.match(text, i):
                word = m.group()
                low = word.lower()
                if low in ("true", "false"):
                    self.items.append(("value", low == "true", i))
                elif low in _KEYWORDS:
                    self.items.append((low, low, i))
                else:
                    self.items.append(("field", word, i))
                i = m.end()
            else:
                raise self.error(f"unexpected character {c!r}", i)
        self.pos = 0

    def error(self, msg: str, at: int | None = None) -> ValueError:
        if at is None:
            at = self.items[self.pos][2] if self.pos < len(self.items) else len(self.text)
        return ValueError(f"filter {self.text!r}: {msg} at position {at}")

    def peek(self) -> str | None:
        return self.items[self.pos][0] if self.pos < len(self.items) else None

    def take(self, kind: str, what: str) -> Any:
        if self.peek() != kind:
            got = self.items[self.pos][1] if self.pos < len(self.items) else "the end"
            raise self.error(f"expected {what}, got {got!r}")
        value = self.items[self.pos][1]
        self.pos += 1
        return value


def _json_path(field: str) -> str:
    return "$." + ".".join(f'"{part}"' for part in field.split("."))


def _typed(field: str, op: str, value: Any, params: list[Any]) -> str:
    """One comparison whose value has a type: true only for a present field of that type."""
    if field == "_id":
        if not isinstance(value, str):
            raise ValueError(f"_id is the document id (a string), compared with {value!r}")
        params.append(value)
        return f"(doc_id {op} ?)"
    path = _json_path(field)
    if isinstance(value, bool):
        if op not in ("=", "!="):
            raise ValueError(f"{field} {op} {value}: booleans compare only with = and !=")
        params.append(path)
        return f"COALESCE(json_type(metadata, ?) = '{'true' if value == (op == '=') else 'false'}', 0)"
    kinds = "('integer', 'real')" if isinstance(value, int | float) else "('text')"
    params.extend([path, path, value])
    # COALESCE: a missing field is false, not SQL's unknown (which NOT would keep unknown)
    return f"COALESCE(json_type(metadata, ?) IN {kinds} AND json_extract(metadata, ?) {op} ?, 0)"


def parse_where(text: str) -> Where:
    """Parse and validate a filter; raises ``ValueError`` naming the problem and its position."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("filter: empty (give a condition such as lang = \"en\" and year >= 2020)")
    if len(text) > MAX_FILTER_CHARS:
        raise ValueError(f"filter: {len(text)} characters, at most {MAX_FILTER_CHARS}")
    tokens = _Tokens(text)
    params: list[Any] = []

    def expr(depth: int) -> str:
        parts = [term(depth)]
        while tokens.peek() == "or":
            tokens.pos += 1
            parts.append(term(depth))
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def term(depth: int) -> str:
        parts = [factor(depth)]
        while tokens.peek() == "and":
            tokens.pos += 1
            parts.append(factor(depth))
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def factor(depth: int) -> str:
        if depth > MAX_DEPTH:
            raise tokens.error(f"nested more than {MAX_DEPTH} levels")
        kind = tokens.peek()
        if kind == "not":
            tokens.pos += 1
            return f"(NOT {factor(depth + 1)})"
        if kind == "(":
            tokens.pos += 1
            inner = expr(depth + 1)
            tokens.take(")", "')'")
            return inner
        return comparison()

    def comparison() -> str:
        field = tokens.take("field", "a metadata field name")
        kind = tokens.peek()
        if kind == "op":
            op = tokens.take("op", "an operator")
            value = tokens.take("value", "a value (a quoted string, a number, true or false)")
            try:
                return _typed(field, op, value, params)
            except ValueError as err:
                raise tokens.error(str(err)) from None
        if kind == "is":
            tokens.pos += 1
            negate = tokens.peek() == "not"
            if negate:
                tokens.pos += 1
            tokens.take("null", "null")
            if field == "_id":
                return "(1 = 1)" if negate else "(1 = 0)"  # every document has an id
            params.append(_json_path(field))
            cond = "(json_type(metadata, ?) IS NULL OR json_type(metadata, ?) = 'null')"
            params.append(_json_path(field))
            return f"(NOT {cond})" if negate else cond
        if kind in ("in", "not"):
            negate = kind == "not"
            tokens.pos += 1
            if negate:
                tokens.take("in", "'in' after 'not'")
            tokens.take("(", "'(' after 'in'")
            values = [tokens.take("value", "a value")]
            while tokens.peek() == ",":
                tokens.pos += 1
                values.append(tokens.take("value", "a value"))
            tokens.take(")", "')' closing the 'in' list")
            if len(values) > MAX_IN_VALUES:
                raise tokens.error(f"'in' lists at most {MAX_IN_VALUES} values, got {len(values)}")
            try:
                cond = "(" + " OR ".join(_typed(field, "=", v, params) for v in values) + ")"
            except ValueError as err:
                raise tokens.error(str(err)) from None
            return f"(NOT {cond})" if negate else cond
        raise tokens.error(f"expected an operator, 'in' or 'is' after {field!r}")

    sql = expr(0)
    if tokens.peek() is not None:
        raise tokens.error(f"unexpected {tokens.items[tokens.pos][1]!r}")
    return Where(text=text, sql=sql, params=tuple(params))
