"""Settings that reach the target outside the text of a statement, judged as the SQL
they amount to.

A startup packet can carry any setting (``statement_timeout=0``,
``default_transaction_read_only=off``, ``session_replication_role=replica``, a custom
``x.y``...), and a ``set_config(name, $1, ...)`` gets its value from the Bind. Both must
pass the same rules as the equivalent SQL: a startup parameter is judged as
``SET "name" TO 'value'`` and a bound statement as its text with the bound values written
in as literals, by the connection's analyser and policy, like any statement.

This module decides and formats; it does no I/O and keeps no session state. The session
(session.py) calls it at login, before the target is contacted, and at Execute.

It must not do I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import parser as _pg

from keyturn.analysis.postgres import NAME_BYTES, Analysis
from keyturn.policy import PERMITTING, Decision
from proxies.postgres import codec

#: Startup-packet keys that are part of the protocol, not settings.
PROTOCOL_KEYS = frozenset({"user", "database", "replication"})

# What PostgreSQL accepts as a setting name: an identifier, or dotted identifiers for
# custom (extension) settings. Anything else the server refuses anyway.
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*")
_PARAM_REF = re.compile(rb"\$([0-9]+)")


def literal(value: str | None) -> str:
    """A value as an SQL string literal (standard_conforming_strings is always on through
    the gateway, so doubling quotes is the whole of the quoting)."""
    if value is None:
        return "NULL"
    return "'" + value.replace("'", "''") + "'"


# ---------------------------------------------------------------- startup parameters

@dataclass(frozen=True, slots=True)
class StartupRefusal:
    """A startup parameter the gateway refuses, and why (the client's FATAL says both)."""

    name: str
    reason: str
    sql: str | None = None
    decision: Decision | None = None

    @property
    def message(self) -> str:
        return f"keyturn: startup parameter {self.name!r} is refused: {self.reason}"


def startup_settings(params: Mapping[str, str], refused: Iterable[str] = ()) -> dict[str, str]:
    """The settings of a startup packet: what is forwarded to the target and judged."""
    drop = PROTOCOL_KEYS | frozenset(refused)
    return {k: v for k, v in params.items() if k not in drop}


def set_statement(name: str, value: str) -> str:
    """The SQL equivalent of a startup parameter (``name`` must be a valid setting name:
    it is quoted as an identifier, which PostgreSQL matches case-insensitively)."""
    return f'SET "{name}" TO {literal(value)}'


def startup_refusal(settings: Mapping[str, str], analyze: Callable[[str], Analysis],
                    decide: Callable[[Analysis], Decision]) -> StartupRefusal | None:
    """The first setting that its equivalent SET would not be allowed to run, or None.

    Forbidden settings (identity, how SQL is read, write access) are always refused; every
    other one needs a decision that lets the SET run as a statement would (allow, or mask,
    which masks result rows and a SET has none): a login cannot wait for a review."""
    for name, value in settings.items():
        if not _SETTING_NAME.fullmatch(name) or len(name.encode()) > NAME_BYTES:
            return StartupRefusal(name, "it is not the name of a setting")
        sql = set_statement(name, value)
        analysis = analyze(sql)
        if analysis.error is not None or len(analysis.statements) != 1:
            return StartupRefusal(name, "keyturn cannot read its value as one SET statement",
                                  sql)
        if analysis.forbidden:
            return StartupRefusal(name, analysis.forbidden, sql)
        decision = decide(analysis)
        if decision.action not in PERMITTING:
            rule = f"rule {decision.rule!r}" if decision.rule else "the policy default"
            verb = "blocks" if decision.action == "block" else f"asks for {decision.action} of"
            return StartupRefusal(
                name, f"{rule} {verb} the equivalent {sql} ({decision.classification}: "
                      f"{decision.reason}); a startup setting must be allowed outright, so "
                      "set it with SQL after connecting instead", sql, decision)
    return None


# ---------------------------------------------------------------- bound values

def bound_texts(bind_body: bytes) -> list[str | None] | None:
    """The parameters of a Bind as the text the server reads, or None when one of them is
    in binary format or not UTF-8 (then the gateway cannot tell what it says)."""
    bind = codec.decode_bind(bind_body)
    fmts = bind.param_formats
    out: list[str | None] = []
    for i, value in enumerate(bind.params):
        fmt = fmts[0] if len(fmts) == 1 else (fmts[i] if i < len(fmts) else 0)
        if value is None:
            out.append(None)
            continue
        if fmt != 0:
            return None
        try:
            out.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return out


def with_values(sql: str, values: Sequence[str | None]) -> str | None:
    """``sql`` with each parameter reference ($n) replaced by its value as a literal, or
    None when that cannot be done exactly (no parse, a $n without a value)."""
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
        raw = sql.encode("utf-8")
    except Exception:  # noqa: BLE001 - any failure means "cannot tell": the caller keeps its verdict
        return None
    spots: list[int] = []
    _param_locations(tree, spots)
    out = raw
    for loc in sorted(set(spots), reverse=True):
        m = _PARAM_REF.match(raw, loc)
        if m is None:
            return None
        n = int(m.group(1))
        if not 1 <= n <= len(values):
            return None
        out = out[:loc] + literal(values[n - 1]).encode("utf-8") + out[m.end():]
    return out.decode("utf-8")


def _param_locations(node: Any, out: list[int]) -> None:
    if isinstance(node, dict):
        ref = node.get("ParamRef")
        if isinstance(ref, dict) and "location" in ref:
            out.append(int(ref["location"]))
        for value in node.values():
            _param_locations(value, out)
    elif isinstance(node, list):
        for value in node:
            _param_locations(value, out)


#: Parameter types (Parse) whose values reach the statement as the text that was bound:
#: unspecified (the server infers it), text, varchar, unknown. Any other declared type
#: may change the value first ("char" keeps one byte, name cuts at 63).
_TEXT_PARAM_TYPES = frozenset({0, 25, 1043, 705})


def judge_bound(sql: str, analysis: Analysis, bind_body: bytes,
                analyze: Callable[[str], Analysis], decide: Callable[[Analysis], Decision],
                param_types: Sequence[int] = ()) -> tuple[Analysis, Decision] | None:
    """The verdict on a statement whose class depends on a constant (``set_config(
    'client_encoding', $1, false)``) for the values of one Bind, or None when there is
    nothing to re-judge or the values cannot be read (the statement's own verdict, which
    assumed the worst of every parameter, then stands)."""
    if not bind_body or not any(st.literal_dependent for st in analysis.statements):
        return None
    if any(t not in _TEXT_PARAM_TYPES for t in param_types):
        return None  # the server converts the values first: they cannot be read here
    values = bound_texts(bind_body)
    if not values:
        return None
    text = with_values(sql, values)
    if text is None:
        return None
    bound = analyze(text)
    if bound.error is not None or len(bound.statements) != len(analysis.statements):
        return None
    return bound, decide(bound)
