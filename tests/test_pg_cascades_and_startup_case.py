"""Code that runs where no statement names it: referential actions and startup settings.

A foreign key with ON DELETE / ON UPDATE CASCADE, SET NULL or SET DEFAULT makes a write
of one table write another: its triggers, defaults and checks run, and it is written as
much as if it were named, so table rules and user-code handling follow the cascade. And
the server matches setting names without regard to case: a startup parameter
SEARCH_PATH moves search_path like search_path does. From an independent attack run;
each test asserts the safe behaviour, through the live gateway and a real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import psycopg
import pytest
import requests

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import Q, RawConn, errors

DB = "atk19"

POLICIES = """
  atk19_ro:
    default: block
    rules:
      - name: no-vault19
        match: {tables: ["v19.*"]}
        action: block
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
  atk19_review:
    default: block
    rules:
      - name: writes-reviewed
        match: {class: write}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
  atk19_w:
    default: block
    rules:
      - name: no-vault19w
        match: {tables: ["v19.*"]}
        action: block
      - name: writes
        match: {class: write}
        action: allow
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
"""

SETUP = r"""
CREATE SCHEMA v19;
CREATE TABLE v19.secrets (s text);
INSERT INTO v19.secrets VALUES ('top secret 19');
CREATE OR REPLACE FUNCTION public.trg19() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.set_config('search_path', 'v19, public', false); RETURN OLD; END$$;
CREATE TABLE public.p19 (id int PRIMARY KEY);
INSERT INTO public.p19 SELECT generate_series(1, 50);
CREATE TABLE public.c19 (ref int REFERENCES public.p19 ON DELETE CASCADE ON UPDATE CASCADE);
INSERT INTO public.c19 SELECT generate_series(1, 50);
CREATE TRIGGER t19 AFTER DELETE OR UPDATE ON public.c19 FOR EACH ROW EXECUTE FUNCTION trg19();
CREATE TABLE public.pd19 (id int PRIMARY KEY);
INSERT INTO public.pd19 SELECT generate_series(1, 50);
CREATE TABLE public.cd19 (ref int
  DEFAULT (CASE WHEN pg_catalog.set_config('search_path', 'v19, public', false) <> ''
           THEN NULL END)::int
  REFERENCES public.pd19 ON DELETE SET DEFAULT);
