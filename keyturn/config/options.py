"""Connection options that belong to capabilities of the core, for connection types to
declare: what masking reads (``columns``, ``detectors``, ``custom_detectors``; see
keyturn.masking) and the class an analyser gives what it does not know.

A protocol whose gateway masks results adds ``masking_options()`` to its
``ConnectionType.options``; the values reach the core through ``Connection.columns``,
``Connection.detectors`` and ``Connection.custom_detectors``.

It must not know any protocol: the analyser's classes come from the vocabulary the
protocol registered (keyturn.request).
"""

from __future__ import annotations

import re
from typing import Any

from keyturn.config.checks import Checker
from keyturn.config.registry import Option
from keyturn.config.values import fold_identifiers
from keyturn.config.yamldoc import KeyPath
from keyturn.request import vocabulary


def _columns(check: Checker, value: Any, at: KeyPath) -> tuple[tuple[str, tuple[str, ...]], ...]:
    columns = []
    for col, tags in check.mapping(value, at).items():
        if not isinstance(col, str) or col.count(".") != 2:
            raise check.err(at + (col,), "expected schema.table.column (globs allowed)")
        columns.append((fold_identifiers(col), check.str_list(tags, at + (col,))))
    return tuple(columns)


def _detectors(check: Checker, value: Any, at: KeyPath) -> tuple[str, ...]:
    return check.str_list(value, at)


def _custom_detectors(check: Checker, value: Any, at: KeyPath) -> tuple[tuple[str, str], ...]:
    custom = check.mapping(value, at)
    for name, rx in custom.items():
        try:
            re.compile(str(rx))
        except re.error as exc:
            raise check.err(at + (name,), f"invalid regular expression: {exc}") from exc
    return tuple((str(k), str(v)) for k, v in custom.items())


def masking_options() -> dict[str, Option]:
    """``columns`` (tags on columns), ``detectors`` (None: every built-in one) and
    ``custom_detectors`` (name: regular expression)."""
    return {"columns": Option(_columns, ()), "detectors": Option(_detectors, None),
            "custom_detectors": Option(_custom_detectors, ())}


def class_option(protocol: str, default: str, what: str = "a class") -> Option:
    """A class of ``protocol``'s vocabulary (``unknown_functions: write``)."""

    def validate(check: Checker, value: Any, at: KeyPath) -> str:
        if value not in vocabulary(protocol).classes:
            raise check.err(at, f"expected {what}")
        return str(value)

    return Option(validate, default)
