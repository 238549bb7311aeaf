"""The session's ordering of responses, driven message by message without sockets:
the client's messages and the target's answers interleaved exactly as a race on the
network can interleave them."""

from __future__ import annotations

import struct
import tempfile
from types import SimpleNamespace

import pytest

from keyturn.analysis import PreparedStatements
from keyturn.analysis.pgcatalog import TargetCatalog
from keyturn.auditspool import AuditSpool
from keyturn.config import parse_config
from keyturn.policy import PolicyEngine
from proxies.postgres import codec
from proxies.postgres.catalog import Catalogs
from proxies.postgres.gateway import PostgresGateway
from proxies.postgres.session import ClientSession
from proxies.postgres.upstream import Upstream

CONFIG = """
identity: {users: {alice: {groups: [eng]}}}
connections:
  - {name: db, type: postgres, target: {host: 127.0.0.1, port: 5432}, policy: p}
policies:
  p:
    default: block
    rules:
      - {name: reads, match: {class: [read, transaction, session]}, action: allow}
"""


class Wire:
    def __init__(self) -> None:
        self.data = b""

    def write(self, d: bytes) -> None:
        self.data += d

    def get_extra_info(self, _key: str) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def close(self) -> None:
        pass

    def types(self) -> list[str]:
        r = codec.BackendReader()
        r.receive_data(self.data)
        self.data = b""
        return [m.type.decode() for m in r.next_messages()]


@pytest.fixture()
def session():  # type: ignore[no-untyped-def]
    cfg = parse_config(CONFIG)
    spool = AuditSpool(tempfile.mkdtemp())
    gw = SimpleNamespace(config=cfg, policy=PolicyEngine(cfg), audit_spool=spool,
                         _analyzers={}, audit=lambda **k: None)
    gw.analyzer = lambda conn: PostgresGateway.analyzer(gw, conn)  # type: ignore[arg-type]
    gw.active = set()
    gw.catalogs = Catalogs(gw, read=None)  # type: ignore[arg-type]
    gw.catalogs.put(cfg.connections["db"], TargetCatalog.from_rows(user="app", search_path=None))
    s = ClientSession(gw)  # type: ignore[arg-type]
    client = Wire()
    s.connection_made(client)  # type: ignore[arg-type]
    s.phase = "ready"
    s.reader.start_typed()
    s.user, s.conn = "alice", cfg.connections["db"]
    s.analyzer = gw.analyzer(s.conn)
    s.identity = SimpleNamespace(user="alice", groups=("eng",))
    s.prepared = PreparedStatements()
    up = Upstream(s, s.conn)
    target = Wire()
    up.connection_made(target)  # type: ignore[arg-type]
    up.ready = True
    s.upstream = up
    yield s, client, target, up
    spool.close()


def msg(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def extended(sql: str) -> bytes:
    return (codec.encode_parse("", sql) + codec.encode_bind("", "") +
            codec.encode_describe("P", "") + codec.encode_execute("", 0))


ERROR = codec.encode_error("ERROR", "22012", "division by zero")


def test_target_error_before_the_rest_of_the_batch_arrives(session) -> None:  # type: ignore[no-untyped-def]
    s, client, target, up = session
    s.data_received(extended("SELECT 1/0"))          # first part of a pipeline
    up.data_received(msg(b"1") + ERROR)               # the target fails at Bind, at once
    s.data_received(extended("DROP TABLE t") + codec.encode_sync())  # blocked, then Sync
    up.data_received(msg(b"Z", b"I"))                 # the target skipped to the Sync
    # As from PostgreSQL itself: the first error, then ReadyForQuery (the refused DROP
    # came after the error, so it was skipped like the rest of the batch).
    assert client.types() == ["1", "E", "Z"]
    # And the session is in step: the next query is answered normally.
    s.data_received(codec.encode_query("SELECT 42"))
    up.data_received(msg(b"T", struct.pack("!h", 0)) + msg(b"C", b"SELECT 1\0") +
                     msg(b"Z", b"I"))
    assert client.types() == ["T", "C", "Z"]
    assert not s.expect


def test_refused_execute_before_sync_answers_like_an_error(session) -> None:  # type: ignore[no-untyped-def]
    s, client, target, up = session
    s.data_received(extended("SELECT 1") + extended("DROP TABLE t") + codec.encode_sync())
    # The target answers the first query, the forwarded Parse/Bind/Describe of the second,
    # then fails the gateway's own failing statement at Parse and skips to the Sync.
    up.data_received(msg(b"1") + msg(b"2") + msg(b"T", struct.pack("!h", 0)) +
                     msg(b"C", b"SELECT 1\0") + msg(b"1") + msg(b"2") + msg(b"n") +
                     codec.encode_error("ERROR", "22P02", "invalid input syntax") +
                     msg(b"Z", b"I"))
    types = client.types()
    assert types == ["1", "2", "T", "C", "1", "2", "n", "E", "Z"]
    assert not s.expect