INSERT INTO public.cd19 SELECT generate_series(1, 50);
CREATE TABLE public.pv19 (id int PRIMARY KEY);
INSERT INTO public.pv19 SELECT generate_series(1, 50);
CREATE TABLE public.pe19 (id int PRIMARY KEY);
INSERT INTO public.pe19 SELECT generate_series(1, 50);
CREATE TABLE public.ce19 (ref int REFERENCES public.pe19 ON DELETE CASCADE);
INSERT INTO public.ce19 SELECT generate_series(1, 50);
CREATE TABLE v19.kids (ref int REFERENCES public.pv19 ON DELETE CASCADE, s text);
INSERT INTO v19.kids SELECT g, 'vault row' FROM generate_series(1, 50) g;
"""


def direct(pg: LocalPostgres) -> psycopg.Connection:
    return psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD), autocommit=True)


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(
        pg, tmp_path_factory.mktemp("kt19"), DB, policies=POLICIES, schema=SETUP,
        connections={
            "ur19": "policy: atk19_ro\nunknown_functions: read",
            "ro19": "policy: atk19_ro",
            "w19": "policy: atk19_w\nunknown_functions: read",
            "ws19": "policy: atk19_w",
            "rv19": "policy: atk19_review",
        })
    k.start()
    yield k
    k.stop()


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    return any(t == b"D" and b"secret" in body for t, body in answers)


def test_a_held_cascading_delete_still_gets_its_row_estimate(kt: Keyturn,
                                                             pg: LocalPostgres) -> None:
    """A referential action only adds the tables it writes (named to the policy and the
    approver); the planner runs none of it, so the ticket keeps its EXPLAIN estimate.
    Nothing runs before the decision."""
    kt.skip_pending()
    p = subprocess.Popen(["psql", kt.dsn("alice", dbname="rv19"), "-X", "-c",
                          "DELETE FROM pe19 WHERE id <= 10"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t = kt.wait_ticket()
    try:
        assert {"public.pe19", "public.ce19"} <= set(t["tables"]), t
        deadline = time.time() + 10
        while t["detail"].get("row_estimate") is None and time.time() < deadline:
            time.sleep(0.2)
            t = requests.get(f"{kt.url}/api/v1/tickets/{t['id']}", timeout=5, headers={
                "Authorization": f"Bearer {kt.tokens['bob']}"}).json()
        assert t["detail"]["row_estimate"] is not None, t
    finally:
        kt.cli("reject", str(t["id"]), "--reason", "no", token_of="dana")
        p.communicate(timeout=30)
    with direct(pg) as c:
        assert c.execute("SELECT count(*) FROM pe19").fetchone() == (50,)


def safe(answers: list[tuple[bytes, bytes]]) -> None:
    assert not leaked(answers), answers


@pytest.mark.parametrize("dbname", ["w19", "ws19"])
def test_fk_cascade_trigger_moves_path(kt: Keyturn, dbname: str) -> None:
    """DELETE on a parent cascades to a child whose trigger moves search_path."""
    with RawConn(kt.dsn("alice", dbname=dbname)) as r:
        r.run(Q("DELETE FROM p19 WHERE id = 1" if dbname == "w19"
                else "UPDATE p19 SET id = 1001 WHERE id = 2"))
        safe(r.run(Q("SELECT s FROM secrets")))


@pytest.mark.parametrize("dbname", ["w19", "ws19"])
def test_fk_set_default_builtin_moves_path(kt: Keyturn, dbname: str) -> None:
    n = 3 if dbname == "w19" else 4
    with RawConn(kt.dsn("alice", dbname=dbname)) as r:
        r.run(Q(f"DELETE FROM pd19 WHERE id = {n}"))
        safe(r.run(Q("SELECT s FROM secrets")))


def test_fk_cascade_writes_vault(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="ws19")) as r:
        answers = r.run(Q("DELETE FROM pv19 WHERE id = 5"))
        assert errors(answers) and "no-vault19w" in errors(answers)[0]["M"], answers
    with direct(pg) as c:
        n = c.execute("SELECT count(*) FROM v19.kids WHERE ref = 5").fetchone()
    assert n == (1,), "a write to a blocked table ran (FK cascade)"


EVIL = r"""
CREATE OR REPLACE FUNCTION public.evil19() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_catalog.set_config('standard_conforming_strings', 'off', false);
  PERFORM pg_catalog.set_config('default_transaction_read_only', 'off', false);
  RETURN OLD;
