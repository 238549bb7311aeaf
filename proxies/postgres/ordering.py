"""Relaying the target's answers in order: the queue of expected responses, what each
answer completes, and where the gateway's own messages (refusals, notices) go.

Every message the session forwards appends what the target owes (``Expect``); this
mixin of ``ClientSession`` walks the target's messages against that queue, splices
masked or hidden messages, and completes requests (``_finished``). It must not block;
it is the hot path for results."""

from __future__ import annotations

import logging
import struct

from proxies.postgres import codec
from proxies.postgres.codec import Message
from proxies.postgres.state import _AMBIGUOUS, Expect, SessionState, _error_at, _rows, _splice

log = logging.getLogger(__name__)


_MASKED_TYPES = frozenset((b"T", b"C", b"E", b"N"))


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
        ``BackendReader.scan``). The chunk goes out as it came unless the
        gateway must slot its own messages in after a response completes.
        """
        self._take_fast()
        expect = self.expect
        out: list[bytes] | None = None
        seg = 0
        masking = self.masking
        prev = 0
        waiting: Expect | None = None  # an Execute whose Describe answer is here
        for t, start, end in frames:
            if masking and start > prev and expect:
                # Rows (DataRow, COPY data) lie between the frames listed.
                out, seg = self._rows(expect[0], chunk, prev, start, out, seg)
            prev = end
            if t == b"S":
                # default_transaction_read_only is the guard's: never forwarded, and off
                # only inside the gateway's own Queries around one command.
                drop = self._param_status(chunk[start + 5:end])
                if drop is not None:
                    out, seg = _splice(out, chunk, seg, start, end, drop)
                    if not self.upstream_ro and not (expect and expect[0].hide):
                        self._guard_lost()
                        return
                continue
            if not expect:
                continue
            head = expect[0]
            if head.hide:
                # The answer to a Query of the guard's own: none of it is forwarded.
                out, seg = _splice(out, chunk, seg, start, end, b"")
                if t == b"E":
                    log.warning("session %s: the read-only guard's query failed: %s",
                                self.session_id, codec.decode_error_fields(
                                    chunk[start + 5:end]).get("M", ""))
                if t != b"Z":
                    continue
                self.tx_status = chr(chunk[start + 5]) if end > start + 5 else "I"
                expect.popleft()
                if not expect:
                    self._guard_sync()
                    if self.closed:
                        return
                while expect and expect[0].kind == b"!":
                    inj = expect.popleft()
                    out.append(inj.inject or b"")
                    if inj.rfq:
                        out.append(codec.encode_ready_for_query(self.tx_status))
                continue
            if self.masking and t in _MASKED_TYPES and head.replace is None:
                new = self._mask_message(head, t, chunk, start, end)
                if new is not None:
                    out, seg = _splice(out, chunk, seg, start, end, new)
                if t == b"N" or (t == b"T" and head.plan_for is not None):
                    if t == b"T":
                        expect.popleft()
                        if head.then is not None:
                            waiting = head
                    continue
                if t == b"C" and head.ctx is not None and head.ctx.refusal is not None:
                    if head.kind == b"E":
                        expect.popleft()
                        self._finished(head.ctx)
                    continue
            if t == b"Z":
                self.tx_status = chr(chunk[start + 5]) if end > start + 5 else "I"
                # ReadyForQuery ends a Sync or a simple Query. Anything still expected
                # before it was skipped by the target after an error (messages that
                # reached us after the target's error already arrived): drop it.
                while expect:
                    entry = expect.popleft()
                    if entry.as_idle and self.tx_status != "I":
                        # The client's implicit transaction ran as the gateway's own: it
                        # is told idle, as after an implicit one (a ROLLBACK follows).
                        out, seg = _splice(out, chunk, seg, start, end,
                                           codec.encode_ready_for_query("I"))
                    if entry.op:
                        self._namespace_answer(entry, False)
                    elif entry.guard_stmt:
                        self.guard_stmts.discard(entry.guard_stmt)
                    if entry.ctx is not None:
                        if entry.kind not in (b"S", b"Q") and entry.ctx.error is None:
                            entry.ctx.error = {"C": "", "M": "skipped after an earlier error"}
                        self._finished(entry.ctx)
                    if entry.kind == b"S" or entry.kind == b"Q":
                        break
                if not expect:
                    self._guard_sync()
                    if self.closed:
                        return
            elif t == b"C":
                if head.ours is not None:
                    i = head.ci
                    head.ci = i + 1
                    if i < len(head.ours) and head.ours[i]:
                        out, seg = _splice(out, chunk, seg, start, end, b"")
                        continue  # a statement of the guard's own
                elif head.swallow:
                    out, seg = _splice(out, chunk, seg, start, end, b"")
                    if head.kind == b"E":
                        expect.popleft()
                    continue
                if head.ctx is not None:
                    tag = codec.decode_command_complete(chunk[start + 5:end])
                    ctx = head.ctx
                    if ctx.tags is None:
                        ctx.tags = [tag]
                    else:
                        ctx.tags.append(tag)
                    ctx.rows = _rows(tag, ctx.rows)
                if head.kind == b"E":
                    expect.popleft()
                    if head.ctx is not None:
                        self._finished(head.ctx)
            elif t == b"E":
                if head.replace is not None:
                    # Our refusal stands in for the error of the query that failed the
                    # target's transaction.
                    out, seg = _splice(out, chunk, seg, start, end, head.replace)
                    if head.kind != b"Q":
                        # Extended protocol: the target now skips to the Sync.
                        while expect and expect[0].kind != b"S":
                            dropped = expect.popleft()
                            if dropped.op:
                                self._namespace_answer(dropped, False)
                            elif dropped.guard_stmt:
                                self.guard_stmts.discard(dropped.guard_stmt)
                    continue
                fields = codec.decode_error_fields(chunk[start + 5:end])
                if head.rewritten is not None and "P" in fields:
                    # A position in the text sent: as a position in the client's text.
                    moved = head.rewritten.client_position(int(fields["P"] or 0))
                    out, seg = _splice(out, chunk, seg, start, end,
                                       _error_at(chunk[start + 5:end], moved))
                if head.ctx is not None:
                    head.ctx.error = fields
                if head.kind != b"Q" and head.kind != b"S":
                    # Extended protocol: the target skips everything up to Sync.
                    while expect and expect[0].kind != b"S":
                        dropped = expect.popleft()
                        if dropped.op:
                            self._namespace_answer(dropped, False)
                        elif dropped.guard_stmt:
                            self.guard_stmts.discard(dropped.guard_stmt)
                        if dropped.ctx is not None:
                            if dropped.ctx.error is None:
                                dropped.ctx.error = fields
                            self._finished(dropped.ctx)
            elif t == b"t":
                if head.kind == b"D" and head.name is not None:
                    self._learn_param_types(head.name, chunk[start + 5:end])
                continue
            elif t in (b"1", b"2", b"3", b"n", b"I", b"s") or (t == b"T" and head.kind == b"D"):
                if t in (b"I", b"s") and head.kind != b"E":
                    continue
                expect.popleft()
                if head.op:
                    self._namespace_answer(head, True)
                if head.swallow:
                    out, seg = _splice(out, chunk, seg, start, end, b"")
                    continue
                if head.plan_for is not None:
                    # NoData for our own Describe: nothing to mask, nothing to forward.
                    if out is None:
                        out = []
                    out.append(chunk[seg:start])
                    seg = end
                    if head.then is not None:
                        waiting = head
                    continue
                if head.ctx is not None:
                    self._finished(head.ctx)
            else:
                continue
            if expect and expect[0].kind == b"!":
                if out is None:
                    out = []
                out.append(chunk[seg:end])
                seg = end
                while expect and expect[0].kind == b"!":
                    inj = expect.popleft()
                    out.append(inj.inject or b"")
                    if inj.rfq:
                        out.append(codec.encode_ready_for_query(self.tx_status))
        if masking and prev < len(chunk) and expect:
            out, seg = self._rows(expect[0], chunk, prev, len(chunk), out, seg)
        if out is None:
            self.write(chunk)
        else:
            out.append(chunk[seg:])
            self.write(b"".join(out))
        if waiting is not None:
            self._release_execute(waiting)
        if self.barrier_done:
            self.barrier_done = False
            self.holding = False
            self._replay_backlog()

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
