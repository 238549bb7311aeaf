"""Families from attack run 27 through the live gateway; each test asserts the safe
behaviour and checks the target directly.

- An approved TRUNCATE / REFRESH that would wait behind another transaction's lock (a
  read's lock is enough for an exclusive one) while that transaction replaces a function
  the statement runs: refused at the re-check (any conflicting lock on its tables, and
  any catalog row another running transaction changed).
- An approved INSERT whose trigger would wait on a table only the trigger names, behind
  a transaction that replaced the trigger's helper: refused (catalog rows changed by a
  running transaction).
- A deferred re-run after the session made a temporary table (found first by unqualified
  names in stored code) with a trigger: refused (DDL counts as session state).
- Known limit, marked xfail: a trigger that EXECUTEs SQL read from a table runs what the
  table holds when it runs.

And what held: a helper replaced and committed while held (refused), masking probes
(cursor_to_xml, pg_notify, set_config, date_trunc with masked values).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    Q,
    RawConn,
    direct_on,
    errors,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

DB = "atk27"
V = "a27_vault"

POLICIES = (vault_policy("a27", [V])
            # DDL allowed (vault blocked), writes held for approval.
            + vault_policy("a27rr", [V], """\
      - name: d
        match: {class: [ddl]}
        action: allow
      - name: w
        match: {class: [write]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")
            # A job-queue table anyone may write; other public writes are held.
            + vault_policy("a27q", [V], """\
      - name: q
        match: {class: [write], tables: ["public.cmds"]}
        action: allow
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")
            # TRUNCATE (ddl) of tbox2 / writes to the matview held; other DDL allowed.
            + vault_policy("a27tr", [V], """\
      - name: t
        match: {class: [ddl, write], tables: ["public.tbox2", "public.mv2"]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
      - name: d
        match: {class: [ddl]}
        action: allow
""")
            + vault_policy("a27def", [V], """\
      - name: d
        match: {class: [ddl], tables: ["public.*"]}
        action: allow
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m, mode: defer}
""")
            + masked_policy("a27m", [V], ["public.inbox"]))

SCHEMA = vault_schema(V) + f"""
CREATE TABLE public.inbox (v text);
CREATE FUNCTION public.trig_run() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN EXECUTE TG_ARGV[0]; RETURN NEW; END$$;
-- 1: a trigger that runs the commands queued in a table
CREATE TABLE public.cmds (q text);
INSERT INTO public.cmds VALUES ('SELECT 1');
CREATE FUNCTION public.t1_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$DECLARE c text; BEGIN FOR c IN SELECT q FROM public.cmds LOOP EXECUTE c; END LOOP;
  RETURN NEW; END$$;
CREATE TABLE public.tbox1 (v text);
CREATE TRIGGER t1 BEFORE INSERT ON public.tbox1 FOR EACH ROW EXECUTE FUNCTION public.t1_fn();
CREATE TABLE {V}.victim1 (v text);
INSERT INTO {V}.victim1 VALUES ('keep me');
-- 2: a TRUNCATE trigger calling a helper; a matview calling a helper
CREATE FUNCTION public.helper2() RETURNS text LANGUAGE sql AS $$ SELECT 'ok'::text $$;
CREATE FUNCTION public.t2_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.helper2(); RETURN NULL; END$$;
CREATE TABLE public.tbox2 (v text);
INSERT INTO public.tbox2 VALUES ('x');
CREATE TRIGGER t2 BEFORE TRUNCATE ON public.tbox2 FOR EACH STATEMENT
  EXECUTE FUNCTION public.t2_fn();
CREATE MATERIALIZED VIEW public.mv2 AS SELECT public.helper2() AS r;
CREATE TABLE {V}.victim2 (v text);
INSERT INTO {V}.victim2 VALUES ('keep me');
-- 4: a trigger writing an unqualified log table
CREATE TABLE public.log4 (v text);
CREATE FUNCTION public.t4_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO log4 VALUES (NEW.v); RETURN NEW; END$$;
CREATE TABLE public.tbox4 (v text);
CREATE TRIGGER t4 BEFORE INSERT ON public.tbox4 FOR EACH ROW EXECUTE FUNCTION public.t4_fn();
CREATE TABLE {V}.victim4 (v text);
INSERT INTO {V}.victim4 VALUES ('keep me');
-- 5: a trigger that logs, then calls a helper
CREATE FUNCTION public.helper5() RETURNS void LANGUAGE sql AS $$ SELECT 1 $$;
CREATE TABLE public.log5 (v text);
CREATE FUNCTION public.t5_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN INSERT INTO public.log5 VALUES (NEW.v); PERFORM public.helper5(); RETURN NEW; END$$;
CREATE TABLE public.tbox5 (v text);
CREATE TRIGGER t5 BEFORE INSERT ON public.tbox5 FOR EACH ROW EXECUTE FUNCTION public.t5_fn();
CREATE TABLE {V}.victim5 (v text);
INSERT INTO {V}.victim5 VALUES ('keep me');
CREATE TABLE public.people (id int PRIMARY KEY, email text, nick text);
INSERT INTO public.people VALUES (1, 'realperson1@example.org', 'zorblax1'),
                                 (2, 'realperson2@example.org', 'zorblax2');
"""

MASKED_COLUMNS = """
columns:
  public.people.email: [pii.email]
  public.people.nick: [pii.name]
"""


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    return secret_leaked(answers) or any(
        t in (b"D", b"d", b"A", b"N", b"E", b"S") and (b"secret" in body.lower()
                                                       or b"realperson" in body.lower()
                                                       or b"zorblax" in body.lower())
        for t, body in answers)


def direct(pg: LocalPostgres, sql: str) -> list[tuple] | str:
    return direct_on(pg.dsn(DB, user="app", password=APP_PASSWORD), sql)


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a27"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a27plain": "policy: a27",
                                "a27rr": "policy: a27rr",
                                "a27q": "policy: a27q",
                                "a27tr": "policy: a27tr",
                                "a27def": "policy: a27def",
                                "a27m": "policy: a27m" + MASKED_COLUMNS})
    k.start()
    yield k
    k.stop()


def _defer_approve(kt: Keyturn, r: RawConn, sql: str) -> list:
    kt.skip_pending()
    a = r.run(Q(sql))
    assert errors(a), a  # deferred: an error naming the ticket
    ticket = kt.wait_ticket()
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    time.sleep(1.5)
    return a


@pytest.mark.xfail(strict=True, reason=(
    "known limit (docs/postgres-gateway.md, 'What the checks cannot see'): stored code "
    "that runs SQL read from a table does what the data says when it runs; the re-check "
    "compares code and settings, not data"))
def test_held_insert_trigger_runs_commands_queued_while_held(kt: Keyturn,
                                                             pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a27q")) as r, \
            RawConn(kt.dsn("alice", dbname="a27q")) as r2:
        r.send(Q("INSERT INTO public.tbox1 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q(f"UPDATE public.cmds SET q = 'DELETE FROM {V}.victim1'"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F1", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim1") == [(1,)], (held, b, a)


@pytest.mark.parametrize("held_sql", ["TRUNCATE public.tbox2",
                                      "REFRESH MATERIALIZED VIEW public.mv2"])
def test_held_statement_waits_behind_a_read_lock_of_an_uncommitted_code_change(
        kt: Keyturn, pg: LocalPostgres, held_sql: str) -> None:
    direct(pg, "CREATE OR REPLACE FUNCTION public.helper2() RETURNS text LANGUAGE sql AS "
               "$$ SELECT 'ok'::text $$")
    direct(pg, f"DELETE FROM {V}.victim2; INSERT INTO {V}.victim2 VALUES ('keep me')")
    time.sleep(11)  # the gateway's catalog has read the reset helper
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a27tr")) as r, \
            RawConn(kt.dsn("alice", dbname="a27tr")) as r2:
        r.send(Q(held_sql))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("BEGIN"))
        b += r2.run(Q("CREATE OR REPLACE FUNCTION public.helper2() RETURNS text LANGUAGE sql "
                      f"AS $$ DELETE FROM {V}.victim2 RETURNING 'gone'::text $$"))
        rel = "public.tbox2" if "tbox2" in held_sql else "public.mv2"
        b += r2.run(Q(f"SELECT 1 FROM {rel} LIMIT 0"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        time.sleep(3)  # the re-check passed; the approved statement waits for r2's lock
        b += r2.run(Q("COMMIT"))
        a = r.until_ready()
    print("F2", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim2") == [(1,)], (held, b, a)


def test_deferred_insert_trigger_reaches_a_temp_table_made_after_approval(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a27def")) as r:
        a = _defer_approve(kt, r, "INSERT INTO public.tbox4 VALUES ('benign')")
        a += r.run(Q("CREATE TEMP TABLE log4 (v text)"))
        a += r.run(Q("CREATE TRIGGER t4t BEFORE INSERT ON log4 FOR EACH ROW "
                     f"EXECUTE FUNCTION public.trig_run('DELETE FROM {V}.victim4')"))
        a += r.run(Q("INSERT INTO public.tbox4 VALUES ('benign')"))
    print("F4", a[-6:])
    assert direct(pg, f"SELECT count(*) FROM {V}.victim4") == [(1,)], a


def test_held_insert_waits_inside_its_trigger_behind_an_uncommitted_code_change(
        kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a27rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a27rr")) as r2:
        r.send(Q("INSERT INTO public.tbox5 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("BEGIN"))
        b += r2.run(Q("CREATE OR REPLACE FUNCTION public.helper5() RETURNS void LANGUAGE sql "
                      f"AS $$ DELETE FROM {V}.victim5 $$"))
        b += r2.run(Q("ALTER TABLE public.log5 ADD COLUMN note text"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        time.sleep(3)  # the re-check passed; the trigger's INSERT waits for r2's lock
        b += r2.run(Q("COMMIT"))
        a = r.until_ready()
    print("F5", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim5") == [(1,)], (held, b, a)


# held: the same TRUNCATE, its trigger's helper replaced and committed while held: refused.
def test_held_truncate_helper_replaced_and_committed_while_held(kt: Keyturn,
                                                                pg: LocalPostgres) -> None:
    direct(pg, "CREATE OR REPLACE FUNCTION public.helper2() RETURNS text LANGUAGE sql AS "
               "$$ SELECT 'ok'::text $$")
    direct(pg, f"DELETE FROM {V}.victim2; INSERT INTO {V}.victim2 VALUES ('keep me')")
    time.sleep(11)
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a27tr")) as r, \
            RawConn(kt.dsn("alice", dbname="a27tr")) as r2:
        r.send(Q("TRUNCATE public.tbox2"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE OR REPLACE FUNCTION public.helper2() RETURNS text LANGUAGE sql "
                     f"AS $$ DELETE FROM {V}.victim2 RETURNING 'gone'::text $$"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("H1", held, b, a)
    assert any(e.get("C") == "55000" for e in errors(a)), a
    assert direct(pg, f"SELECT count(*) FROM {V}.victim2") == [(1,)], (held, b, a)


@pytest.mark.parametrize("sql", [
    "SELECT cursor_to_xml(('\"' || nick)::refcursor, 1, false, false, '') FROM people",
    "SELECT cursor_to_xmlschema(('\"' || nick)::refcursor, false, false, '') FROM people",
    "SELECT pg_notify('a27c', nick) FROM people",
    "SELECT set_config('search_path', nick, false) FROM people",
    "SELECT date_trunc(nick, now()) FROM people",
])
# held: 34000 (cursor ... does not exist, a class let through) is not reachable (the
# cursor_to_xml family is unknown and blocked); NOTIFY payloads and settings are refused.
def test_mask_probe27(kt: Keyturn, sql: str) -> None:
    with RawConn(kt.dsn("alice", dbname="a27m")) as r:
        a = r.run(Q("LISTEN a27c"))
        a += r.run(Q(sql))
        a += r.run(Q("SELECT 1"))
        print("MP", sql, [x for x in a if x[0] in (b"D", b"A", b"E", b"S")][:4])
        assert not leaked(a), a
