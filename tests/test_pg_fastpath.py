"""The compiled fast path (_speedups.FastPath) must relay exactly what the Python session
relays: the same bytes to the target and to the client, the same audit records and the
same transaction status, for any mix of messages, however the network cuts them into
chunks. Each scenario runs twice in-process, with and without the fast path, against
a small scripted target; the end-to-end tests (test_pg_gateway.py and the others) run
the fast path against real PostgreSQL servers and clients.

Also here: the compiled fast_shape equals the regular-expression one it stands in for.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyturn import auditschema
from keyturn.analysis.postgres import MAX_SHAPED_TEXT, fast_shape
from proxies.postgres import codec
from proxies.postgres.session import ClientSession
from proxies.postgres.speedups import compiled
from proxies.postgres.state import FAST_AUDIT_LAYOUT
from proxies.postgres.upstream import Upstream
from tests.pg_playbook import PgPlaybook

pytestmark = pytest.mark.skipif(compiled is None, reason="compiled speedups not built")

CFG = """
identity: {users: {alice: {groups: [eng]}}}
connections:
  - {name: bench, type: postgres, target: {host: 127.0.0.1, port: 5432, user: app},
     policy: bench}
policies:
  bench:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: history
        match: {class: [write], tables: [public.hist]}
        action: allow
"""


def msg(t: bytes, body: bytes) -> bytes:
    return codec.encode_message(t, body)


def feed(side: ClientSession | Upstream, data: bytes) -> None:
    """Deliver a chunk the way the event loop does: to the transport's protocol (the
    session, or the compiled relay in its place), inside the playbook's loop."""
    session = side.session if isinstance(side, Upstream) else side
    assert side.transport is not None
    _PLAYBOOKS[id(session)].call(side.transport.protocol.data_received, data)  # type: ignore[attr-defined]


def inside(s: ClientSession, fn: Any, *args: Any) -> Any:
    """Call ``fn`` inside the session's event loop (as a callback of the loop would)."""
    return _PLAYBOOKS[id(s)].call(fn, *args)