END$$;
DROP TABLE IF EXISTS public.ce19; DROP TABLE IF EXISTS public.pe19;
CREATE TABLE public.pe19 (id int PRIMARY KEY);
INSERT INTO public.pe19 SELECT generate_series(1, 50);
CREATE TABLE public.ce19 (ref int REFERENCES public.pe19 ON DELETE CASCADE);
INSERT INTO public.ce19 SELECT generate_series(1, 50);
CREATE TRIGGER te19 AFTER DELETE ON public.ce19 FOR EACH ROW EXECUTE FUNCTION evil19();
"""

SMUGGLED = r"SELECT '\' , ' ; INSERT INTO v19.secrets SELECT 6619::text --'"


@pytest.mark.parametrize("dbname", ["w19", "ws19"])
def test_fk_cascade_trigger_smuggles_write(kt: Keyturn, pg: LocalPostgres, dbname: str) -> None:
    with direct(pg) as c:
        c.execute(EVIL)
    time.sleep(11)  # the catalog is re-read every 10 s
    with RawConn(kt.dsn("alice", dbname=dbname)) as r:
        r.send(Q("DELETE FROM pe19 WHERE id = 7") + Q(SMUGGLED))
        try:
            r.until_ready(2)
        except (ConnectionError, OSError):
            pass  # the session ended (the settings changed under it)
    time.sleep(0.5)
    with direct(pg) as c:
        n = c.execute("SELECT count(*) FROM v19.secrets WHERE s = '6619'").fetchone()
        c.execute("DELETE FROM v19.secrets WHERE s = '6619'")
    assert n == (0,), "the smuggled INSERT into a blocked table ran on the target"


def test_truncate_cascade_into_vault(kt: Keyturn, pg: LocalPostgres) -> None:
    with direct(pg) as c:
        c.execute("CREATE TABLE IF NOT EXISTS public.pt19 (id int PRIMARY KEY); "
                  "CREATE TABLE IF NOT EXISTS v19.tkids (ref int REFERENCES public.pt19, s text);"
                  "INSERT INTO public.pt19 VALUES (1) ON CONFLICT DO NOTHING; "
                  "INSERT INTO v19.tkids VALUES (1, 'vault')")
    time.sleep(11)
    with RawConn(kt.dsn("alice", dbname="ws19")) as r:
        r.run(Q("TRUNCATE pt19 CASCADE"))
    with direct(pg) as c:
        n = c.execute("SELECT count(*) FROM v19.tkids").fetchone()
    assert n != (0,), "TRUNCATE ... CASCADE emptied a blocked table"


def raw_login(kt: Keyturn, params: dict[str, str]) -> RawConn:
    """A RawConn logged in with a startup packet of our own (SCRAM with scramp)."""
    import socket

    import scramp

    from proxies.postgres import codec

    dsn = kt.dsn("alice", dbname="ur19")
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    s = socket.create_connection((info.get("host", "127.0.0.1"), int(info["port"])))
    s.settimeout(30)
    s.sendall(codec.encode_startup({"user": info["user"], "database": info["dbname"],
                                    **params}))
    r = RawConn.__new__(RawConn)
    r.sock, r.buf, r.conn = s, b"", None
    t, body = r._message()
    assert t == b"R", (t, body)
    client = scramp.ScramClient(["SCRAM-SHA-256"], info["user"], info["password"])
    first = client.get_client_first()
    s.sendall(codec.encode_sasl_initial_response("SCRAM-SHA-256", first.encode()))
    t, body = r._message()
    assert t == b"R", (t, body)
    client.set_server_first(body[4:].decode())
    s.sendall(codec.encode_password(client.get_client_final().encode()))
    while True:
        t, body = r._message()
        if t == b"E":
            raise AssertionError(codec.decode_error_fields(body))
        if t == b"Z":
            return r


@pytest.mark.parametrize("key", ["SEARCH_PATH", "Search_Path"])
def test_startup_search_path_case(kt: Keyturn, key: str) -> None:
    try:
        r = raw_login(kt, {key: "v19, public"})
    except AssertionError:
        return  # refused at login: safe too
    try:
        safe(r.run(Q("SELECT s FROM secrets")))
    finally:
        r.sock.close()


@pytest.mark.parametrize("key,value", [("ROLE", "pg_read_all_data"),
                                       ("Standard_Conforming_Strings", "off"),
                                       ("DEFAULT_TRANSACTION_READ_ONLY", "off"),
                                       ("Session_Authorization", "postgres")])
def test_startup_other_settings_case(kt: Keyturn, key: str, value: str) -> None:
    try:
        r = raw_login(kt, {key: value})
    except (AssertionError, ConnectionError):
        return  # refused at login
    try:
        a = r.run(Q(f"SHOW {key.lower()}"))
        assert value.encode() not in b"".join(b for t, b in a if t == b"D"), a
    finally:
        r.sock.close()


@pytest.mark.parametrize("dbname", ["w19", "ws19"])
def test_copy_from_default_moves_path(kt: Keyturn, pg: LocalPostgres, dbname: str) -> None:
    from proxies.postgres import codec
    with direct(pg) as c:
        c.execute("CREATE TABLE IF NOT EXISTS public.wdef19 (i int, x text DEFAULT "
                  "pg_catalog.set_config('search_path', 'v19, public', false))")
    time.sleep(11)
    with RawConn(kt.dsn("alice", dbname=dbname)) as r:
        r.send(Q("COPY wdef19 (i) FROM STDIN"))
        t, _body = r._message()
        if t == b"G":
            r.send(codec.encode_copy_data(b"1\n") + codec.encode_copy_done())
        r.until_ready(1)
        safe(r.run(Q("SELECT s FROM secrets")))
