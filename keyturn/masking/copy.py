"""Masking ``COPY … TO STDOUT`` rows in text and csv format (sans-I/O).

PostgreSQL sends one CopyData message per row. In text format, fields are split
by the delimiter (a raw delimiter byte is always a separator; one inside a value
is backslash-escaped), ``\\N`` is NULL, and values are backslash-escaped. In csv
format, fields are quoted when needed and NULL is an empty unquoted field. A
masked field is decoded, masked and encoded again; every other field is copied
byte for byte. Binary COPY cannot be masked and is refused by the caller, as are
options this module does not model (QUOTE, ESCAPE, FORCE_QUOTE, ENCODING…).

It must not pass through a field it cannot read (the caller refuses the COPY).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pglast import parser as _pg

_UNESCAPE = {ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
             ord("v"): "\v", ord("\\"): "\\"}


@dataclass
class CopyOptions:
    format: str = "text"
    delimiter: str | None = None  # default: tab in text format, comma in csv
    null: str | None = None
    header: bool = False
    columns: list[str] | None = None  # an explicit column list (COPY t (a, b))
    relation: str | None = None  # COPY t TO (None: COPY (query) TO)


def copy_options(sql: str) -> tuple[CopyOptions | None, str | None]:
    """The options of a single COPY … TO statement, or (None, why it cannot be masked)."""
    tree = json.loads(_pg.parse_sql_json(sql))
    stmts = tree.get("stmts") or []
    if len(stmts) != 1 or "CopyStmt" not in stmts[0]["stmt"]:
        return None, "COPY must be the only statement of its message to be masked"
    body = stmts[0]["stmt"]["CopyStmt"]
    opts = CopyOptions()
    rel = body.get("relation")
    if rel:
        opts.relation = ".".join(p for p in (rel.get("schemaname") or "public",
                                             rel.get("relname")) if p)
    if body.get("attlist"):
        opts.columns = [(a.get("String") or {}).get("sval", "") for a in body["attlist"]]
    for item in body.get("options") or ():
        d = item.get("DefElem") or {}
        name, arg = d.get("defname"), d.get("arg") or {}
        value: Any = (arg.get("String") or {}).get("sval")
        if "Boolean" in arg:
            value = arg["Boolean"].get("boolval", False)
        if name == "format":
            opts.format = str(value).lower()
        elif name == "delimiter" and isinstance(value, str) and len(value) == 1:
            opts.delimiter = value
        elif name == "null" and isinstance(value, str):
            opts.null = value
        elif name == "header":
            opts.header = value is True or str(value).lower() in ("true", "on", "1", "match")
        else:
            return None, f"COPY option {name!r} cannot be masked"
    if opts.format not in ("text", "csv"):
        return None, f"COPY in {opts.format} format cannot be masked (use text or csv)"
    if opts.null is None:
        opts.null = "\\N" if opts.format == "text" else ""
    if opts.delimiter is None:
        opts.delimiter = "\t" if opts.format == "text" else ","
    return opts, None


def _unescape_text(raw: str) -> str:
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != "\\" or i + 1 == n:
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in "01234567":
            j = i + 1
            while j < n and j < i + 4 and raw[j] in "01234567":
                j += 1
            out.append(chr(int(raw[i + 1:j], 8)))
            i = j
        elif nxt == "x" and i + 2 < n and raw[i + 2] in "0123456789abcdefABCDEF":
            j = i + 2
            while j < n and j < i + 4 and raw[j] in "0123456789abcdefABCDEF":
                j += 1
            out.append(chr(int(raw[i + 2:j], 16)))
            i = j
        else:
            out.append(_UNESCAPE.get(ord(nxt), nxt))
            i += 2
    return "".join(out)


def _escape_text(value: str, delimiter: str) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    value = value.replace("\t", "\\t")
    if delimiter not in "\t\n\r\\":
        value = value.replace(delimiter, "\\" + delimiter)
    return value


class CopyMasker:
    """Rewrites CopyData rows: ``maskers[i]`` masks field i (text -> text or None)."""

    def __init__(self, opts: CopyOptions, maskers: dict[int, Callable[[str], str | None]],
                 detectors: Any = None):
        assert opts.delimiter is not None and opts.null is not None  # set by copy_options
        self.opts = opts
        self.delimiter: str = opts.delimiter
        self.null: str = opts.null
        self.maskers = maskers
        self.detectors = detectors
        self.header_pending = opts.header
        self.masked = 0
        self.detected: dict[str, int] = {}

    def rewrite(self, data: bytes) -> bytes | None:
        """The row with masked fields replaced, or None when nothing changed."""
        if self.header_pending:
            self.header_pending = False
            return None
        if not self.maskers and self.detectors is None:
            return None
        line = data.decode("utf-8", "replace")
        end = "\n" if line.endswith("\n") else ""
        if end:
            line = line[:-1]
        out = self._text(line, end) if self.opts.format == "text" else self._csv(line, end)
        new = out.encode()
        return None if new == data else new

    def _text(self, line: str, end: str) -> str:
        fields = _text_split(line, self.delimiter)
        for i, fn in self.maskers.items():
            if i < len(fields) and fields[i] != self.null:
                new = fn(_unescape_text(fields[i]))
                fields[i] = self.null if new is None else \
                    _escape_text(new, self.delimiter)  # type: ignore[assignment]
                self.masked += 1
        self._detect(fields)
        return self.delimiter.join(fields) + end

    def _detect(self, fields: list[str]) -> None:
        """The detectors read the fields the masking left (masked ones are already safe)."""
        if self.detectors is None:
            return
        for i, f in enumerate(fields):
            if i in self.maskers or not f:
                continue
            text, hits = self.detectors.redact(f)
            if hits:
                fields[i] = text
                for k, n in hits.items():
                    self.detected[k] = self.detected.get(k, 0) + n

    def _csv(self, line: str, end: str) -> str:
        fields = _csv_split(line, self.delimiter)
        for i, fn in self.maskers.items():
            if i >= len(fields):
                continue
            raw = fields[i]
            if raw == self.null and not raw.startswith('"'):
                continue  # NULL stays NULL
            value = raw[1:-1].replace('""', '"') if raw.startswith('"') else raw
            new = fn(value)
            if new is None:
                fields[i] = "" if self.null == "" else self.null
            elif new == "" or any(c in new for c in (self.delimiter, '"', "\n", "\r")):
                fields[i] = '"' + new.replace('"', '""') + '"'
            else:
                fields[i] = new
            self.masked += 1
        self._detect(fields)
        return self.delimiter.join(fields) + end


def _text_split(line: str, delimiter: str) -> list[str]:
    """Raw text-format fields: a delimiter after a backslash belongs to the value."""
    if "\\" not in line:
        return line.split(delimiter)
    fields: list[str] = []
    start, i, n = 0, 0, len(line)
    while i < n:
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c == delimiter:
            fields.append(line[start:i])
            start = i + 1
        i += 1
    fields.append(line[start:])
    return fields


def _csv_split(line: str, delimiter: str) -> list[str]:
    """Raw csv fields (quotes kept), so unmasked fields are copied exactly."""
    fields: list[str] = []
    start, quoted, i, n = 0, False, 0, len(line)
    while i < n:
        c = line[i]
        if c == '"':
            if quoted and i + 1 < n and line[i + 1] == '"':
                i += 2
                continue
            quoted = not quoted
        elif c == delimiter and not quoted:
            fields.append(line[start:i])
            start = i + 1
        i += 1
    fields.append(line[start:])
    return fields