class Target:
    """Answers what the gateway sends the way PostgreSQL would, for the statements used
    here: a statement whose text holds 'fail' fails; after an error in the extended
    protocol everything up to Sync is skipped. Sometimes starts an answer with a
    NoticeResponse or ParameterStatus (asynchronous messages)."""

    def __init__(self, rng: random.Random, notices: float = 0.08) -> None:
        self.rng = rng
        self.notices = notices  # how often an answer starts with an async message
        self.buf = bytearray()
        self.stmts: dict[str, str] = {}
        self.portal = ""
        self.portals: dict[str, str] = {}
        self.skipping = False
        self.tx = "I"

    def _row(self) -> bytes:
        return msg(b"D", struct.pack("!hi", 1, 1) + b"7")

    def _query(self, sql: str) -> bytes:
        """Each statement of a simple Query in turn (the read-only guard's own too), as
        PostgreSQL answers them; an error ends the Query (and aborts a transaction)."""
        out = bytearray()
        statements = [part.strip() for part in sql.split(";") if part.strip()]
        implicit = self.tx == "I" and len(statements) > 1
        for text in statements:
            verb = text.split()[0].upper()
            if self.tx == "E" and verb not in ("ROLLBACK", "COMMIT", "END"):
                out += msg(b"E", b"SERROR\0C25P02\0Mcurrent transaction is aborted\0\0")
                break
            if "fail" in text or "keyturn refused" in text:
                out += msg(b"E", b"SERROR\0C22012\0Mdivision by zero\0P8\0\0")
                self.tx = "E" if self.tx != "I" else "I"
                break
            if verb in ("BEGIN", "START"):
                self.tx = "T"
                out += msg(b"C", b"BEGIN\0")
            elif verb in ("COMMIT", "END", "ROLLBACK"):
                tag = b"ROLLBACK" if self.tx == "E" or verb == "ROLLBACK" else b"COMMIT"
                self.tx = "I"
                out += msg(b"C", tag + b"\0")
            elif verb in ("SAVEPOINT", "RELEASE", "SET"):
                out += msg(b"C", verb.encode() + b"\0")
            elif verb == "UPDATE":
                out += msg(b"C", b"UPDATE 1\0")
            elif verb == "INSERT":
                out += msg(b"C", b"INSERT 0 1\0")
            else:
                out += msg(b"T", struct.pack("!h", 1) + b"x\0" + b"\0" * 18)
                out += self._row() + msg(b"C", b"SELECT 1\0")
        if implicit and self.tx == "E":
            self.tx = "I"
        return bytes(out)

    def _execute(self, sql: str) -> bytes:
        """An Execute in the extended protocol: as a statement of a Query, but an error
        skips everything up to Sync; a read returns two rows."""
        verb = sql.split()[0].upper() if sql.split() else ""
        if "fail" in sql or (self.tx == "E" and verb not in ("ROLLBACK", "COMMIT", "END")):
            self.skipping = True
            if self.tx != "I":
                self.tx = "E"
            return msg(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0")
        if verb in ("SELECT", "TABLE", "VALUES", "WITH"):
            return self._row() + self._row() + msg(b"C", b"SELECT 2\0")
        return self._query(sql)

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while len(self.buf) >= 5:
            t = bytes(self.buf[:1])
            (n,) = struct.unpack_from("!i", self.buf, 1)
            if len(self.buf) < n + 1:
                break
            body = bytes(self.buf[5:n + 1])
            del self.buf[:n + 1]
            if self.rng.random() < self.notices:
                out += msg(b"N", b"SNOTICE\0C00000\0Mnote\0\0")
            if self.rng.random() < self.notices / 2:
                out += codec.encode_parameter_status("application_name", "x")
            if t == b"S":
                self.skipping = False
                out += msg(b"Z", self.tx.encode())
                continue
            if self.skipping:
                continue
            if t == b"Q":
                out += self._query(body[:-1].decode())
                out += msg(b"Z", self.tx.encode())
            elif t == b"P":
                name, rest = body.split(b"\0", 1)
                sql = rest.split(b"\0", 1)[0].decode()
                if "keyturn refused" in sql:
                    out += msg(b"E", b"SERROR\0C22P02\0Mbad cast\0\0")
                    self.skipping = True
                    continue
                self.stmts[name.decode()] = sql
                out += msg(b"1", b"")
            elif t == b"B":
                portal, rest = body.split(b"\0", 1)
                self.portals[portal.decode()] = rest.split(b"\0", 1)[0].decode()
                self.portal = self.portals.get("", "")
                out += msg(b"2", b"")
            elif t == b"E":
                sql = self.stmts.get(self.portals.get(body.split(b"\0", 1)[0].decode(), ""),
                                     "fail")
                out += self._execute(sql)
            elif t == b"C":
                out += msg(b"3", b"")
            elif t == b"D":
                if "fail" in self.stmts.get(self.portal, "fail") and self.rng.random() < 0.5:
                    out += msg(b"n", b"")
                else:
                    out += msg(b"T", struct.pack("!h", 1) + b"v\0" + b"\0" * 18)
        return bytes(out)




_PLAYBOOKS: dict[int, PgPlaybook] = {}


@pytest.fixture(autouse=True)
def _close_playbooks() -> Iterator[None]:
    yield
    while _PLAYBOOKS:
        pb = _PLAYBOOKS.popitem()[1]
        pb.close()
        shutil.rmtree(pb.base, ignore_errors=True)


def new_session(fast: bool | str, records: list[bytes]) -> tuple[ClientSession, Upstream]:
    """A session logged in through the transcript harness (tests/pg_playbook.py): the real
    gateway and session, no sockets. ``fast``: False (Python only), True (compiled, fed
    by the session) or "relay" (compiled relays in the sockets' place, as in production).
    The transports' ``data`` is everything sent after login; ``collect`` reads the audit
    lines."""
    pb = PgPlaybook(CFG, Path(tempfile.mkdtemp(prefix="fastpath-")), fast=fast)
    pb.login("alice", "bench")
    s, up = pb.session, pb.upstream
    _PLAYBOOKS[id(s)] = pb
    assert (s.fast is not None) == bool(fast)
    return s, up


def collect(s: ClientSession, records: list[bytes]) -> list[bytes]:
    """The session's audit lines so far (its statements and their intents)."""
    records[:] = [line for line in _PLAYBOOKS[id(s)].records()
                  if orjson.loads(line).get("kind") in ("intent", "statement")]
    return records


def audit_records(s: ClientSession, records: list[bytes],
                  drop: tuple[str, ...] = ("at", "duration_ms", "session_id")) -> list[dict]:
    """The session's audit records, without the fields that differ from run to run.

    Write-ahead: each completed statement's intent record was written before it, with
    the same number (odd from the compiled path, even from Python); checked here, then
    intents and the other records are returned each in their own order (the two paths
    interleave them differently: the compiled one writes a chunk's intents together)."""
    lines = [orjson.loads(line) for line in collect(s, records)]
    for rec in lines:  # both paths write lines of the one schema
        assert not auditschema.check_line(rec), (rec, auditschema.check_line(rec))
    seen: dict[int, dict] = {}
    for rec in lines:
        if rec["kind"] == "intent":
            assert rec["n"] not in seen
            seen[rec["n"]] = rec
        elif "n" in rec:
            intent = seen[rec["n"]]  # written before the statement was sent
            assert intent["statement"] == rec["statement"]
            assert intent["session_id"] == rec["session_id"]
    drop = (*drop, "n")
    ordered = [r for r in lines if r["kind"] == "intent"] + \
        [r for r in lines if r["kind"] != "intent"]
    return [{k: v for k, v in r.items() if k not in drop} for r in ordered]


def client_messages(rng: random.Random) -> list[bytes]:
    """One client turn: a simple query, or an extended-protocol batch ending in Sync."""
    r = rng.random()
    n = rng.randint(1, 5)
    if rng.random() < 0.12:
        # a prepared write (pgbench -M prepared), sometimes prepared again first
        v = b"%d" % n
        msgs = [codec.encode_bind("", "w1", params=[v, b"x" if n == 5 else v]),
                codec.encode_describe("P", ""), codec.encode_execute("", 0),
                codec.encode_sync()]
        if rng.random() < 0.2:
            msgs.insert(0, codec.encode_parse("w1", rng.choice([
                "UPDATE hist SET v = v + $1 WHERE id = $2",
                "INSERT INTO hist (id, v) VALUES ($1, $2)"])))
        return msgs
    if rng.random() < 0.3:
        # pgbench's simple-update in pieces: writes the policy allows, reads inside the
        # transaction (the read-only guard's savepoint around them), failures inside it
        return [codec.encode_query(rng.choice([
            "BEGIN;", "BEGIN", "END;", "COMMIT", "ROLLBACK",
            f"UPDATE hist SET v = v + {n} WHERE id = {n};",
            f"INSERT INTO hist (id, v) VALUES ({n}, {n});",
            f"SELECT abalance FROM acc WHERE aid = {n};",
            f"  SELECT abalance FROM acc WHERE aid = {n} ; ",
            f"UPDATE hist SET v = v / 0 WHERE id = {n} -- fail",
            "SELECT 1/0 AS fail"]))]
    if r < 0.35:
        return [codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {n};")]
    if r < 0.42:
        return [codec.encode_query(rng.choice([
            "SELECT 1/0 AS fail", "SELECT 'quoted' AS x", "BEGIN", "COMMIT",
            "DELETE FROM acc", f"SELECT {n}\n\t AS x"]))]
    if r < 0.75:
        v = str(n).encode()
        bind = msg(b"B", b"\0s1\0" + struct.pack("!hhi", 0, 1, len(v)) + v + struct.pack("!h", 0))
        if rng.random() < 0.5:  # libpq: Bind, Describe portal, Execute, Sync
            return [bind, codec.encode_describe("P", ""), codec.encode_execute("", 0),
                    codec.encode_sync()]
        return [bind, codec.encode_execute("", 0), codec.encode_sync()]
    if r < 0.85:
        sql = rng.choice(["SELECT v FROM acc WHERE id = $1", "SELECT v/0 AS fail FROM acc "
                          "WHERE id = $1", "DELETE FROM acc WHERE id = $1"])
        v = b"3"
        return [codec.encode_parse("s1", sql), codec.encode_bind("", "s1", params=[v]),
                codec.encode_execute("", 0), codec.encode_sync()]
    if r < 0.92:
        return unnamed(rng)
    if r < 0.95:
        return [codec.encode_close("S", "s1"), codec.encode_sync()]
    return [codec.encode_bind("", "s1", params=[b"4"]), codec.encode_execute("", 0),
            codec.encode_flush(), codec.encode_sync()]


def unnamed(rng: random.Random) -> list[bytes]:
    """A parameterised query as psycopg, JDBC or pgx send it: Parse of the unnamed
    statement, Bind, Describe (sometimes), Execute, Sync; the same few texts again and
    again, one of them failing, one blocked, one with declared parameter types."""
    sql, types = rng.choice([("SELECT v FROM acc WHERE id = $1", ()),
                             ("SELECT v FROM acc WHERE id = $1", (23,)),
                             ("SELECT w FROM acc WHERE id = $1", ()),
                             ("SELECT v/0 AS fail FROM acc WHERE id = $1", ()),
                             ("DELETE FROM acc WHERE id = $1", ()),
                             ("UPDATE hist SET v = v + $1 WHERE id = 2", ())])
    v = str(rng.randint(1, 9)).encode()
    msgs = [codec.encode_parse("", sql, types), codec.encode_bind("", "", params=[v])]
    if rng.random() < 0.5:
        msgs.append(codec.encode_describe("P", ""))
    msgs.append(codec.encode_execute("", 0))
    r = rng.random()
    if r < 0.15:  # the unnamed statement bound again in the same batch
        msgs += [codec.encode_bind("", "", params=[b"1"]), codec.encode_execute("", 0)]
    elif r < 0.25:  # two statements in one batch (a pipeline)
        msgs += unnamed(rng)[:-1]
    return [*msgs, codec.encode_sync()]


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """The same bytes, cut the way a network might: whole, or at random points."""
    if rng.random() < 0.7 or len(data) < 2:
        return [data]
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 3))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run(seed: int, fast: bool | str) -> tuple[bytes, bytes, list[dict], str, int]:
    rng = random.Random(seed)
    target = Target(random.Random(seed + 1))
    records: list[bytes] = []
    s, up = new_session(fast, records)
    assert s.transport is not None and up.transport is not None
    sent = 0
    handled = 0
    for _ in range(60):
        data = b"".join(b"".join(client_messages(rng)) for _ in range(rng.randint(1, 3)))
        for piece in cut(rng, data):
            before = s.fast.pending if fast else 0
            feed(s, piece)
            handled += (s.fast.pending if fast else 0) > before
        new = bytes(up.transport.data[sent:])
        sent = len(up.transport.data)
        answer = target.feed(new)
        for piece in cut(rng, answer):
            feed(up, piece)
    recs = audit_records(s, records)
    return (bytes(up.transport.data), bytes(s.transport.data), recs, s.tx_status, handled)


