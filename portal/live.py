"""Live pages: Server-Sent Events that tell an open page its tickets changed.

A stream carries no ticket data, only "something you are looking at changed"
(``event: changed``); the page then asks for its fragment the ordinary way
(``hx-trigger="sse:changed"``), so every byte a person sees still goes through the
page's own authorisation and rendering. Streams:

* ``/live/queue``: any ticket's state or votes (approvers, managers, admins);
* ``/live/mine``: the viewer's own tickets;
* ``/live/tickets/N``: ticket N, for whoever may see it; it says ``closed`` once
  the ticket is final, and the browser stops listening.

One ``keyturn.feed.ChangeFeed`` per portal process reads the store; each stream
only waits on it. A stream is one server thread, so their number is bounded
(``portal.live_clients``): past it the answer is 503 and the page keeps its
polling fallback. Streams send a heartbeat comment so proxies keep them open and a
gone browser is noticed, and end after ``STREAM_LIFETIME`` (the browser reconnects
at once, and sign-in and roles are checked again).

The ``id:`` of each event is the feed position; a reconnecting browser sends it
back (``Last-Event-ID``), and a page's first connection sends the position it
was rendered at (``since``), so a change in between is never missed.

It must not send ticket data: a stream only says that something changed, and the page
fetches it through the usual checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from flask import Blueprint, Flask, Response, abort, current_app, request

from keyturn.approvals import APPROVED, PENDING, Approvals
from keyturn.errors import NotFound
from keyturn.feed import Change, ChangeFeed
from keyturn.services import Services
from portal.roles import ADMIN, APPROVER, MANAGER, require, viewer
from portal.settings import PORTAL

log = logging.getLogger(__name__)
bp = Blueprint("live", __name__, url_prefix="/live")

HEARTBEAT = 15.0
STREAM_LIFETIME = 600.0
#: How long the browser waits before reconnecting a dropped stream (ms).
RETRY_MS = 1000
#: Timeline notes that change nothing a list shows.
QUIET_FOR_LISTS = frozenset({"notified"})
LIVE_STATUSES = (PENDING, APPROVED)  # approved: "executed" is still to come
#: What refreshes a live fragment: its stream, or static/live.js while there is none.
LIVE_TRIGGER = "sse:changed, live-poll"


class Live:
    """The process's feed and its bounded set of streams."""

    def __init__(self, services: Services, max_clients: int, *, heartbeat: float = HEARTBEAT,
                 lifetime: float = STREAM_LIFETIME):
        self.feed = ChangeFeed(services.store)
        self.approvals: Approvals = services.approvals
        self.approvals.observers.append(self.feed.poke)
        self.max_clients = max_clients
        self.heartbeat = heartbeat
        self.lifetime = lifetime
        self.clients = 0
        self._lock = threading.Lock()

    def token(self) -> str:
        """The feed position a page is rendered at (its ``since``)."""
        self.feed.start()
        return self.feed.token()

    def _enter(self) -> bool:
        with self._lock:
            if self.clients >= self.max_clients:
                return False
            self.clients += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self.clients -= 1

    def stream(self, wanted: Callable[[Change], bool], since: str | None,
               ticket_id: int | None = None) -> Response:
        self.feed.start()
        if not self._enter():
            resp = Response("Too many live pages are open on this portal process; this "
                            "page refreshes itself every few seconds instead.\n", 503,
                            mimetype="text/plain")
            resp.headers["Retry-After"] = "30"
            return resp
        resp = Response(_Stream(self._events(wanted, since, ticket_id), self._leave),
                        mimetype="text/event-stream")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return resp

    def _final(self, ticket_id: int) -> bool:
        return self.approvals.statuses([ticket_id]).get(ticket_id) not in LIVE_STATUSES

    def _events(self, wanted: Callable[[Change], bool], since: str | None,
                ticket_id: int | None) -> Iterator[str]:
        feed = self.feed
        yield f"retry: {RETRY_MS}\n\n"
        gen = feed.gen
        if feed.position(since) != gen:  # changed since the page was drawn
            yield _event("changed", feed.token(gen))
            if ticket_id is not None and self._final(ticket_id):
                yield _event("closed", feed.token(gen))
                return
        deadline = time.monotonic() + self.lifetime
        while not feed.stopped and time.monotonic() < deadline:
            changes = feed.wait(gen, self.heartbeat)
            if feed.stopped:
                return
            if changes == []:
                yield ": keep-alive\n\n"
                continue
            gen = feed.gen if changes is None else changes[-1].gen
            if changes is None or any(wanted(c) for c in changes):
                yield _event("changed", feed.token(gen))
                if ticket_id is not None and self._final(ticket_id):
                    yield _event("closed", feed.token(gen))
                    return


class _Stream:
    """The stream's body: the server closes it when the browser goes away (or the
    stream ends), and that gives its place back, whether or not it ever started."""

    def __init__(self, events: Iterator[str], release: Callable[[], None]):
        self.events = events
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[str]:
        return self.events

    def close(self) -> None:
        try:
            self.events.close()  # type: ignore[attr-defined]
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _event(name: str, ident: str) -> str:
    return f"id: {ident}\nevent: {name}\ndata: {name}\n\n"


def live() -> Live:
    return current_app.extensions["keyturn_live"]


def _since() -> str | None:
    return request.headers.get("Last-Event-ID") or request.args.get("since")


@bp.get("/queue")
@require(APPROVER, MANAGER, ADMIN)
def queue():  # type: ignore[no-untyped-def]
    return live().stream(lambda c: c.kind not in QUIET_FOR_LISTS, _since())


@bp.get("/mine")
@require()
def mine():  # type: ignore[no-untyped-def]
    user = viewer().user
    return live().stream(lambda c: c.requester == user and c.kind not in QUIET_FOR_LISTS,
                         _since())


@bp.get("/tickets/<int:ticket_id>")
@require()
def ticket(ticket_id: int):  # type: ignore[no-untyped-def]
    lv = live()
    try:
        t = lv.approvals.get(ticket_id)
    except NotFound:
        abort(404, description=f"There is no ticket {ticket_id}.")
    if not viewer().may_see(t):
        abort(403, description=f"You may not see ticket {ticket_id}.")
    return lv.stream(lambda c: c.ticket_id == ticket_id, _since(), ticket_id)


def init_app(app: Flask) -> None:
    services: Services = app.extensions["keyturn"]
    lv = Live(services, PORTAL.of(services.config).live_clients,
              heartbeat=float(app.config.get("KEYTURN_LIVE_HEARTBEAT", HEARTBEAT)),
              lifetime=float(app.config.get("KEYTURN_LIVE_LIFETIME", STREAM_LIFETIME)))
    app.extensions["keyturn_live"] = lv
    app.jinja_env.globals["live_since"] = lv.token
    app.jinja_env.globals["live_trigger"] = LIVE_TRIGGER
    app.register_blueprint(bp)
