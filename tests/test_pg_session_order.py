"""The session's ordering of responses, driven message by message without sockets
(the transcript harness, tests/pg_playbook.py): the client's messages and the target's
answers interleaved exactly as a race on the network can interleave them."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxies.postgres import codec, ordering
from tests.pg_playbook import PgPlaybook, types

CONFIG = """
identity: {users: {alice: {groups: [eng]}}}
connections:
  - {name: db, type: postgres, target: {host: 127.0.0.1, port: 5432, user: app}, policy: p}
policies:
  p:
    default: block
    rules:
      - {name: reads, match: {class: [read, transaction, session]}, action: allow}
"""


@pytest.fixture()
def pb(tmp_path: Path) -> Iterator[PgPlaybook]:
    pb = PgPlaybook(CONFIG, tmp_path)
    got = pb.login()
    assert types(got)[0] == "R" and types(got)[-1] == "Z"
    yield pb
    pb.close()


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def extended(sql: str) -> bytes:
    return (codec.encode_parse("", sql) + codec.encode_bind("", "") +
            codec.encode_describe("P", "") + codec.encode_execute("", 0))


ERROR = codec.encode_error("ERROR", "22012", "division by zero")


def test_login_reaches_the_target_with_the_guard_and_tells_the_client_its_settings(
        tmp_path: Path) -> None:
    pb = PgPlaybook(CONFIG, tmp_path)
    try:
        got = pb.login()
        status = dict(codec.decode_parameter_status(m.body) for m in got if m.type == b"S")
        # The guard's read-only default is the gateway's business: clients (libpq's
        # target_session_attrs) see a server that takes writes; the rest as reported.
        assert status["default_transaction_read_only"] == "off"
        assert status["server_version"] == "15.0" and status["client_encoding"] == "UTF8"
        assert [m.type for m in got if m.type in (b"K", b"Z")] == [b"K", b"Z"]
        pb.quiet()
    finally:
        pb.close()


def test_target_error_before_the_rest_of_the_batch_arrives(pb: PgPlaybook) -> None:
    pb.client_sends(extended("SELECT 1/0"))          # first part of a pipeline
    pb.target_gets(4)                                 # Parse, Bind, Describe, Execute
    pb.target_sends(msg(b"1") + ERROR)                # the target fails at Bind, at once
    pb.client_sends(extended("DROP TABLE t") + codec.encode_sync())  # blocked, then Sync
    pb.target_sends(msg(b"Z", b"I"))                  # the target skipped to the Sync
    # As from PostgreSQL itself: the first error, then ReadyForQuery (the refused DROP
    # came after the error, so it was skipped like the rest of the batch).
    got = pb.client_gets(3)
    assert types(got) == ["1", "E", "Z"] and b"22012" in got[1].body
    # And the session is in step: the next query is answered normally.
    # What reached the target for the DROP: its Parse/Bind/Describe, then, instead of its
    # Execute, the gateway's failing statement, then the Sync.
    sent = pb.target_gets(7)
    assert types(sent) == ["P", "B", "D", "P", "B", "E", "S"]
    assert b"DROP" in sent[0].body and b"keyturn refused a statement" in sent[3].body
    pb.client_sends(codec.encode_query("SELECT 42"))
    assert types(pb.target_gets(1)) == ["Q"]
    pb.target_sends(msg(b"T", struct.pack("!h", 0)) + msg(b"C", b"SELECT 1\0") +
                    msg(b"Z", b"I"))
    assert types(pb.client_gets(3)) == ["T", "C", "Z"]
    pb.quiet()
    assert not pb.session.expect


def test_refused_execute_before_sync_answers_like_an_error(pb: PgPlaybook) -> None:
    pb.client_sends(extended("SELECT 1") + extended("DROP TABLE t") + codec.encode_sync())
    # The target answers the first query, the forwarded Parse/Bind/Describe of the second,
    # then fails the gateway's own failing statement at Parse and skips to the Sync.
    pb.target_sends(msg(b"1") + msg(b"2") + msg(b"T", struct.pack("!h", 0)) +
                    msg(b"C", b"SELECT 1\0") + msg(b"1") + msg(b"2") + msg(b"n") +
                    codec.encode_error("ERROR", "22P02", "invalid input syntax") +
                    msg(b"Z", b"I"))
    got = pb.client_gets(9)
    assert types(got) == ["1", "2", "T", "C", "1", "2", "n", "E", "Z"]
    # The client's error is the gateway's refusal, not the stand-in's failure.
    assert b"keyturn" in got[7].body and b"22P02" not in got[7].body
    assert not pb.session.expect


def test_every_message_the_target_can_send_has_a_transition_or_is_forwarded() -> None:
    handled = set(ordering.TRANSITIONS) | ordering.FORWARDED | {b"S"}  # S: the guard's
    assert handled == set(codec.BACKEND_TYPES)
    assert not set(ordering.TRANSITIONS) & ordering.FORWARDED


def test_an_execute_with_a_row_limit_ends_at_portal_suspended(pb: PgPlaybook) -> None:
    pb.client_sends(codec.encode_parse("", "SELECT 1") + codec.encode_bind("", "") +
                    codec.encode_execute("", 1) + codec.encode_sync())
    assert types(pb.target_gets(4)) == ["P", "B", "E", "S"]
    pb.target_sends(msg(b"1") + msg(b"2") + msg(b"D", struct.pack("!hi", 1, 1) + b"1") +
                    msg(b"s") + msg(b"Z", b"I"))
    assert types(pb.client_gets(5)) == ["1", "2", "D", "s", "Z"]
    pb.quiet()
    assert not pb.session.expect


def test_an_empty_query_is_answered_and_the_session_stays_in_step(pb: PgPlaybook) -> None:
    pb.client_sends(codec.encode_query(""))
    pb.target_gets(1)
    pb.target_sends(msg(b"I") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["I", "Z"]
    pb.client_sends(codec.encode_query("SELECT 1"))
    pb.target_gets(1)
    pb.target_sends(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["C", "Z"]
    pb.quiet()
    assert not pb.session.expect


LIMITED = CONFIG + """
gateway:
  limits: {large_rows_mib_per_user: 64, large_rows_mib: 128}