@pytest.mark.parametrize("fast", [True, "relay"])
@pytest.mark.parametrize("seed", range(40))
def test_fast_path_relays_and_audits_exactly_like_the_python_session(
        seed: int, fast: bool | str) -> None:
    to_target, to_client, records, tx, _ = run(seed, fast=False)
    f_target, f_client, f_records, f_tx, handled = run(seed, fast=fast)
    assert f_target == to_target
    assert f_client == to_client
    assert f_records == records
    assert f_tx == tx
    assert records, "the scenario audited statements"


def run_interleaved(seed: int, fast: bool | str) -> tuple[bytes, bytes, list[dict], str, int]:
    """Like run(), but pipelined: the client sends its next batches while the target's
    answers to earlier ones are still on their way, cut at random points, so chunks from
    the two sides arrive in every order. Mostly statements the fast path takes."""
    rng = random.Random(seed)
    target = Target(random.Random(seed + 1), notices=0.01)
    records: list[bytes] = []
    s, up = new_session(fast, records)
    assert s.transport is not None and up.transport is not None
    to_client: list[bytes] = []
    to_target: list[bytes] = []
    sent = armed = 0
    first = codec.encode_parse("s1", "SELECT v FROM acc WHERE id = $1")
    for _ in range(300):
        if not to_target:
            if rng.random() < 0.7:  # now and then the client waits for its answers
                while to_client:
                    feed(up, to_client.pop(0))
            batches = []
            for _ in range(rng.randint(1, 3)):
                n = rng.randint(1, 5)
                v = str(n).encode()
                bind = msg(b"B", b"\0s1\0" + struct.pack("!hhi", 0, 1, len(v)) + v
                           + struct.pack("!h", 0))
                r = rng.random()
                batches.append(
                    codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {n};") if r < 0.35
                    else bind + codec.encode_execute("", 0) + codec.encode_sync() if r < 0.65
                    else b"".join(unnamed(rng)) if r < 0.92
                    else b"".join(client_messages(rng)))
            to_target.extend(cut(rng, first + b"".join(batches)))
            first = b""
        if to_client and rng.random() < 0.5:
            feed(up, to_client.pop(0))
        else:
            armed += bool(s.fast is not None and s.fast.armed)
            feed(s, to_target.pop(0))
            new = bytes(up.transport.data[sent:])
            sent = len(up.transport.data)
            to_client.extend(cut(rng, target.feed(new)))
    while to_client:
        feed(up, to_client.pop(0))
    recs = audit_records(s, records)
    return bytes(up.transport.data), bytes(s.transport.data), recs, s.tx_status, armed


