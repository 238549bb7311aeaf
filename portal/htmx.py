"""Everything about HTMX requests lives here: HX-* headers and fragments.

A page template holds the whole page; an HTMX request for the same URL gets
one named block of it (the "template fragments" pattern), so full pages and
live updates share one piece of markup. Responses that differ by
``HX-Request`` say so with ``Vary``.

It must not hold page logic: views decide what to render.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, make_response, render_template, request


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def render_block(template: str, block: str, **context: Any) -> str:
    """Render one block of a template with the normal Flask template context."""
    app = current_app
    app.update_template_context(context)
    tmpl = app.jinja_env.get_template(template)
    ctx = tmpl.new_context(context)
    return "".join(tmpl.blocks[block](ctx))


def page_or_block(template: str, block: str, **context: Any) -> Response:
    """The full page, or only ``block`` when HTMX asks (polling, filters)."""
    html = render_block(template, block, **context) if is_htmx() else \
        render_template(template, **context)
    resp = make_response(html)
    resp.headers["Vary"] = "HX-Request"
    return resp


def redirect_to(url: str) -> Response:
    """A redirect that also works for HTMX (which would otherwise swap the target)."""
    if is_htmx():
        resp = make_response("", 204)
        resp.headers["HX-Redirect"] = url
        return resp
    resp = make_response("", 303)
    resp.headers["Location"] = url
    return resp


def init_app(app: Flask) -> None:
    app.jinja_env.globals["is_htmx"] = is_htmx
