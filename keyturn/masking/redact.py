"""Redact the literals of a statement that touch sensitive columns, for display.

Wherever a statement is shown — ticket, portal, chat message, audit record —
``WHERE ssn = '123-45-6789'`` becomes ``WHERE ssn = '<redacted>'``: constants
compared with, matched against, assigned to or inserted into a sensitive
column, and bind parameters in those places. What the detectors flag in the
remaining text is redacted too. The statement that runs is never changed; the
approval is bound to the real text and parameters.

Matching is by column name and deliberately generous (``ssn`` anywhere counts
when any sensitive column is called ``ssn``): showing too little is harmless,
showing a secret is not.

It must not change what runs: only what is shown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import Any

from pglast import parser as _pg

REDACTED = "'<redacted>'"
_DOLLAR = re.compile(rb"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_NUMBER = re.compile(rb"[0-9.]+(?:[eE][+-]?[0-9]+)?")


def sensitive_names(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A test on a column name from ``schema.table.column`` globs."""
    cols = [p.rsplit(".", 1)[-1].lower() for p in patterns]

    def test(name: str) -> bool:
        name = name.lower()
        return any(fnmatchcase(name, c) for c in cols)

    return test


def _columns(node: Any) -> list[str]:
    out: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, list):
            for x in n:
                walk(x)
        elif isinstance(n, dict):
            for k, v in n.items():
                if k == "ColumnRef":
                    fields = v.get("fields") or ()
                    last = fields[-1] if fields else None
                    if isinstance(last, dict) and "String" in last:
                        out.append(last["String"].get("sval", ""))
                elif k != "SubLink":
                    walk(v)

    walk(node)
    return out


def _constants(node: Any, consts: list[int], params: list[int]) -> None:
    if isinstance(node, list):
        for x in node:
            _constants(x, consts, params)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == "A_Const" and isinstance(v, dict) and "location" in v and not v.get("isnull"):
                consts.append(int(v["location"]))
            elif k == "ParamRef" and isinstance(v, dict):
                params.append(int(v.get("number", 0)))
            elif k != "SubLink":
                _constants(v, consts, params)


class _Finder:
    def __init__(self, sensitive: Callable[[str], bool]):
        self.sensitive = sensitive
        self.consts: list[int] = []
        self.params: list[int] = []

    def touches(self, node: Any) -> bool:
        return any(self.sensitive(c) for c in _columns(node))

    def assignments(self, targets: Any) -> None:
        for t in targets or ():
            rt = t.get("ResTarget") or {}
            if self.sensitive(rt.get("name") or "") or self.touches(rt.get("val")):
                _constants(rt.get("val"), self.consts, self.params)

    def walk(self, node: Any) -> None:
        if isinstance(node, list):
            for x in node:
                self.walk(x)
            return
        if not isinstance(node, dict):
            return
        for kind, body in node.items():
            if kind in ("A_Expr", "BoolExpr", "NullTest") and isinstance(body, dict):
                sides = [body.get("lexpr"), body.get("rexpr")]
                if any(self.touches(s) for s in sides if s is not None):
                    _constants(sides, self.consts, self.params)
            elif kind == "SubLink" and isinstance(body, dict):
                # ssn IN (SELECT …) / ssn = ANY (…): the test expression's constants.
                if body.get("testexpr") is not None and self.touches(body["testexpr"]):
                    _constants(body.get("subselect"), self.consts, self.params)
            elif kind == "FuncCall" and isinstance(body, dict):
                # starts_with(ssn, '123-45'), position('x' in ssn), …
                if self.touches(body.get("args")):
                    _constants(body.get("args"), self.consts, self.params)
            elif kind == "UpdateStmt" and isinstance(body, dict):
                self.assignments(body.get("targetList"))
            elif kind in ("OnConflictClause", "onConflictClause") and isinstance(body, dict):
                self.assignments(body.get("targetList"))
            elif kind == "MergeWhenClause" and isinstance(body, dict):
                targets = body.get("targetList") or ()
                self.assignments(targets)
                names = [(t.get("ResTarget") or {}).get("name") or "" for t in targets]
                for i, v in enumerate(body.get("values") or ()):
                    if not names or (i < len(names) and self.sensitive(names[i])):
                        _constants(v, self.consts, self.params)
            elif kind == "InsertStmt" and isinstance(body, dict):
                cols = [(c.get("ResTarget") or {}).get("name") or ""
                        for c in body.get("cols") or ()]
                sel = (body.get("selectStmt") or {}).get("SelectStmt") or {}
                rows = [(row.get("List") or {}).get("items") or ()
                        for row in sel.get("valuesLists") or ()]
                # INSERT … SELECT 'x', …: the select list lines up with the columns too.
                rows.append([(t.get("ResTarget") or {}).get("val")
                             for t in sel.get("targetList") or ()])
                for items in rows:
                    for i, item in enumerate(items):
                        # Without a column list every position could be sensitive.
                        if not cols or (i < len(cols) and self.sensitive(cols[i])):
                            _constants(item, self.consts, self.params)
            elif kind == "CaseWhen" and isinstance(body, dict) and self.touches(body.get("expr")):
                _constants(body.get("expr"), self.consts, self.params)
            if isinstance(body, (dict, list)):
                self.walk(body)


