"""Test session fixtures: real PostgreSQL servers and a real Keyturn process.

Nothing here may depend on a server a person started: the session starts a
throwaway PostgreSQL cluster (keyturn.launch.localpg) and runs ``keyturn up`` as a
subprocess with its own config, store and free ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.installed import install
from keyturn.launch.localpg import LocalPostgres

# The test session is a launcher too: every protocol's and edge's registration is in
# place before any test reads a config (docs/configuration.md, "How protocols register").
install()

ROOT = Path(__file__).resolve().parent.parent
KEYTURN = [sys.executable, "-m", "keyturn.launch"]
# Processes the tests start (the gateway, the CLI) run this checkout's code, whichever
# checkout the virtualenv was installed from.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
APP_PASSWORD = "app-secret-Zx81"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in this test session (the kernel
    may hand a just-released port out again, and two listeners of one config would
    then collide)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    server = LocalPostgres(tmp_path_factory.mktemp("pg"), auth="scram-sha-256")
    server.start()
    server.create_role("app", APP_PASSWORD, password_encryption="scram-sha-256")
    server.create_database("shop", owner="app")
    server.execute(textwrap.dedent("""
        CREATE TABLE customers (id serial PRIMARY KEY, name text, email text, ssn text);
        INSERT INTO customers (name, email, ssn)
          SELECT 'name ' || g, 'user' || g || '@example.com', '123-45-' || lpad(g::text, 4, '0')
          FROM generate_series(1, 50) g;
        CREATE TABLE orders (id serial PRIMARY KEY, customer_id int, status text, total numeric);
        INSERT INTO orders (customer_id, status, total)
          SELECT g % 50 + 1, CASE WHEN g % 5 = 0 THEN 'cancelled' ELSE 'paid' END, g
          FROM generate_series(1, 200) g;
        ALTER TABLE customers OWNER TO app; ALTER TABLE orders OWNER TO app;
    """), dbname="shop")
    server.create_database("bench", owner="app")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1",
                    server.dsn("bench", user="app", password=APP_PASSWORD)],
                   check=True, capture_output=True)
    yield server
    server.stop()


POLICY = """
policies:
  readonly:
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
  shop:
    default: block
    rules:
      - name: no-file-access
        match: {class: [file, admin, privilege, procedural, unknown]}
        action: block
      - name: no-ddl
        match: {class: ddl}
        action: block
        reason: schema changes go through migrations
      - name: vault-is-off-limits
        match: {tables: ["vault.*"]}
        action: block
        reason: the vault schema holds secrets
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
      - name: deferred-inserts
        match: {class: write, tables: ["public.audit_requests"]}
        action: review
        review: {approvers: [approvers], timeout: 10m, mode: defer}
      - name: two-person-truncate
        match: {class: write, tables: ["public.big_*"]}
        action: review
        review: {approvers: [approvers], min_approvals: 2, timeout: 10m}
      - name: writes-need-approval
        match: {class: write}
        action: review
        reason: data changes need a second pair of eyes
        review: {approvers: [approvers], min_approvals: 1, timeout: %(timeout)s}
"""


MASK_POLICY = """
  masked:
    default: block
    rules:
      - name: masked-no-changes
        match: {class: [ddl, file, admin, privilege, procedural, unknown]}
        action: block
      - name: erin-writes-masked
        match: {users: [erin], class: write}
        action: allow
        mask:
          tags: ["pii.*", "pci.*"]
          writes: {review: {approvers: [approvers], timeout: 10m}}
      - name: masked-writes-reviewed
        match: {class: write}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: auditors-see-partial
        match: {groups: [auditors], class: [read, transaction, session]}
        action: mask
        mask: {tags: ["pii.*", "pci.*"], style: "partial:4"}
      - name: masked-reads
        match: {class: [read, transaction, session]}
        action: mask
        mask:
          tags: ["pii.*", "pci.*"]
          style: full
          styles: {pii.email: email, pci.card: "partial:4", pii.name: hash}
          groups: {approvers: "null"}
