"""A raw PostgreSQL protocol client for adversarial tests: psycopg logs in (SCRAM through
the gateway), then the test sends exactly the messages it wants, in the batches it wants,
and reads every answer."""

from __future__ import annotations

import socket
import struct
from typing import Any

import psycopg

from proxies.postgres import codec

Q, P, B, E, S = (codec.encode_query, codec.encode_parse, codec.encode_bind, codec.encode_execute,
                 codec.encode_sync)


def close_statement(name: str) -> bytes:
    return codec.encode_close("S", name)


def close_portal(name: str) -> bytes:
    return codec.encode_close("P", name)


class RawConn:
    """One logged-in connection driven message by message."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.sock = socket.socket(fileno=self.conn.pgconn.socket).dup()
        self.sock.settimeout(30)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()
        self.conn.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def _message(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!i", self.buf[1:5])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; buffered {self.buf!r}")
            self.buf += chunk
        n = 1 + struct.unpack("!i", self.buf[1:5])[0]
        t, body, self.buf = self.buf[:1], self.buf[5:n], self.buf[n:]
        return t, body

    def until_ready(self, count: int = 1) -> list[tuple[bytes, bytes]]:
        """Every message up to and including the ``count``-th ReadyForQuery."""
        out = []
        while count:
            t, body = self._message()
            out.append((t, body))
            if t == b"Z":
                count -= 1
        return out

    def until_closed(self) -> list[tuple[bytes, bytes]]:
        """Every message until the gateway closes the connection."""
        out = []
        while True:
            try:
                out.append(self._message())
            except (ConnectionError, OSError):
                return out

    def run(self, *messages: bytes, syncs: int | None = None) -> list[tuple[bytes, bytes]]:
        """Send ``messages`` and read to the ReadyForQuery of each Query / Sync in them."""
        self.send(*messages)
        n = syncs if syncs is not None else sum(1 for m in messages if m[:1] in (b"Q", b"S"))
        return self.until_ready(n)


def errors(answers: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [codec.decode_error_fields(body) for t, body in answers if t == b"E"]


def tags(answers: list[tuple[bytes, bytes]]) -> list[str]:
    return [codec.decode_command_complete(body) for t, body in answers if t == b"C"]


def status(answers: list[tuple[bytes, bytes]]) -> str:
    """The transaction status of the last ReadyForQuery."""
    return [chr(body[0]) for t, body in answers if t == b"Z"][-1]


# -- adversarial set-ups shared by the attack-run test files ---------------------------------

#: A function that runs any SQL it is given: user code the catalog cannot see into.
RB_RUN = """CREATE OR REPLACE FUNCTION public.rb_run(q text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN EXECUTE q; RETURN 'ok'; END$$;
"""


def vault_schema(vault: str) -> str:
    """rb_run, a public table ``open_data`` and a schema ``vault`` with a secret in
    ``vault.secrets`` (``leaked`` looks for it)."""
    return RB_RUN + f"""CREATE TABLE IF NOT EXISTS public.open_data (v text);
INSERT INTO public.open_data VALUES ('public value');
CREATE SCHEMA IF NOT EXISTS {vault};
CREATE TABLE IF NOT EXISTS {vault}.secrets (s text);
INSERT INTO {vault}.secrets VALUES ('top secret');
"""


def vault_policy(name: str, vaults: list[str], *rules: str, reads: str = "allow") -> str:
    """A policy (YAML under ``policies:``) that blocks every table of ``vaults`` first,
    then applies ``rules`` (YAML list items, indented as rules), then gives reads,
    transaction and session statements the action ``reads``; everything else is
    blocked."""
    globs = ", ".join(f'"{v}.*"' for v in vaults)
    return f"""
  {name}:
    default: block
    rules:
      - name: no-vault
        match: {{tables: [{globs}]}}
        action: block
{"".join(rules)}      - name: reads
        match: {{class: [read, transaction, session]}}
        action: {reads}
"""


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    """A row holding a secret reached the client."""
    return any(t == b"D" and b"secret" in body for t, body in answers)


def masked_policy(name: str, vaults: list[str], write_tables: list[str]) -> str:
    """``vault_policy`` whose reads are masked (tags pii.*, style full) and which allows
    writes to ``write_tables``."""
    tables = ", ".join(f'"{t}"' for t in write_tables)
    return vault_policy(name, vaults, f"""\
      - name: w
        match: {{class: [write], tables: [{tables}]}}
        action: allow
""", reads='mask\n        mask: {tags: ["pii.*"], style: full}')


FLUSH = codec.encode_message(b"H", b"")


def drain(r: RawConn, wait: float = 1.0) -> list[tuple[bytes, bytes]]:
    """Whatever arrives within ``wait`` seconds (up to the connection closing)."""
    out = []
    r.sock.settimeout(wait)
    try:
        while True:
            out.append(r._message())
    except (TimeoutError, ConnectionError, OSError):
        pass
    r.sock.settimeout(30)
    return out


def read_until(r: RawConn, kind: bytes, timeout: float = 10) -> list[tuple[bytes, bytes]]:
    """Every message up to and including the first of type ``kind``."""
    out = []
    r.sock.settimeout(timeout)
    while True:
        t, body = r._message()
        out.append((t, body))
        if t == kind:
            r.sock.settimeout(30)
            return out


def in_step(r: RawConn) -> None:
    """The client and the gateway agree on which answer is which: a query's own rows."""
    for word in ("alpha", "beta"):
        a = r.run(codec.encode_query(f"SELECT '{word}'::text"))
        rows = [body for t, body in a if t == b"D"]
        assert len(rows) == 1 and rows[0].endswith(word.encode()), a


def direct_on(dsn: str, sql: str) -> list[tuple] | str:
    """``sql`` run straight on the target (not through the gateway), in autocommit: its
    rows ([] for none), or the target's error as text ("target error: ...")."""
    with psycopg.connect(dsn, autocommit=True) as c:
        try:
            cur = c.execute(sql)
        except psycopg.Error as exc:
            return f"target error: {exc}"
        return cur.fetchall() if cur.description else []
