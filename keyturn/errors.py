"""Error types shared by every Keyturn component.

Errors are small classes that carry data (an HTTP status for the API, a
SQLSTATE for the wire protocols), so each surface can render them natively.

They must not carry behaviour or know a surface.
"""

from __future__ import annotations


class KeyturnError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 400
    code = "error"

    def __init__(self, message: str, **data: object):
        super().__init__(message)
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, **self.data}


class ConfigError(KeyturnError):
    code = "config"


class NotFound(KeyturnError):
    status = 404
    code = "not_found"


class Unauthorized(KeyturnError):
    status = 401
    code = "unauthorized"


class Forbidden(KeyturnError):
    status = 403
    code = "forbidden"


class SelfApproval(Forbidden):
    code = "self_approval"


class NotAnApprover(Forbidden):
    code = "not_an_approver"


class AlreadyVoted(KeyturnError):
    status = 409
    code = "already_voted"


class AlreadyDecided(KeyturnError):
    """The ticket left ``pending`` before this decision arrived."""

    status = 409
    code = "already_decided"


class InvalidTransition(KeyturnError):
    status = 409
    code = "invalid_transition"


class TooManyPending(KeyturnError):
    """A requester already has ``limit`` (or more: ``pending``) tickets waiting for a
    decision (gateway.max_pending_per_user): no ticket was opened."""

    status = 429
    code = "too_many_pending"

    def __init__(self, requester: str, pending: int, limit: int):
        super().__init__(f"you have {pending} request{'s' if pending != 1 else ''} waiting "
                         f"for approval (limit {limit}); wait for a decision or cancel one",
                         requester=requester,
                         pending=pending, limit=limit)
        self.requester = requester
        self.pending = pending
        self.limit = limit


class StoreUnavailable(KeyturnError):
    """The store cannot be read or written (disk full, file unwritable, server down).
    ``reason`` is the driver's one-line complaint, for messages people read."""

    status = 503
    code = "store_unavailable"

    def __init__(self, reason: str):
        super().__init__(f"the Keyturn store is unavailable ({reason})", reason=reason)
        self.reason = reason