"""


@dataclass
class Keyturn:
    """A running ``keyturn up`` process and what it takes to talk to it."""

    base: Path
    config: Path
    gateway_port: int
    portal_port: int
    pg: LocalPostgres
    proc: subprocess.Popen | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    last_ticket: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.portal_port}"

    def cli(self, *args: str, token_of: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, **self.env)
        if token_of:
            env["KEYTURN_TOKEN"] = self.tokens[token_of]
        res = subprocess.run([*KEYTURN, "-c", str(self.config), *args], capture_output=True,
                             text=True, env=env, timeout=timeout, cwd=self.base)
        if check and res.returncode != 0:
            raise AssertionError(f"keyturn {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def dsn(self, user: str, *, sslmode: str = "disable", dbname: str = "shop") -> str:
        return (f"host=127.0.0.1 port={self.gateway_port} dbname={dbname} user={user} "
                f"password={self.tokens[user]} sslmode={sslmode}")

    def psql(self, user: str, sql: str, *, sslmode: str = "disable",
             **popen: object) -> subprocess.Popen[str]:
        env = dict(os.environ, PGCONNECT_TIMEOUT="10")
        return subprocess.Popen(
            ["psql", self.dsn(user, sslmode=sslmode), "-X", "-v", "ON_ERROR_STOP=1", "-At",
             "-c", sql], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            **popen)  # type: ignore[call-overload]

    def start(self) -> None:
        log = open(self.base / "keyturn.log", "w")
        self.proc = subprocess.Popen([*KEYTURN, "-c", str(self.config), "up"], cwd=self.base,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **self.env))
        wait_port(self.gateway_port, proc=self.proc)
        wait_port(self.portal_port, proc=self.proc)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
        finally:
            self.proc = None

    def skip_pending(self) -> None:
        """Forget tickets left pending so far (later waits only see newer ones)."""
        import requests

        r = requests.get(f"{self.url}/api/v1/tickets?limit=1",
                         headers={"Authorization": f"Bearer {self.tokens['bob']}"}, timeout=5)
        self.last_ticket = max([self.last_ticket] + [t["id"] for t in r.json()["tickets"]])

    def log(self) -> str:
        return (self.base / "keyturn.log").read_text()

    def wait_ticket(self, status: str = "pending", *, user: str = "bob",
                    timeout: float = 20) -> dict:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(f"{self.url}/api/v1/tickets?status={status}",
                             headers={"Authorization": f"Bearer {self.tokens[user]}"}, timeout=5)
            # Only a ticket newer than the last one a test waited for: earlier tests
            # may leave pending tickets behind (defer mode), which must not match.
            tickets = [t for t in r.json()["tickets"] if t["id"] > self.last_ticket]
            if tickets:
                self.last_ticket = max(t["id"] for t in tickets)
                return min(tickets, key=lambda t: t["id"])
            time.sleep(0.05)
        raise TimeoutError(f"no {status} ticket appeared\n{self.log()[-3000:]}")


def direct_shop(pg: LocalPostgres) -> psycopg.Connection:
    """A direct (not through the gateway) autocommit connection to the shop database."""
    return psycopg.connect(pg.dsn("shop", user="app", password=APP_PASSWORD), autocommit=True)


def make_keyturn(base: Path, pg: LocalPostgres, *, store_url_env: dict[str, str] | None = None,
                 timeout: str = "10m", extra: str = "", client_auth: str = "scram",
                 target_sslmode: str = "disable", shop_policy: str = "shop",
                 unknown_functions: str = "write", shop_db: str = "shop") -> Keyturn:
    """Write a config and create tokens; ``store_url_env`` = {VAR: url} uses a
    PostgreSQL store named by environment variable (never inline in the file);
    ``shop_db``: the database the ``shop`` connection reaches."""
    base.mkdir(parents=True, exist_ok=True)
    gport, pport = free_port(), free_port()
    (base / "app.password").write_text(APP_PASSWORD)
    from keyturn.tlsutil import ensure_self_signed

    ensure_self_signed(base / "gw.crt", base / "gw.key")
    cfg = textwrap.dedent(f"""
        store:
          {f'url_env: {next(iter(store_url_env))}' if store_url_env else 'url: sqlite:///keyturn.db'}
        gateway:
          postgres: 127.0.0.1:{gport}
          tls: {{cert_file: {base / 'gw.crt'}, key_file: {base / 'gw.key'}}}
          client_auth: {client_auth}
        portal:
          listen: 127.0.0.1:{pport}
        identity:
          users:
            alice: {{groups: [engineers]}}
            bob: {{groups: [approvers]}}
            dana: {{groups: [approvers]}}
            erin: {{groups: [approvers, engineers]}}
            carol: {{groups: [auditors]}}
        connections:
          - name: shop
            type: postgres
            target: {{host: 127.0.0.1, port: {pg.port}, dbname: {shop_db}, user: app,
                      password_file: {base / 'app.password'}, sslmode: {target_sslmode}}}
            policy: {shop_policy}
            unknown_functions: {unknown_functions}
          - name: bench
            type: postgres
            target: {{host: 127.0.0.1, port: {pg.port}, dbname: bench, user: app,
                      password_file: {base / 'app.password'}}}
            policy: readonly
          - name: shopmask
            type: postgres
            target: {{host: 127.0.0.1, port: {pg.port}, dbname: shop, user: app,
                      password_file: {base / 'app.password'}}}
            policy: masked
            unknown_functions: read   # so the masking itself must refuse opaque functions
            columns:
              public.people.email: [pii.email]
              public.people.ssn: [pii.ssn]
              public.people.card_number: [pci.card]
              public.people.full_name: [pii.name]
              hr.staff.ssn: [pii.ssn]
    """) + POLICY % {"timeout": timeout} + MASK_POLICY + extra
    path = base / "keyturn.yaml"
    path.write_text(cfg)
    kt = Keyturn(base, path, gport, pport, pg, env=dict(store_url_env or {}))
    kt.cli("db", "upgrade")
    for user in ("alice", "bob", "dana", "erin", "carol"):
        kt.tokens[user] = kt.cli("token", "create", "--user", user, "-q").stdout.strip()
    return kt


def keyturn_on_database(pg: LocalPostgres, base: Path, db: str, *, schema: str,
                        policies: str, connections: dict[str, str]) -> Keyturn:
    """A database of its own (owned by app, ``schema`` run in it as app) and a keyturn,
    not started, whose config also holds ``connections`` to it: name -> the lines after
    ``type``/``target`` (a policy, options), as YAML."""
    pg.create_database(db, owner="app")
    with psycopg.connect(pg.dsn(db, user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        c.execute(schema.encode())
    kt = make_keyturn(base, pg, extra=policies)
    target = (f"target: {{host: 127.0.0.1, port: {pg.port}, dbname: {db}, user: app, "
              f"password_file: {kt.base / 'app.password'}}}")
    items = "".join(f"  - name: {name}\n    type: postgres\n    {target}\n"
                    + textwrap.indent(textwrap.dedent(rest).strip(), "    ") + "\n"
                    for name, rest in connections.items())
    kt.config.write_text(kt.config.read_text().replace("connections:\n",
                                                       "connections:\n" + items, 1))
    return kt


@pytest.fixture(scope="module")
def keyturn(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    kt = make_keyturn(tmp_path_factory.mktemp("kt"), pg)
    kt.start()
    yield kt
    kt.stop()


@dataclass
class DemoRun:
    """A running ``keyturn demo``: its banner, ports, and (after it stopped) the rest of
    its output."""

    proc: subprocess.Popen[str]
    banner: str
    gateway_port: int
    portal_port: int
    rest: str = ""


@contextmanager
def running_demo(base: Path) -> Iterator[DemoRun]:
    """Start ``keyturn demo`` in ``base``, wait for its banner; Ctrl-C it on exit."""
    gport, pport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyturn.launch", "demo", "--dir", str(base / "demo"),
         "--port", str(gport), "--portal-port", str(pport)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = DemoRun(proc, "", gport, pport)
    try:
        wait_port(gport, timeout=60, proc=proc)
        deadline = time.monotonic() + 30
        while "Ctrl-C stops the demo" not in run.banner and time.monotonic() < deadline:
            run.banner += proc.stdout.readline()  # type: ignore[union-attr]
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        run.rest, _ = proc.communicate(timeout=60)
