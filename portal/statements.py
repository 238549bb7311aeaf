"""How a statement is shown to a person: pretty-printed and highlighted.

Every page that shows SQL goes through ``render_statement``, so redacting
literals (as a masking policy asks) has exactly one place to plug in: pass a
``redact`` callable that rewrites the text before it is formatted. The output
is escaped HTML (Pygments escapes every token), safe to mark ``Markup``.

Invisible characters are made visible (keyturn.wording.reveal): a bidirectional override
could make a page show a command in another order than the one that runs.

It must not change what runs: it only changes how a statement looks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import BashLexer, PostgresLexer

from keyturn.wording import reveal

_FORMATTER = HtmlFormatter(nowrap=True)
_LEXER = PostgresLexer()
_SHELL = BashLexer()
MAX_PRETTY = 20000



@lru_cache(maxsize=512)
def pretty(sql: str) -> str:
    """pglast's canonical layout; the text as sent when it cannot be parsed."""
    if len(sql) > MAX_PRETTY:
        return sql
    try:
        import pglast

        return str(pglast.prettify(sql))
    except Exception:  # noqa: BLE001 - any parser failure means: show the original
        return sql


def render_statement(sql: str, *, redact: Callable[[str], str] | None = None,
                     prettify: bool = True) -> Markup:
    text = redact(sql) if redact else sql
    if prettify:
        text = pretty(text)
    return Markup(highlight(reveal(text), _LEXER, _FORMATTER).rstrip("\n"))


def render_command(text: str) -> Markup:
    """A shell command line, highlighted as the shell reads it (never reformatted: the
    bytes shown are the bytes that run)."""
    return Markup(highlight(reveal(text), _SHELL, _FORMATTER).rstrip("\n"))


def one_line(sql: str, limit: int = 120, *, redact: Callable[[str], str] | None = None) -> str:
    """A short summary for lists (escaped by Jinja)."""
    text = reveal(" ".join((redact(sql) if redact else sql).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