@pytest.mark.parametrize("fast", [True, "relay"])
@pytest.mark.parametrize("seed", range(25))
def test_pipelined_chunks_from_both_sides_in_any_order_give_the_same_result(
        seed: int, fast: bool | str) -> None:
    expected = run_interleaved(seed, False)[:4]
    assert run_interleaved(seed, fast)[:4] == expected
    assert expected[2], "the scenario audited statements"


def test_the_relays_are_armed_often_in_the_pipelined_scenarios() -> None:
    # Guards against the test above passing because the relays never went fast: a
    # client chunk arrives at an armed relay about 90 times in these five scenarios
    # (after a chunk cut mid-message the Python session keeps the stream until the
    # client waits for its answers).
    armed = sum(run_interleaved(seed, "relay")[4] for seed in range(5))
    assert armed > 70


@pytest.mark.parametrize("fast", [True, "relay"])
def test_the_fast_path_takes_most_of_a_plain_workload(fast: bool | str) -> None:
    # Guards against the fast path silently never engaging (the test above would pass).
    handled = sum(run(seed, fast=fast)[4] for seed in range(5))
    assert handled > 40


def test_fast_path_audit_lines_are_json_with_control_characters_escaped() -> None:
    records: list[bytes] = []
    s, up = new_session(True, records)
    sql = "SELECT 1,\n\t2 AS x\r\f"
    for _ in range(2):  # the first one teaches the session the shape
        feed(s, codec.encode_query(sql))
        feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert s.fast.pending == 0
    records = collect(s, records)
    lines = [orjson.loads(r) for r in records]  # intent, record; intent, record
    assert [(r["kind"], r["statement"], r["n"]) for r in lines] == [
        ("intent", sql, 2), ("statement", sql, 2), ("intent", sql, 1), ("statement", sql, 1)]
    assert [r["rows"] for r in lines if r["kind"] == "statement"] == [1, 1]
    python_line, fast_line = lines[1], lines[3]
    assert python_line["at"] <= fast_line["at"] <= time.time()
    assert 0 <= fast_line["duration_ms"] < 60_000
    assert records[2].count(b"\\r\\f") == records[3].count(b"\\r\\f") == 1  # escaped in C