def _literal_end(raw: bytes, start: int) -> int:
    """The end of the constant token that starts at ``start`` (byte offsets)."""
    i = start
    if raw[i:i + 1] in (b"E", b"e", b"B", b"b", b"X", b"x", b"N", b"n") \
            and raw[i + 1:i + 2] == b"'":
        i += 1
    if raw[i:i + 2].upper() == b"U&" and raw[i + 2:i + 3] == b"'":
        i += 2
    if raw[i:i + 1] == b"'":
        escapes = raw[start:start + 1] in (b"E", b"e")
        j = i + 1
        while j < len(raw):
            c = raw[j:j + 1]
            if escapes and c == b"\\":
                j += 2
                continue
            if c == b"'":
                if raw[j + 1:j + 2] == b"'":
                    j += 2
                    continue
                return j + 1
            j += 1
        return len(raw)
    m = _DOLLAR.match(raw, i)
    if m:
        close = raw.find(m.group(0), m.end())
        return len(raw) if close < 0 else close + len(m.group(0))
    m = _NUMBER.match(raw, i)
    if m:
        return m.end()
    # A typed literal (interval '1 day', DATE '...'): the word, then its string.
    q = raw.find(b"'", i)
    return _literal_end(raw, q) if q >= 0 else i


def redact_statement(sql: str, sensitive: Callable[[str], bool],
                     detectors: Any = None) -> tuple[str, set[int]]:
    """The statement for display, and the numbers ($n) of bind parameters to hide."""
    params: set[int] = set()
    text = sql
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except Exception:
        tree = None
    if tree is not None:
        finder = _Finder(sensitive)
        finder.walk(tree.get("stmts") or [])
        params = set(finder.params)
        raw = sql.encode("utf-8")
        spans = sorted({(s, _literal_end(raw, s)) for s in finder.consts})
        out, pos = [], 0
        for start, end in spans:
            if start < pos or end <= start:
                continue
            out.append(raw[pos:start])
            out.append(REDACTED.encode())
            pos = end
        out.append(raw[pos:])
        text = b"".join(out).decode("utf-8", "replace")
    if detectors is not None:
        text, _hits = detectors.redact(text)
    return text, params


def redact_params(params: list[Any] | None, hidden: set[int],
                  detectors: Any = None) -> list[Any] | None:
    if params is None:
        return None
    out = []
    for i, p in enumerate(params, start=1):
        if i in hidden and p is not None:
            out.append("<redacted>")
        elif detectors is not None and isinstance(p, str):
            out.append(detectors.redact(p)[0])
        else:
            out.append(p)
    return out