"""


def test_a_client_that_does_not_read_large_rows_is_ended_at_its_budget(
        tmp_path: Path) -> None:
    """Rows are relayed whole; what a user's sessions hold of large results (a row still
    arriving, what the client has not read) is capped: over the cap the session ends at
    once and its buffers are dropped, so one user cannot run the gateway out of memory."""
    pb = PgPlaybook(LIMITED, tmp_path)
    try:
        pb.login()
        pb.client.high_water = 64 * 1024
        pb.client_sends(codec.encode_query("SELECT repeat('y', 40 * 1024 * 1024)"))
        pb.target_gets(1)
        row = msg(b"D", struct.pack("!hi", 1, 40 * 1024 * 1024) + b"y" * (40 * 1024 * 1024))
        pb.target_sends(row)  # the client reads nothing: 40 MiB held, within 64
        assert pb.gw.row_buffers[pb.session] > 40 * 1024 * 1024
        assert not pb.session.closed
        pb.target_sends(row[:30 * 1024 * 1024])  # a second row arriving: 70 MiB held
        pb.run(asyncio.sleep(0.01))
        assert pb.session.closed and pb.client.closed and pb.target.closed
        assert pb.session not in pb.gw.row_buffers
        # The refusal is the last thing written (the unread rows were dropped with it
        # in a real transport; here the wire keeps what was written).
        assert b"53200" in pb.client.written[-300:] and b"large_rows_mib_per_user" in \
            pb.client.written[-300:]
    finally:
        pb.close()


def test_a_client_that_reads_its_large_rows_is_not_counted(pb: PgPlaybook) -> None:
    pb.client.high_water = 64 * 1024
    row = msg(b"D", struct.pack("!hi", 1, 3 * 1024 * 1024) + b"y" * (3 * 1024 * 1024))
    pb.client_sends(codec.encode_query("SELECT repeat('y', 3 * 1024 * 1024)"))
    pb.target_gets(1)
    pb.target_sends(row)
    assert pb.session in pb.gw.row_buffers  # 3 MiB the client has not read yet
    assert types(pb.client_gets(1)) == ["D"]  # the client reads it
    pb.call(pb.session.resume_writing)  # as the transport says once it drained
    assert pb.session not in pb.gw.row_buffers
    pb.target_sends(msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["C", "Z"]


def test_a_statement_whose_records_cannot_be_written_is_not_sent(pb: PgPlaybook) -> None:
    """Write-ahead: when the intent record cannot reach the spool file (a full disk),
    the statement must not reach the target; the session ends with the refusal and the
    spool refuses new statements until it can write again."""
    spool = pb.spool
    real = spool._fh

    class FullDisk:  # the spool file on a full disk: every write fails as the OS says
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    spool._fh = FullDisk()
    try:
        pb.client_sends(codec.encode_query("SELECT 1"))
        got = pb.client_gets(1)
        assert types(got) == ["E"] and b"58030" in got[0].body
        assert b"No space left on device" in got[0].body
        assert pb.session.closed
        assert not pb.target.data, "nothing reached the target"
        assert not spool.accepting and spool.refusal is not None
    finally:
        spool._fh = real


def test_a_fast_path_chunk_whose_records_cannot_be_written_is_not_sent(pb: PgPlaybook) -> None:
    """The compiled fast path defers its chunks to the end of the loop turn (one spool
    write for the turn, the gateway's write_ahead): when that write fails, the deferred
    chunk must not reach the target and its session ends with the refusal."""
    spool, wa = pb.spool, pb.gw.write_ahead
    assert wa is not None
    select = codec.encode_query("SELECT 1")
    answer = msg(b"T", struct.pack("!h", 0)) + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")
    pb.client_sends(select)  # the first time through Python: allowed, memoised
    assert types(pb.target_gets(1)) == ["Q"]
    pb.target_sends(answer)
    assert types(pb.client_gets(3)) == ["T", "C", "Z"]
    pb.client_sends(select)  # again: the fast path, deferred to the end of the turn
    assert types(pb.target_gets(1)) == ["Q"]
    pb.target_sends(answer)
    assert types(pb.client_gets(3)) == ["T", "C", "Z"]
    writes, chunks = wa.stats
    assert chunks >= 1 and writes >= 1
    real = spool._fh

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    sent = len(pb.target.data)
    spool._fh = FullDisk()
    try:
        pb.client_sends(select)
        got = pb.client_gets(1)
        assert wa.stats[1] == chunks + 1, "the chunk went the fast way"
        assert types(got) == ["E"] and b"58030" in got[0].body
        assert pb.session.closed and wa.pending == 0
        assert len(pb.target.data) == sent, "nothing more reached the target"
    finally:
        spool._fh = real


@pytest.mark.parametrize("client,sent,answer", [
    pytest.param(codec.encode_query("SELECT 1"), 1, msg(b"1"), id="parse-complete-for-a-query"),
    pytest.param(codec.encode_parse("s1", "SELECT 1") + codec.encode_sync(), 2,
                 msg(b"C", b"SELECT 1\0"), id="command-complete-for-a-parse"),
    pytest.param(codec.encode_parse("s1", "SELECT 1") + codec.encode_sync(), 2, msg(b"2"),
                 id="bind-complete-for-a-parse"),
    pytest.param(codec.encode_close("S", "s1") + codec.encode_sync(), 2, msg(b"n"),
                 id="no-data-for-a-close"),
])
def test_an_answer_out_of_step_with_the_requests_ends_the_session(
        pb: PgPlaybook, client: bytes, sent: int, answer: bytes) -> None:
    """Answers are attributed to requests by their order: one of a type its request
    cannot get means the two no longer match (the target ignored or added something), so
    no later answer can be trusted to be the one for its statement (rows, audit, masking,
    what a statement name holds). The session ends; the stray answer is not forwarded."""
    pb.client_sends(client)
    assert len(pb.target_gets(sent)) == sent
    pb.target_sends(answer + msg(b"Z", b"I"))
    (got,) = pb.client_gets(1)
    assert got.type == b"E" and b"SFATAL\0" in got.body and b"C08P01\0" in got.body
    assert b"out of step" in got.body
    assert pb.session.closed
    pb.quiet()


def test_a_prepared_statement_no_longer_allowed_is_refused_at_bind(tmp_path: Path) -> None:
    """The server plans again at Bind (folding immutable functions): once the catalog
    says a prepared statement runs user code the policy does not allow, its Bind is
    refused before it is sent."""
    from keyturn.analysis.pgcatalog import TargetCatalog

    harmless = TargetCatalog.from_rows(user="app", search_path=None, views=[
        ("public", "rep", "SELECT 'x'::text AS v", "v")])
    evil = TargetCatalog.from_rows(
        user="app", search_path=None,
        routines=[("public", "evil", "f", "i", "plpgsql", False, None)],
        views=[("public", "rep", "SELECT public.evil() AS v", "v")])
    current = [harmless]
    pb = PgPlaybook(CONFIG, tmp_path, catalog_reader=lambda _c: current[0])
    try:
        pb.login()
        pb.client_sends(codec.encode_parse("s1", "SELECT v FROM rep") + codec.encode_bind(
            "", "s1") + codec.encode_execute("", 0) + codec.encode_sync())
        assert types(pb.target_gets(4)) == ["P", "B", "E", "S"]
        pb.target_sends(msg(b"1") + msg(b"2") + msg(b"C", b"SELECT 0\0") + msg(b"Z", b"I"))
        assert types(pb.client_gets(4)) == ["1", "2", "C", "Z"]
        current[0] = evil  # the DBA changed the view; the gateway reads the catalog again
        pb.call(pb.gw.catalogs.refresh, pb.session.conn)
        pb.run(asyncio.sleep(0.3))
        pb.client_sends(codec.encode_bind("", "s1") + codec.encode_execute("", 0) +
                        codec.encode_sync())
        sent = pb.target_gets(4)  # the gateway's failing statement and the Sync, no Bind
        assert not any(m.type == b"B" and b"s1" in m.body for m in sent)
        pb.target_sends(codec.encode_error("ERROR", "22P02", "x") + msg(b"Z", b"I"))
        got = pb.client_gets(2)
        assert types(got) == ["E", "Z"] and b"42501" in got[0].body
        assert b"user-defined code" in got[0].body
    finally:
        pb.close()


def test_a_name_whose_change_failed_in_a_batch_is_never_bound(pb: PgPlaybook) -> None:
    """After an error the server skips the rest of the batch: a Parse of an existing name
    fails and a Close after it is skipped, so the name still holds its first statement,
    not the failed Parse's. The gateway cannot tell which it holds from its own view of
    the batch: the name is ambiguous and its Bind is refused before it is sent."""
    pb.client_sends(codec.encode_parse("s", "SELECT 1") + codec.encode_sync())
    assert types(pb.target_gets(2)) == ["P", "S"]
    pb.target_sends(msg(b"1") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["1", "Z"]
    pb.client_sends(codec.encode_parse("s", "SELECT 2") + codec.encode_close("S", "s") +
                    codec.encode_sync())
    assert types(pb.target_gets(3)) == ["P", "C", "S"]
    pb.target_sends(codec.encode_error("ERROR", "42P05", 'prepared statement "s" already '
                                       "exists") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["E", "Z"]
    pb.client_sends(codec.encode_bind("", "s") + codec.encode_execute("", 0) +
                    codec.encode_sync())
    sent = pb.target_gets(4)  # the gateway's failing statement and the Sync: no Bind of s
    assert not any(m.type == b"B" and m.body.split(b"\0")[1] == b"s" for m in sent)
    pb.target_sends(codec.encode_error("ERROR", "22P02", "x") + msg(b"Z", b"I"))
    got = pb.client_gets(2)
    assert types(got) == ["E", "Z"] and b"cannot tell which definition" in got[0].body


def test_a_name_prepared_by_sql_is_not_bound(pb: PgPlaybook) -> None:
    """A protocol Bind of a name prepared with SQL PREPARE: the gateway did not see its
    Parse, and the server plans at Bind: refused before it is sent."""
    pb.client_sends(codec.encode_query("PREPARE sp1 AS SELECT 1"))
    pb.target_gets(1)
    pb.target_sends(msg(b"C", b"PREPARE\0") + msg(b"Z", b"I"))
    assert types(pb.client_gets(2)) == ["C", "Z"]
    pb.client_sends(codec.encode_bind("", "sp1") + codec.encode_execute("", 0) +
                    codec.encode_sync())
    sent = pb.target_gets(4)
    assert not any(m.type == b"B" and b"sp1" in m.body for m in sent)
    pb.target_sends(codec.encode_error("ERROR", "22P02", "x") + msg(b"Z", b"I"))
    got = pb.client_gets(2)
    assert types(got) == ["E", "Z"] and b"did not see the Parse" in got[0].body