def test_fast_path_audit_lines_hold_the_schema_s_fields_as_python_writes_them() -> None:
    """The compiled path spells no field name: its lines are made of the prefix, the
    decision fragments and FAST_AUDIT_LAYOUT, all built by keyturn.auditschema. Parse
    what it writes and hold it against the schema and against the Python path's lines."""
    records: list[bytes] = []
    s, up = new_session(True, records)
    for _ in range(2):  # Python (learns the shape), then compiled
        feed(s, codec.encode_query("SELECT 1 AS x"))
        feed(up, msg(b"T", struct.pack("!h", 1) + b"x\0" + b"\0" * 18)
             + msg(b"D", struct.pack("!hi", 1, 1) + b"1")
             + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    lines = [orjson.loads(r) for r in collect(s, records)]
    by_path = {(r["kind"], r["n"] % 2): r for r in lines}  # n: odd from C, even from Python
    assert sorted(by_path) == [("intent", 0), ("intent", 1), ("statement", 0),
                               ("statement", 1)]
    for kind in ("intent", "statement"):
        c_line, py_line = by_path[kind, 1], by_path[kind, 0]
        assert auditschema.check_line(c_line) == []
        assert set(c_line) == set(py_line)
        assert c_line["v"] == auditschema.VERSION and c_line["protocol"] == "postgres"
        assert {k for k in c_line if k not in auditschema.SPOOL_ONLY} <= \
            set(auditschema.FIELDS)
    done = by_path["statement", 1]
    assert (done["outcome"], done["rows"], done["statement"]) == ("ok", 1, "SELECT 1 AS x")
    # Only the schema's keys are in the C path's pieces; a key that is not a field is refused.
    for piece in FAST_AUDIT_LAYOUT:
        for name in re.findall(rb'"([a-z_]+)":', piece):
            assert name.decode() in auditschema.BY_NAME or name.decode() in \
                auditschema.SPOOL_ONLY
    with pytest.raises(KeyError):
        auditschema.key("statment")
    with pytest.raises(ValueError):
        compiled.FastPath(s, {}, {}, {}, s.transport.write, up.transport.write, records.append,
                          s._audit_prefix_bytes(), FAST_AUDIT_LAYOUT[:-1], MAX_SHAPED_TEXT)


ascii_sql = st.lists(st.sampled_from(list("0123456789.$_aZe -/*'\"\\\x00\n(),=;") + ["1e5", "x1"]),
                     max_size=30).map("".join)


@settings(max_examples=2000, deadline=None)
@given(sql=st.one_of(ascii_sql, st.text(max_size=20)))
def test_compiled_fast_shape_equals_the_regular_expressions(sql: str) -> None:
    assert compiled.fast_shape(sql, MAX_SHAPED_TEXT) == fast_shape(sql)


def test_fast_shape_examples() -> None:
    for sql, shape in [("SELECT 12 FROM t1 WHERE a = 3.5", "SELECT 0 FROM t1 WHERE a = 0"),
                       ("x.1 1. 1.2.3 1e5 a1 _1 9", "x.1 1. 1.2.3 1e5 a1 _1 0"), ("$1", None),
                       ("SELECT '1'", None), ("-- 1", None), ("/* 1 */", None),
                       ("SELECT ٣", None)]:
        assert compiled.fast_shape(sql, MAX_SHAPED_TEXT) == shape == fast_shape(sql)
    assert compiled.fast_shape("1" * 20, 10) is None
    assert re.fullmatch(r"0", compiled.fast_shape("123", 10))


def _hostile(fast: bool | str, client: list[bytes], answer: bytes) -> tuple:
    records: list[bytes] = []
    s, up = new_session(fast, records)
    assert s.transport is not None
    bind = msg(b"B", b"\0s1\0" + struct.pack("!hhi", 0, 1, 1) + b"1" + struct.pack("!h", 0))
    # Teach the session the statement and the query shape (Python path), then go on.
    feed(s, codec.encode_parse("s1", "SELECT v FROM acc WHERE id = $1") + bind
         + codec.encode_execute("", 0) + codec.encode_sync())
    feed(up, msg(b"1", b"") + msg(b"2", b"") + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    feed(s, codec.encode_query("SELECT 1 AS a"))
    feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    start = len(s.transport.data)
    feed(s, b"".join(client))  # one chunk, as clients send a batch
    if fast:
        assert s.fast.pending, "the fast path took the client's messages"
    error = None
    try:
        feed(up, answer)
    except Exception as exc:  # noqa: BLE001 - compared between the two paths
        error = type(exc)
    recs = audit_records(s, records, drop=("at", "duration_ms", "session_id"))
    return bytes(s.transport.data[start:]), recs, s.tx_status, s.closed, error


HUGE = b"SELECT 10000000000000009\0"
CASES = {
    "huge row count, query": ([codec.encode_query("SELECT 2 AS a")],
                              msg(b"C", HUGE) + msg(b"Z", b"I")),
    "huge row count, execute": ([msg(b"B", b"\0s1\0" + struct.pack("!hhi", 0, 1, 1) + b"2"
                                     + struct.pack("!h", 0)), codec.encode_execute("", 0),
                                 codec.encode_sync()],
                                msg(b"2", b"") + msg(b"C", b"SELECT 99999999999999999999\0")
                                + msg(b"Z", b"T")),
    "several tags for one query": ([codec.encode_query("SELECT 3 AS a")],
                                   msg(b"C", b"SELECT 1\0") * 3 + msg(b"Z", b"I")),
    "odd transaction status": ([codec.encode_query("SELECT 4 AS a")],
                               msg(b"C", b"SELECT 1\0") + msg(b"Z", b"X")),
    "empty CommandComplete": ([codec.encode_query("SELECT 5 AS a")],
                              b"C\0\0\0\x04" + msg(b"Z", b"I")),
    "tag without terminator": ([codec.encode_query("SELECT 6 AS a")],
                               msg(b"C", b"SELECT 1") + msg(b"Z", b"I")),
    "bytes after the tag": ([codec.encode_query("SELECT 7 AS a")],
                            msg(b"C", b"SELECT 1\0x") + msg(b"Z", b"I")),
    "tag not UTF-8": ([codec.encode_query("SELECT 8 AS a")],
                      msg(b"C", b"S\xa8LECT 1\0") + msg(b"Z", b"I")),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fast", [True, "relay"])
def test_odd_or_hostile_answers_are_handled_exactly_like_the_python_session(
        case: str, fast: bool | str) -> None:
    client, answer = CASES[case]
    assert _hostile(fast, client, answer) == _hostile(False, client, answer)


def _learned_relay_session() -> tuple[ClientSession, Upstream, list[str]]:
    """A session with relays whose Python entry points count their calls."""
    records: list[bytes] = []
    s, up = new_session("relay", records)
    calls: list[str] = []
    py_client, py_server = s.data_received, up.data_received
    s.data_received = lambda *a: (calls.append("client"), py_client(*a))[1]  # type: ignore[method-assign]
    up.data_received = lambda *a: (calls.append("server"), py_server(*a))[1]  # type: ignore[method-assign]
    inside(s, s._install_relays)  # the relays call the counting entry points
    return s, up, calls


def test_relays_keep_the_common_case_out_of_python() -> None:
    s, up, calls = _learned_relay_session()
    answer = (msg(b"T", struct.pack("!h", 1) + b"x\0" + b"\0" * 18)
              + msg(b"D", struct.pack("!hi", 1, 1) + b"7") + msg(b"C", b"SELECT 1\0")
              + msg(b"Z", b"I"))
    for i in range(100):
        feed(s, codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {i};"))
        feed(up, answer)
    # The first query teaches the session its shape (Python both ways), the second one
    # arms the relays through the session; then none.
    assert calls == ["client", "server", "client"]
    assert s.transport is not None and bytes(s.transport.data).count(answer) == 100
    assert s.fast.armed and s.fast.pending == 0
    # An async notice from the target while nothing is pending goes to Python and
    # disarms; the next query re-arms through the session.
    feed(up, msg(b"S", b"application_name\0x\0"))
    assert calls[-1] == "server" and not s.fast.armed
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 5;"))
    assert calls[-1] == "client" and s.fast.armed


def _simple_update(s: ClientSession, up: Upstream, target: Target, i: int) -> None:
    for sql in ("BEGIN;", f"UPDATE hist SET v = v + {i} WHERE id = {i};",
                f"SELECT abalance FROM acc WHERE aid = {i};",
                f"INSERT INTO hist (id, v) VALUES ({i}, {i});", "END;"):
        assert up.transport is not None
        sent = len(up.transport.data)
        feed(s, codec.encode_query(sql))
        feed(up, target.feed(bytes(up.transport.data[sent:])))


def test_a_write_transaction_stays_out_of_python_once_learned() -> None:
    # pgbench's simple-update: BEGIN, a write, a read inside the transaction (the
    # read-only guard's savepoint before it), a write (the savepoint released first),
    # END. Once each statement's shape is known, the compiled path sends the guard's
    # statements with them and hides their answers, as the Python session does.
    s, up, calls = _learned_relay_session()
    target = Target(random.Random(7), notices=0)
    _simple_update(s, up, target, 1)  # learnt (Python)
    _simple_update(s, up, target, 2)
    before = len(calls)
    for i in range(3, 30):
        _simple_update(s, up, target, i)
    assert calls[before:] == [], calls[before:]
    assert s.tx_status == "I" and not s.txs.block and s.fast.pending == 0
    sent = bytes(up.transport.data)  # type: ignore[union-attr]
    assert sent.count(b"SAVEPOINT keyturn_ro\n;\nSET LOCAL transaction_read_only = on\n;\n"
                      b"SELECT abalance FROM acc WHERE aid = 29\0") == 1
    assert sent.count(b"RELEASE SAVEPOINT keyturn_ro\n;\nINSERT INTO hist") == 29
    assert sent.count(b"BEGIN\n;\nSET TRANSACTION READ WRITE\0") == 29
    shown = bytes(s.transport.data)  # type: ignore[union-attr]
    assert b"SAVEPOINT\0" not in shown and b"RELEASE\0" not in shown
    assert shown.count(b"\nBEGIN\0Z") == 29 and shown.count(b"UPDATE 1\0") == 29


def _prepared_update(s: ClientSession, up: Upstream, target: Target, i: int,
                     first: bool = False, name: str | None = None) -> None:
    """pgbench -M prepared's simple-update: each statement prepared once, then Bind,
    Describe, Execute, Sync with its parameters as text (``name`` "": -M extended's,
    every statement parsed into the unnamed statement each time)."""
    texts = ("BEGIN", "UPDATE hist SET v = v + $1 WHERE id = $2",
             "SELECT abalance FROM acc WHERE aid = $1",
             "INSERT INTO hist (id, v) VALUES ($1, $2)", "END")
    params = ((), (b"%d" % i, b"%d" % i), (b"%d" % i,), (b"%d" % i, b"-%d" % i), ())
    for k, (sql, values) in enumerate(zip(texts, params, strict=True)):
        assert up.transport is not None
        sent = len(up.transport.data)
        stmt = f"P0_{k}" if name is None else name
        data = codec.encode_parse(stmt, sql) if first else b""
        data += (codec.encode_bind("", stmt, params=list(values))
                 + codec.encode_describe("P", "") + codec.encode_execute("", 0)
                 + codec.encode_sync())
        feed(s, data)
        feed(up, target.feed(bytes(up.transport.data[sent:])))


def test_an_extended_write_transaction_stays_out_of_python_once_learned() -> None:
    # pgbench -M extended: every statement parsed again into the unnamed statement.
    s, up, calls = _learned_relay_session()
    target = Target(random.Random(6), notices=0)
    for i in range(1, 3):
        _prepared_update(s, up, target, i, first=True, name="")
    before = len(calls)
    for i in range(3, 20):
        _prepared_update(s, up, target, i, first=True, name="")
    assert calls[before:] == [], calls[before:]
    assert s.tx_status == "I" and not s.txs.block and s.fast.pending == 0
    shown = bytes(s.transport.data)  # type: ignore[union-attr]
    assert shown.count(b"UPDATE 1\0") == 19 and shown.count(b"INSERT 0 1\0") == 19


def test_an_extended_write_transaction_relays_and_audits_exactly_like_python() -> None:
    def play(s: ClientSession, up: Upstream, target: Target) -> None:
        for i in range(1, 14):
            _prepared_update(s, up, target, i, first=True, name="")

    out = _three_ways(13, 0.15, play)
    assert out[1] == out[0]
    assert out[2] == out[0]


def test_a_prepared_write_transaction_stays_out_of_python_once_learned() -> None:
    # The same in the extended protocol with prepared statements: the guard's own
    # statements (prepared once by the session) are bound and run around the Execute.
    s, up, calls = _learned_relay_session()
    target = Target(random.Random(5), notices=0)
    _prepared_update(s, up, target, 1, first=True)
    _prepared_update(s, up, target, 2)
    before = len(calls)
    for i in range(3, 20):
        _prepared_update(s, up, target, i)
    assert s.tx_status == "I" and not s.txs.block and s.fast.pending == 0
    # BEGIN (with the guard's write access after it), the statements inside the
    # transaction and END: none of them enters Python.
    assert calls[before:] == [], calls[before:]
    sent = bytes(up.transport.data)  # type: ignore[union-attr]
    assert sent.count(b"keyturn_savepoint") >= 19 and sent.count(b"keyturn_release") >= 19
    shown = bytes(s.transport.data)  # type: ignore[union-attr]
    assert b"SAVEPOINT\0" not in shown and b"RELEASE\0" not in shown
    assert shown.count(b"UPDATE 1\0") == 19 and shown.count(b"INSERT 0 1\0") == 19


def _three_ways(seed: int, notices: float, play: Any) -> list[tuple[Any, ...]]:
    """``play(session, upstream, target)`` with the Python session alone, the fast path
    fed by it, and the compiled relays: what each sent both ways, audited, and left."""
    out = []
    for fast in (False, True, "relay"):
        records: list[bytes] = []
        s, up = new_session(fast, records)
        play(s, up, Target(random.Random(seed), notices=notices))
        out.append((bytes(up.transport.data), bytes(s.transport.data),  # type: ignore[union-attr]
                    audit_records(s, records), s.tx_status, s.txs))
    assert out[0][2], "the scenario audited statements"
    return out


def test_a_prepared_write_transaction_relays_and_audits_exactly_like_python() -> None:
    def play(s: ClientSession, up: Upstream, target: Target) -> None:
        for i in range(1, 14):
            _prepared_update(s, up, target, i, first=i == 1)

    out = _three_ways(11, 0.15, play)
    assert out[1] == out[0]
    assert out[2] == out[0]


def test_a_read_pipelined_after_a_guarded_write_gets_the_savepoint_again() -> None:
    """Inside a transaction whose read-only savepoint is open, one chunk holds a prepared
    write (the guard releases the savepoint before it) and then a read: the read meets
    the guard as the write left it and runs in a new read-only savepoint, whichever path
    takes the chunk (the fast path once judged it by the state the chunk started in)."""
    def one(s: ClientSession, up: Upstream, target: Target, data: bytes) -> None:
        assert up.transport is not None
        sent = len(up.transport.data)
        feed(s, data)
        feed(up, target.feed(bytes(up.transport.data[sent:])))

    def run_stmt(stmt: str, *values: bytes) -> bytes:
        return (codec.encode_bind("", stmt, params=list(values))
                + codec.encode_describe("P", "") + codec.encode_execute("", 0)
                + codec.encode_sync())

    learned: list[int] = []

    def play(s: ClientSession, up: Upstream, target: Target) -> None:
        for i in (1, 2):
            _prepared_update(s, up, target, i, first=i == 1)
        assert up.transport is not None
        learned.append(len(up.transport.data))
        for i in (3, 4):
            one(s, up, target, run_stmt("P0_0"))  # BEGIN
            one(s, up, target, run_stmt("P0_2", b"%d" % i))  # a read: savepoint open
            one(s, up, target, run_stmt("P0_1", b"%d" % i, b"%d" % i)
                + run_stmt("P0_2", b"%d" % i))  # a write, then a read, in one chunk
            one(s, up, target, run_stmt("P0_4"))  # END

    out = _three_ways(17, 0.0, play)
    tail = out[0][0][learned[0]:]
    # Each transaction: the first read opens the savepoint, the write releases it, the
    # read after the write opens it again.
    assert tail.count(b"keyturn_savepoint") == 4 and tail.count(b"keyturn_release") == 2
    assert out[1] == out[0]
    assert out[2] == out[0]


def test_a_write_transaction_relays_and_audits_exactly_like_the_python_session() -> None:
    def play(s: ClientSession, up: Upstream, target: Target) -> None:
        for i in range(1, 12):
            _simple_update(s, up, target, i)
            if i % 4 == 0:  # a failure inside the transaction, then its ROLLBACK
                for sql in ("BEGIN", f"UPDATE hist SET v = v / 0 WHERE id = {i} -- fail",
                            f"SELECT abalance FROM acc WHERE aid = {i};", "ROLLBACK"):
                    sent = len(up.transport.data)  # type: ignore[union-attr]
                    feed(s, codec.encode_query(sql))
                    feed(up, target.feed(bytes(up.transport.data[sent:])))  # type: ignore[union-attr]

    out = _three_ways(3, 0.2, play)
    assert out[1] == out[0]
    assert out[2] == out[0]


def test_a_parameterised_query_stays_out_of_python_from_its_second_run() -> None:
    # What psycopg, JDBC, pgx and node-postgres send for a query with parameters:
    # Parse of the unnamed statement, Bind, Describe, Execute, Sync, every time.
    s, up, calls = _learned_relay_session()
    answer = (msg(b"1", b"") + msg(b"2", b"") + msg(b"T", struct.pack("!h", 1) + b"v\0"
              + b"\0" * 18) + msg(b"D", struct.pack("!hi", 1, 1) + b"7")
              + msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))

    def query(sql: str, value: bytes, types: tuple[int, ...] = ()) -> bytes:
        return b"".join([codec.encode_parse("", sql, types),
                         codec.encode_bind("", "", params=[value]),
                         codec.encode_describe("P", ""), codec.encode_execute("", 0),
                         codec.encode_sync()])

    for i in range(50):
        feed(s, query("SELECT v FROM acc WHERE id = $1", str(i).encode()))
        feed(up, answer)
    assert calls == ["client", "server", "client"]
    assert s.fast.armed and s.fast.pending == 0
    assert "" in s.stmts and s.stmts[""].sql == "SELECT v FROM acc WHERE id = $1"
    # Another text, or the same text with declared parameter types, is judged by the
    # session first (the memo is keyed by the whole Parse body).
    feed(s, query("SELECT v FROM acc WHERE id = $1", b"1", (23,)))
    assert calls[-1] == "client" and s.stmts[""].param_types == (23,)
    feed(up, answer)
    # What a name means may change (search_path, the catalog, the policy): the memo goes.
    inside(s, s.forget_verdicts)
    assert not s.fast_parses
    n = len(calls)
    feed(s, query("SELECT v FROM acc WHERE id = $1", b"2"))
    assert calls[n:] == ["client"]
    feed(up, answer)
    # A statement that is not allowed is never taken by the fast path, whatever came
    # before it under the same name.
    n = len(calls)
    feed(s, query("DELETE FROM acc WHERE id = $1", b"1"))
    assert calls[n:] == ["client"]
    records = [orjson.loads(line) for line in _PLAYBOOKS[id(s)].records()]
    assert [r["outcome"] for r in records if r["kind"] == "statement"
            and r["statement"].startswith("DELETE")] == ["blocked"]
    assert sum(r["kind"] == "statement" and r["statement"] == "SELECT v FROM acc WHERE "
               "id = $1" and r["outcome"] == "ok" for r in records) == 52


def test_a_closed_target_disarms_the_client_relay() -> None:
    s, up, calls = _learned_relay_session()
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 1;"))
    feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 2;"))
    feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert s.fast.armed
    assert up.transport is not None
    sent = len(up.transport.data)
    inside(s, up.close)
    assert not s.fast.armed
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 3;"))
    assert calls[-1] == "client", "the session, not the fast path, saw the query"
    assert len(up.transport.data) == sent, "nothing was written to the closed target"


def test_an_error_inside_a_relay_ends_only_that_session() -> None:
    s, up, calls = _learned_relay_session()
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 1;"))
    feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))

    writes: list[bytes] = []

    def broken(data: bytes) -> None:
        if writes:
            raise RuntimeError("socket gone")
        writes.append(data)

    # The fast path holds the transport's write; make the next write fail.
    assert s.transport is not None
    s.fast = compiled.FastPath(s, s.fast_verdicts, s.fast_stmts, s.portals, s.transport.write,
                               broken, s.gw.audit_spool.write_line, s._audit_prefix_bytes(),
                               FAST_AUDIT_LAYOUT, MAX_SHAPED_TEXT, s._intent_prefix_bytes())
    inside(s, s._install_relays)
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 2;"))  # arms
    assert s.fast.armed and not s.closed
    n = len(calls)
    feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 3;"))  # must not raise
    assert len(calls) == n, "the relay itself met the error"
    assert s.closed
    assert b"XX000" in bytes(s.transport.data)


def test_relay_events_disarm_and_reach_the_python_protocol() -> None:
    s, up, calls = _learned_relay_session()
    assert s.transport is not None and up.transport is not None
    seen: list[str] = []
    s.pause_writing = lambda: seen.append("client pause")  # type: ignore[method-assign]
    up.resume_writing = lambda: seen.append("target resume")  # type: ignore[method-assign]
    s.eof_received = lambda: seen.append("client eof") or True  # type: ignore[method-assign]
    for event, relay, args in [("pause_writing", s.transport.protocol, ()),
                               ("resume_writing", up.transport.protocol, ()),
                               ("eof_received", s.transport.protocol, ())]:
        for i in range(2):  # arm through the session, then by the relay itself
            feed(s, codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {i};"))
            feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
        assert s.fast.armed
        result = inside(s, getattr(relay, event), *args)
        assert not s.fast.armed, event
        if event == "eof_received":
            assert result is True, "the protocol's answer goes back to the transport"
    assert seen == ["client pause", "target resume", "client eof"]
    relay = s.transport.protocol
    assert relay.owner is s


def test_a_declined_chunk_is_not_offered_to_the_fast_path_twice() -> None:
    s, up, calls = _learned_relay_session()
    for i in range(2):
        feed(s, codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {i};"))
        feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I"))
    assert s.fast.armed
    offered: list[bytes] = []
    real = s.fast

    class Counting:  # the session's view of the fast path, counting what it is offered
        pending = property(lambda self: real.pending)

        def client(self, data: bytes) -> bool:
            offered.append(data)
            return bool(real.client(data))

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    s.fast = Counting()
    feed(s, codec.encode_parse("s2", "SELECT 2") + codec.encode_sync())  # the relay declines
    assert calls[-1] == "client" and offered == []
    s.fast = real


@pytest.mark.parametrize("fast", [True, "relay"])
def test_a_message_the_target_left_half_sent_keeps_the_fast_path_away(
        fast: bool | str) -> None:
    """The target's half-sent message (here a notice whose body happens to look like
    CommandComplete + ReadyForQuery) must be completed by the Python session before the
    fast path may read the target again; otherwise the rest of it would be taken for
    the answer to the next query."""
    body = msg(b"C", b"SELECT 9\0") + msg(b"Z", b"I")
    notice_head = b"N" + struct.pack("!i", 4 + len(body))
    answer = msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")

    def scenario(mode: bool | str) -> tuple:
        records: list[bytes] = []
        s, up = new_session(mode, records)
        assert s.transport is not None
        for i in range(2):  # learn the shape, arm
            feed(s, codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {i};"))
            feed(up, answer)
        feed(up, notice_head)  # half a message, nothing pending
        feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 7;"))
        feed(up, body)  # the rest of the notice,
        feed(up, answer)  # then the real answer
        recs = audit_records(s, records, drop=("at", "duration_ms", "session_id"))
        return bytes(s.transport.data), recs, s.tx_status

    expected = scenario(False)
    assert expected[0].count(notice_head + body) == 1
    assert scenario(fast) == expected


@pytest.mark.parametrize("fast", [True, "relay"])
def test_a_transaction_status_the_guard_did_not_take_in_keeps_the_fast_path_away(
        fast: bool | str) -> None:
    """The target reports a transaction the session did not see open ('T') in a
    ReadyForQuery that does not end the queue (a Parse pipelined behind the Query,
    completed by its ParseComplete alone): the read-only guard takes the status in only
    at the next ReadyForQuery that ends the queue, which the fast path must then leave
    to the Python session, so that the reads after it run in the read-only savepoint."""
    answer = msg(b"C", b"SELECT 1\0") + msg(b"Z", b"I")

    def scenario(mode: bool | str) -> tuple:
        records: list[bytes] = []
        s, up = new_session(mode, records)
        assert s.transport is not None and up.transport is not None
        for i in range(2):  # learn the shape, arm
            feed(s, codec.encode_query(f"SELECT abalance FROM acc WHERE aid = {i};"))
            feed(up, answer)
        feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 2;")
             + codec.encode_parse("s2", "SELECT v FROM acc WHERE id = $1"))
        feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"T") + msg(b"1", b""))
        feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 3;"))
        feed(up, msg(b"C", b"SELECT 1\0") + msg(b"Z", b"T"))  # this one ends the queue
        feed(s, codec.encode_query("SELECT abalance FROM acc WHERE aid = 4;"))
        recs = audit_records(s, records, drop=("at", "duration_ms", "session_id"))
        return bytes(up.transport.data), bytes(s.transport.data), recs, s.tx_status

    expected = scenario(False)
    assert expected[0].count(b"SAVEPOINT keyturn_ro") == 1
    assert scenario(fast) == expected
