"""Relaying the target's answers in order: the queue of expected responses, what each
answer completes, and where the gateway's own messages (refusals, notices) go.

Every message the session forwards appends what the target owes (``Expect``); this
mixin of ``ClientSession`` walks the target's messages against that queue. The state
machine is a transition table (``TRANSITIONS``, by message type; the head of the queue
decides what each transition does): it completes requests (``_finished``), drops what
the target skips after an error, hides the read-only guard's own answers, and slots the
gateway's own messages (refusals, notices) in where PostgreSQL would have put them.
``FORWARDED`` lists the messages that go out as they are. It must not block; it is the
hot path for results (tests/test_pg_session_order.py drives it from transcripts)."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxies.postgres import codec
from proxies.postgres.codec import Message
from proxies.postgres.state import (
    _AMBIGUOUS,
    Ctx,
    Expect,
    SessionState,
    _error_at,
    _rows,
    _splice,
)

if TYPE_CHECKING:
    from proxies.postgres.session import ClientSession

log = logging.getLogger(__name__)


_MASKED_TYPES = frozenset((b"T", b"C", b"E", b"N"))
#: What a transition tells the walk: go on with the next message / a response completed
#: (the gateway's own queued messages follow it) / the session ended.
_NEXT, _COMPLETED, _STOP = 0, 1, 2


class Splice:
    """The client's copy of one chunk from the target: built only when a transition
    changes something (``out`` None: the chunk goes out as it came)."""

    __slots__ = ("chunk", "out", "seg", "waiting")

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk
        self.out: list[bytes] | None = None
        self.seg = 0  # chunk[seg:] is not in out yet
        self.waiting: Expect | None = None  # an Execute whose Describe answer is here

    def replace(self, start: int, end: int, new: bytes) -> None:
        """chunk[start:end] (one message) becomes ``new`` (b"": removed)."""
        self.out, self.seg = _splice(self.out, self.chunk, self.seg, start, end, new)

    def cut(self, end: int) -> None:
        """Everything up to ``end`` goes out as it is; ``add`` inserts after it."""
        if self.out is None:
            self.out = []
        self.out.append(self.chunk[self.seg:end])
        self.seg = end

    def add(self, data: bytes) -> None:
        assert self.out is not None
        self.out.append(data)

    def result(self) -> bytes:
        if self.out is None:
            return self.chunk
        self.out.append(self.chunk[self.seg:])
        return b"".join(self.out)


class ResponseRelay(SessionState):
    """ClientSession's relay of the target's answers (mixin; methods run on the
    session's state)."""

    def _release_execute(self, head: Expect) -> None:
        """The answer to our Describe arrived for an Execute that waited for it: refuse
        it (a masked column in binary format) or send it, then go on with the backlog."""
        ctx, msg = head.plan_for, head.then
        assert ctx is not None and msg is not None
        self.holding = False
        if ctx.refusal is not None:
            error, ctx.refusal = ctx.refusal, None
            self._audit_mask_refusal(ctx, error)
            ctx.action = "block"
            self._refuse(error, b"E")
            self._audit(ctx, outcome="blocked")
        else:
            self.expect.append(Expect(b"E", ctx))
            self._intent(ctx)
            after: list[bytes] = [msg.raw]
            self._guard_after_execute(ctx, after)
            if self.upstream:
                self._send(b"".join(after))
        self._replay_backlog()

    def server_messages(self, msgs: list[Message]) -> None:
        """Messages the target sent with its login reply (already framed)."""
        chunk = b"".join(m.raw for m in msgs)
        frames, off = [], 0
        for m in msgs:
            end = off + len(m.raw)
            if m.type != b"D" and m.type != b"d":
                frames.append((m.type, off, end))
            off = end
        if chunk:
            self.server_data(chunk, frames)

    def server_data(self, chunk: bytes,
                    frames: list[tuple[bytes, int, int]]) -> None:
        """Relay one chunk of complete messages from the target to the client.

        ``frames`` lists every message but DataRow/CopyData (codec
        ``BackendReader.scan``). Each message is walked against the head of the queue
        of expected responses by the transition for its type (``TRANSITIONS``). The
        chunk goes out as it came unless a transition changed it (a message hidden,
        masked or replaced) or the gateway must slot its own messages in after a
        response completes.
        """
        self._take_fast()
        expect = self.expect
        sp = Splice(chunk)
        masking = self.masking
        prev = 0
        for t, start, end in frames:
            if start > prev and expect:
                # Rows (DataRow, COPY data) lie between the frames listed.
                if expect[0].probe is not None:
                    self._probe_rows(sp, expect[0], prev, start)
                elif masking:
                    sp.out, sp.seg = self._rows(expect[0], chunk, prev, start, sp.out, sp.seg)
            prev = end
            if t == b"S":
                # default_transaction_read_only is the guard's: never forwarded, and off
                # only inside the gateway's own Queries around one command.
                drop = self._param_status(chunk[start + 5:end])
                if drop is not None:
                    sp.replace(start, end, drop)
                    if not self.upstream_ro and not (expect and expect[0].hide):
                        self._guard_lost()
                        return
                continue
            if not expect:
                continue  # asynchronous (notices, notifications): forwarded as they are
            head = expect[0]
            if head.hide:
                step = self._on_hidden(sp, head, t, start, end)
            elif head.swallow and t == b"N" and b"C25P01\0" in chunk[start + 5:end]:
                # A warning about one of the gateway's own statements (SET LOCAL outside a
                # transaction block): the client sent no such statement.
                sp.replace(start, end, b"")
                continue
            else:
                step = None
                if masking and t in _MASKED_TYPES and head.replace is None:
                    step = self._on_masked(sp, head, t, start, end)
                if step is None:
                    on = TRANSITIONS.get(t)
                    if on is None:
                        continue  # rows, notices, RowDescription of a result: as they are
                    step = on(self, sp, head, t, start, end)
            if step == _NEXT:
                continue
            if step == _STOP:
                return
            if expect and expect[0].kind == b"!":
                # A response completed: the gateway's own messages queued behind it go
                # out right after it.
                sp.cut(end)
                while expect and expect[0].kind == b"!":
                    inj = expect.popleft()
                    sp.add(inj.inject or b"")
                    if inj.rfq:
                        sp.add(codec.encode_ready_for_query(self.tx_status))
        if prev < len(chunk) and expect:
            if expect[0].probe is not None:
                self._probe_rows(sp, expect[0], prev, len(chunk))
            elif masking:
                sp.out, sp.seg = self._rows(expect[0], chunk, prev, len(chunk), sp.out, sp.seg)
        self.write(sp.result())
        if sp.waiting is not None:
            self._release_execute(sp.waiting)
        if self.barrier_done:
            self.barrier_done = False
            if self.probe_due and not self.closed and self._probe_search_path():
                return  # the client's next messages wait for its answer too
            self.holding = False
            self._replay_backlog()

    @staticmethod
    def _probe_rows(sp: Splice, head: Expect, start: int, end: int) -> None:
        """Rows answering the gateway's own read of search_path: kept, not forwarded."""
        assert head.probe is not None
        head.probe.rows.append(sp.chunk[start:end])
        sp.replace(start, end, b"")

    # -- the transitions: (splice, head of the queue, type, start, end) -> a step -------

    def _on_hidden(self, sp: Splice, head: Expect, t: bytes, start: int, end: int) -> int:
        """The answer to a Query of the read-only guard's own: none of it is forwarded;
        its ReadyForQuery completes it."""
        sp.replace(start, end, b"")
        if t == b"E":
            log.warning("session %s: the gateway's own query failed: %s",
                        self.session_id, codec.decode_error_fields(
                            sp.chunk[start + 5:end]).get("M", ""))
            if head.probe is not None:
                head.probe.failed = True
        if t != b"Z":
            return _NEXT
        self.tx_status = chr(sp.chunk[start + 5]) if end > start + 5 else "I"
        self.expect.popleft()
        if head.probe is not None:
            self._probed(head.probe)
        if not self.expect:
            self._guard_sync()
            if self.closed:
                return _STOP
        return _COMPLETED

    def _on_masked(self, sp: Splice, head: Expect, t: bytes, start: int, end: int
                   ) -> int | None:
        """Masked connections, before the type's transition (None: go on to it):
        RowDescription plans the result's masking (the answer to our own Describe is
        not forwarded), errors and notices are redacted, a refused result ends here."""
        expect = self.expect
        new = self._mask_message(head, t, sp.chunk, start, end)
        if new is not None:
            sp.replace(start, end, new)
        if t == b"N" or (t == b"T" and head.plan_for is not None):
            if t == b"T":
                expect.popleft()
                if head.then is not None:
                    sp.waiting = head
            return _NEXT
        if t == b"C" and head.ctx is not None and head.ctx.refusal is not None:
            if head.kind == b"E":
                expect.popleft()
                self._finished(head.ctx)
            return _NEXT
        return None

    def _on_ready(self, sp: Splice, head: Expect, t: bytes, start: int, end: int) -> int:
        """ReadyForQuery ends a Sync or a simple Query. Anything still expected before it
        was skipped by the target after an error (messages that reached us after the
        target's error already arrived): dropped, its request completed as skipped."""
        expect = self.expect
        chunk = sp.chunk
        self.tx_status = chr(chunk[start + 5]) if end > start + 5 else "I"
        while expect:
            entry = expect.popleft()
            if entry.as_idle and self.tx_status != "I":
                # The client's implicit transaction ran as the gateway's own: it is told
                # idle, as after an implicit one (a ROLLBACK follows).
                sp.replace(start, end, codec.encode_ready_for_query("I"))
            if entry.op:
                self._namespace_answer(entry, False)
            elif entry.guard_stmt:
                self.guard_stmts.discard(entry.guard_stmt)
            elif entry.probe is not None:
                entry.probe.failed = True  # skipped after an error
                self._probed(entry.probe)
            elif entry.portal is not None:
                self._bind_failed(entry)
            if entry.release:
                self.barrier_done = True
            if entry.ctx is not None:
                if entry.kind not in (b"S", b"Q") and entry.ctx.error is None:
                    entry.ctx.error = {"C": "", "M": "skipped after an earlier error"}
                self._finished(entry.ctx)
            elif entry.post is not None:
                self._check_dropped(entry.post, None)
            if entry.kind == b"S" or entry.kind == b"Q":
                break
        cc = self.commit_check
        if cc is not None and self.tx_status == "I" and all(c.post_done for c, _, _ in
                                                             cc.checks):
            self._drop_commit_check()  # rolled back: its COMMIT owes nothing
        if not expect:
            self._guard_sync()
            if self.closed:
                return _STOP
            if self.changed_catalog and self.tx_status == "I":
                self.changed_catalog = False
                self.gw.catalogs.idle(cast("ClientSession", self))
        return _COMPLETED

    def _on_complete(self, sp: Splice, head: Expect, t: bytes, start: int, end: int) -> int:
        """CommandComplete: a statement's tag (rows) for its request; it completes an
        Execute. The guard's own statements in a rewritten Query are not forwarded."""
        if head.ours is not None:
            i = head.ci
            head.ci = i + 1
            if i < len(head.ours) and head.ours[i]:
                sp.replace(start, end, b"")
                return _NEXT  # a statement of the guard's own
        elif head.swallow:
            sp.replace(start, end, b"")
            if head.kind != b"E":
                return _NEXT
            self.expect.popleft()
            if head.probe is not None:
                self._probed(head.probe)
            if head.post is not None and not head.post.post_done:
                self._finished(head.post)  # the approved Execute, checked after it ran
            return _COMPLETED  # (our own messages queued behind it go out now)
        elif head.kind != b"E" and head.kind != b"Q":
            return self._out_of_step(t, head)
        ctx = head.ctx
        if ctx is not None:
            tag = codec.decode_command_complete(sp.chunk[start + 5:end])
            if ctx.tags is None:
                ctx.tags = [tag]
            else:
                ctx.tags.append(tag)
            ctx.rows = _rows(tag, ctx.rows)
        if head.kind == b"E":
            self.expect.popleft()
            if ctx is not None and ctx.post_key is None:
                self._finished(ctx)  # (else once the gateway's check behind it answered)
        return _COMPLETED

    def _on_error(self, sp: Splice, head: Expect, t: bytes, start: int, end: int) -> int:
        """ErrorResponse: the request failed; in the extended protocol the target skips
        everything up to the next Sync, so those expected answers are dropped. Where the
        gateway made the target fail in place of a refused statement, the client gets
        the refusal instead."""
        body = sp.chunk[start + 5:end]
        if head.replace is not None:
            sp.replace(start, end, head.replace)
            if head.kind != b"Q":
                self._skip_to_sync(None)
            return _NEXT
        fields = codec.decode_error_fields(body)
        checked = head.ctx if head.ctx is not None else head.post
        if checked is not None and checked.post_refused:
            # The gateway's check after an approved statement failed it (holding.py
            # _post_check): the client is told why the statement was rolled back.
            fields = {"S": "ERROR", "V": "ERROR", "C": "55000", "M": checked.post_refused}
            sp.replace(start, end, codec.encode_error("ERROR", "55000",
                                                      checked.post_refused))
            checked.post_refused = None
            checked.error = fields
        elif head.rewritten is not None and "P" in fields:
            # A position in the text sent: as a position in the client's text.
            moved = head.rewritten.client_position(int(fields["P"] or 0))
            sp.replace(start, end, _error_at(body, moved))
        if head.ctx is not None:
            head.ctx.error = fields
        elif head.kind == b"S":
            self._commit_failed(fields)
        if head.kind != b"Q" and head.kind != b"S":
            self._skip_to_sync(fields)
        return _COMPLETED

    def _commit_failed(self, fields: dict[str, str]) -> None:
        """An error answering a Sync: the batch's implicit transaction failed to commit
        (a deferred constraint, a serialization failure), so what its statements did,
        recorded as they completed, is rolled back. Recorded as such."""
        ctx = Ctx("<commit of the implicit transaction at Sync>", "transaction", "allow",
                  "builtin:implicit-commit",
                  "the batch's implicit transaction failed to commit at its Sync: what its "
                  f"statements did is rolled back ({fields.get('C', '')}: "
                  f"{fields.get('M', '')})", time.time())
        ctx.error = fields
        self._audit(ctx, outcome="error")

    def _skip_to_sync(self, fields: dict[str, str] | None) -> None:
        """Drop what the target skips after an error in the extended protocol (up to the
        Sync); ``fields``: the error, given to the skipped requests (None: not audited
        here, the refusal that stands in for the error audits them)."""
        expect = self.expect
        while expect and expect[0].kind != b"S":
            dropped = expect.popleft()
            if dropped.op:
                self._namespace_answer(dropped, False)
            elif dropped.guard_stmt:
                self.guard_stmts.discard(dropped.guard_stmt)
            elif dropped.probe is not None:
                dropped.probe.failed = True
                self._probed(dropped.probe)
            elif dropped.portal is not None:
                self._bind_failed(dropped)
            if fields is not None and dropped.ctx is not None:
                if dropped.ctx.error is None:
                    dropped.ctx.error = fields
                self._finished(dropped.ctx)
            elif dropped.post is not None:
                self._check_dropped(dropped.post, fields)
        if not expect:
            self.target_skipping = True  # up to a Sync the client has not sent yet

    def _check_dropped(self, ctx: Ctx, fields: dict[str, str] | None) -> None:
        """The gateway's check behind an approved Execute was skipped (an error before
        it): the statement's transaction rolls back; its request completes as failed."""
        if ctx.post_done:
            return
        if ctx.error is None:
            ctx.error = fields or {"C": "", "M": "rolled back: its check did not run"}
        self._finished(ctx)

    def _on_parameters(self, sp: Splice, head: Expect, t: bytes, start: int, end: int
                       ) -> int:
        """ParameterDescription: the types the server inferred for a statement."""
        if head.kind == b"D" and head.name is not None:
            self._learn_param_types(head.name, sp.chunk[start + 5:end])
        return _NEXT

    def _on_answer(self, sp: Splice, head: Expect, t: bytes, start: int, end: int) -> int:
        """ParseComplete, BindComplete, CloseComplete, NoData, a Describe's
        RowDescription; EmptyQueryResponse and PortalSuspended when they end an Execute:
        the head's answer, which completes it."""
        if t == b"T" and head.kind != b"D":
            return _NEXT  # a result's RowDescription: forwarded as it is
        if (t == b"I" or t == b"s") and head.kind != b"E":
            return _NEXT
        want = _ANSWERS.get(t)
        if want is not None and head.kind != want:
            return self._out_of_step(t, head)
        self.expect.popleft()
        if head.op:
            self._namespace_answer(head, True)
        if head.swallow:
            sp.replace(start, end, b"")
            return _COMPLETED  # (our own messages queued behind it go out now)
        if head.plan_for is not None:
            # NoData for our own Describe: nothing to mask, nothing to forward.
            sp.replace(start, end, b"")
            if head.then is not None:
                sp.waiting = head
            return _NEXT
        if head.ctx is not None:
            self._finished(head.ctx)
        return _COMPLETED

    def _out_of_step(self, t: bytes, head: Expect) -> int:
        """An answer of a type the request at the head of the queue cannot get: the
        queue no longer matches what the target is answering, so no answer can be
        attributed (audited, masked, learnt from) any more. The session ends; nothing
        of this chunk reaches the client."""
        log.error("session %s: the target answered %r where the answer to %r was due; "
                  "closing the session", self.session_id, t, head.kind)
        self.fatal("08P01", "keyturn: the target's answers are out of step with the "
                   "requests sent; the session was closed so that no answer is taken for "
                   "another request's")
        return _STOP

    def _learn_param_types(self, name: str, body: bytes) -> None:
        """Parameter types the server inferred (clients such as asyncpg send 0 =
        unspecified in Parse), so binary parameters can be shown to approvers."""
        info = self.stmts.get(name)
        if info is None or info is _AMBIGUOUS or len(body) < 2:
            return
        (n,) = struct.unpack_from("!h", body, 0)
        if len(body) >= 2 + 4 * n:
            info.param_types = struct.unpack_from(f"!{n}I", body, 2)

    def upstream_lost(self, message: str, *, said_fatal: bool = False) -> None:
        if (self.terminating or said_fatal) and self.transport:
            # Terminate sent, or the target's own FATAL already relayed: just close (a
            # second error would be read as a second result of the client's statement).
            self.transport.close()
        elif not self.closed:
            self.fatal("08006", f"keyturn: lost the connection to the target: {message}")


#: The request each of these answers is the answer to (an Expect's kind).
_ANSWERS = {b"1": b"P", b"2": b"B", b"3": b"C", b"n": b"D"}
#: The transitions of the response-ordering state machine, by message type from the
#: target (the head of the queue of expected responses decides what each does). Types
#: not here are forwarded as they are (DataRow, NoticeResponse, NotificationResponse,
#: CopyData...); ParameterStatus is the read-only guard's (``server_data``).
TRANSITIONS: dict[bytes, Callable[..., int]] = {
    b"Z": ResponseRelay._on_ready,
    b"C": ResponseRelay._on_complete,
    b"E": ResponseRelay._on_error,
    b"t": ResponseRelay._on_parameters,
    b"1": ResponseRelay._on_answer,  # ParseComplete
    b"2": ResponseRelay._on_answer,  # BindComplete
    b"3": ResponseRelay._on_answer,  # CloseComplete
    b"n": ResponseRelay._on_answer,  # NoData
    b"T": ResponseRelay._on_answer,  # RowDescription (a Describe's answer)
    b"I": ResponseRelay._on_answer,  # EmptyQueryResponse (ends an Execute)
    b"s": ResponseRelay._on_answer,  # PortalSuspended (ends an Execute)
}
#: Messages from the target that go to the client as they are, whatever is expected:
#: rows and COPY data (masked on masked connections), notices and notifications
#: (redacted there), COPY starts, and what only login uses.
FORWARDED = frozenset((b"D", b"N", b"A", b"c", b"d", b"G", b"H", b"W", b"V", b"R", b"K",
                       b"v"))
