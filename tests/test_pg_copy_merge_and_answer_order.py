"""COPY FROM STDIN and the order of the target's answers; MERGE, INSERT ... ON CONFLICT and
other write forms against a blocked schema; approvals and start-up settings (attack run
21). Each test asserts the safe behaviour.

While a COPY FROM STDIN reads the client's messages, the server ignores Sync and Flush:
a Sync it ignored answers nothing, and every later answer would be taken for the request
before it (a blocked read returned for an allowed one, a write run with the access given
to another, the audit naming the wrong statement, masking planned for another result).
COPY FROM STDIN is therefore accepted only alone in a simple Query, a Sync during it ends
the session, and an answer of a type its request cannot get ends the session too."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from proxies.postgres import codec
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    B,
    E,
    P,
    Q,
    RawConn,
    S,
    drain,
    errors,
    in_step,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

W_TABLES = '["public.open_data", "public.inbox", "public.trg_in", "public.uq"]'
POLICIES = (vault_policy("a21", ["a21_vault"]) + vault_policy("a21w", ["a21_vault"], f"""\
      - name: w
        match: {{class: [write], tables: {W_TABLES}}}
        action: allow
""") + vault_policy("a21r", ["a21_vault"], """\
      - name: writes-reviewed
        match: {class: [write]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""") + vault_policy("a21u", ["a21_vault"], """\
      - name: unparsed-allowed
        match: {class: [unknown]}
        action: allow
""") + masked_policy("a21m", ["a21_vault"], ["public.inbox"]))

SCHEMA = vault_schema("a21_vault") + """
CREATE TABLE public.inbox (v text);
CREATE TABLE a21_vault.victim (v text);
INSERT INTO a21_vault.victim VALUES ('keep me');
CREATE TABLE public.uq (id int PRIMARY KEY, v text);
INSERT INTO public.uq VALUES (1, 'one');
CREATE TABLE public.trg_in (v text);
CREATE FUNCTION public.trg_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN DELETE FROM a21_vault.victim; RETURN NEW; END$$;
CREATE TRIGGER trg_in_t BEFORE INSERT ON public.trg_in FOR EACH ROW EXECUTE FUNCTION trg_fn();
CREATE TABLE public.people (id int PRIMARY KEY, email text, city text);
INSERT INTO public.people VALUES (1, 'realperson1@example.org', 'Oslo'),
                                 (2, 'realperson2@example.org', 'Rome');
"""

MASKED_COLUMNS = """
columns:
  public.people.email: [pii.email]
"""


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    """A secret, or an unmasked e-mail address of the masked connection's table."""
    return secret_leaked(answers) or any(t == b"D" and b"realperson" in body
                                         for t, body in answers)


def direct(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn("atk21", user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a21"), "atk21", schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a21read": "policy: a21\nunknown_functions: read",
                                "a21plain": "policy: a21",
                                "a21w": "policy: a21w",
                                "a21wread": "policy: a21w\nunknown_functions: read",
                                "a21m": "policy: a21m" + MASKED_COLUMNS,
                                "a21r": "policy: a21r",
                                "a21u": "policy: a21u"})
    k.start()
    yield k
    k.stop()






# ------------------------------------------------------------ COPY-in desync (family 2/8)

def test_query_during_copy_in_does_not_desync_masking(kt: Keyturn) -> None:
    """While the target is in COPY IN, a Query is swallowed by the target (it fails the
    COPY). If the gateway still expects an answer for it, the next statement's rows are
    masked with the wrong statement's plan."""
    with RawConn(kt.dsn("alice", dbname="a21m")) as r:
        r.send(Q("COPY inbox FROM STDIN"))
        a = read_until(r, b"G")
        r.send(Q("SELECT 'decoy'::text AS email"))
        a += drain(r, 1.5)
        r.send(Q("SELECT email FROM people WHERE id = 1"))
        b = drain(r, 2.0)
        assert not leaked(b), b


def refused_copy(answers: list[tuple[bytes, bytes]]) -> bool:
    return any(t == b"E" and b"C0A000\0" in body and b"COPY FROM STDIN" in body
               for t, body in answers)


def closed_during_copy(r: RawConn, answers: list[tuple[bytes, bytes]]) -> bool:
    """The gateway ended the session with a protocol error naming COPY, and closed it."""
    answers = answers + drain(r, 2.0)
    fatal = [body for t, body in answers if t == b"E" and b"SFATAL\0" in body]
    return bool(fatal) and b"C08P01\0" in fatal[-1] and b"during COPY FROM STDIN" in fatal[-1] \
        and not r.sock.recv(1)


def test_extended_copy_in_sync_is_ignored_by_target(kt: Keyturn) -> None:
    """The target ignores a Sync during COPY IN: an extended COPY batch ends without a
    ReadyForQuery; a later statement's answer must not be taken for an earlier one.
    COPY FROM STDIN through Parse/Bind/Execute is refused at Parse."""
    with RawConn(kt.dsn("alice", dbname="a21m")) as r:
        r.send(P("", "COPY inbox FROM STDIN"), B("", ""), E(""), S())
        a = read_until(r, b"Z")
        assert refused_copy(a) and not any(t == b"G" for t, _ in a), a
        r.send(codec.encode_message(b"d", b"x\n"), codec.encode_message(b"c", b""))
        a += drain(r, 1.0)
        r.send(Q("SELECT 'decoy'::text AS email"))
        a += drain(r, 1.0)
        r.send(Q("SELECT email FROM people WHERE id = 1"))
        b = drain(r, 2.0)
        assert not leaked(b), b
        in_step(r)


def copy_desync(r: RawConn, table: str = "inbox") -> list[tuple[bytes, bytes]]:
    """An extended-protocol COPY FROM STDIN: the target would ignore the batch's Sync
    while it is in COPY IN, so the batch would never get its ReadyForQuery. The gateway
    refuses it at Parse (nothing reaches COPY IN); the COPY messages after it are
    ignored by the target outside COPY."""
    r.send(P("", f"COPY {table} FROM STDIN"), B("", ""), E(""), S())
    a = read_until(r, b"Z")
    assert refused_copy(a) and not any(t == b"G" for t, _ in a), a
    r.send(codec.encode_message(b"d", b"x\n"), codec.encode_message(b"c", b""))
    a += drain(r, 1.0)
    return a


def test_copy_desync_cannot_swap_a_prepared_statement(kt: Keyturn) -> None:
    """The gateway tracks what each prepared name holds from the target's answers; once a
    Sync swallowed by COPY IN shifts every answer by one, a Close and a Parse can be
    'answered' as failed while the server did them: the name then holds a blocked read
    for the server and the allowed decoy for the gateway."""
    vault = "SELECT s FROM a21_vault.secrets"
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        a = r.run(P("s1", "SELECT 'decoy'::text"), S())
        assert not errors(a), a
        copy_desync(r)
        a = r.run(Q("SELECT 1"), syncs=1)           # the stale Sync's ReadyForQuery
        a = r.run(close_s("s1"), S())
        copy_desync(r)
        a = r.run(Q("SELECT 2"), syncs=1)
        a = r.run(P("s1", vault), S())
        a = r.run(B("", "s1"), E(""), S())
        assert not leaked(a), a
        a += drain(r, 1.0)
        assert not leaked(a), a


def close_s(name: str) -> bytes:
    return codec.encode_close("S", name)


def test_simple_copy_with_sync_cannot_swap_a_prepared_statement(kt: Keyturn,
                                                               pg: LocalPostgres) -> None:
    """A simple-protocol COPY FROM STDIN with a Sync sent during COPY IN: the target
    ignores it (answers nothing), so every later answer would be taken for the request
    before it. The gateway ends the session at the Sync; the COPY never commits."""
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        a = r.run(P("s2", "SELECT 'decoy'::text"), S())
        assert not errors(a), a
        r.send(Q("COPY inbox FROM STDIN"))
        a = read_until(r, b"G")
        r.send(S(), codec.encode_message(b"d", b"a21-simple-sync\n"),
               codec.encode_message(b"c", b""))
        assert closed_during_copy(r, []), a
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a21-simple-sync'") == [(0,)]


def test_copy_desync_cannot_turn_an_allowed_write_into_a_blocked_one(
        kt: Keyturn, pg: LocalPostgres) -> None:
    """The same swap with an allowed write as the decoy: the server runs a DELETE of the
    vault with the write access the gateway gives the decoy."""
    direct(pg, "CREATE TABLE IF NOT EXISTS a21_vault.victim3 (v text); "
               "INSERT INTO a21_vault.victim3 VALUES ('keep me')")
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        a = r.run(P("w3", "INSERT INTO open_data VALUES ('decoy3')"), S())
        assert not errors(a), a
        copy_desync(r)
        r.run(Q("SELECT 1"), syncs=1)
        r.run(close_s("w3"), S())
        copy_desync(r)
        r.run(Q("SELECT 2"), syncs=1)
        a = r.run(P("w3", "DELETE FROM a21_vault.victim3"), S())
        a = r.run(B("", "w3"), E(""), S())
    assert direct(pg, "SELECT count(*) FROM a21_vault.victim3") == [(1,)]




@pytest.mark.parametrize("batch", [
    pytest.param(lambda: [P("", "SELECT 1/0"), B("", ""), E(""), Q("SELECT 11"), S()],
                 id="query-after-error-in-batch"),
    pytest.param(lambda: [P("", "SELECT 1/0"), B("", ""), E(""), S(), S()], id="two-syncs"),
    pytest.param(lambda: [P("", "SELECT 1"), B("", ""), E(""), Q("SELECT 11"), S()],
                 id="query-inside-batch"),
    pytest.param(lambda: [P("", "SELECT 1"), B("", ""), E(""), codec.encode_message(b"c", b""),
                          codec.encode_message(b"f", b"x\0"), S()],
                 id="copy-done-outside-copy"),
    pytest.param(lambda: [P("", "SELECT 1"), B("", ""), E("", 0),
                          codec.encode_message(b"H", b""), S()], id="flush"),
    pytest.param(lambda: [P("", "COPY open_data TO STDOUT"), B("", ""), E("", 1), S()],
                 id="copy-out-row-limit"),
    pytest.param(lambda: [Q("")], id="empty-query"),
    pytest.param(lambda: [Q(";;")], id="empty-statements"),
    pytest.param(lambda: [P("", ""), B("", ""), E(""), S()], id="empty-extended"),
    pytest.param(lambda: [B("nope", "does_not_exist"), E("nope"), S()], id="bind-unknown"),
    pytest.param(lambda: [E("no_portal"), S()], id="execute-unknown-portal"),
    pytest.param(lambda: [codec.encode_describe("P", "no_portal"), S()],
                 id="describe-unknown-portal"),
])
def test_read_only_sequences_keep_answers_in_step(kt: Keyturn, batch) -> None:
    with RawConn(kt.dsn("alice", dbname="a21plain")) as r:
        msgs = batch()
        r.send(*msgs)
        drain(r, 1.5)
        in_step(r)


def test_approved_copy_cannot_desync_answers_for_later_reads(kt: Keyturn,
                                                            pg: LocalPostgres) -> None:
    """Family 6: one approved COPY FROM STDIN (reviewed policy, reads allowed); two Syncs
    sent during COPY IN would be ignored by the target and shift the gateway's answers by
    two: enough to swap a prepared decoy read for a blocked read of the vault. The
    gateway ends the session at the first Sync instead."""
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        a = r.run(P("s4", "SELECT 'decoy'::text"), S())
        assert not errors(a), a
        kt.skip_pending()
        r.send(Q("COPY inbox FROM STDIN"))
        t = kt.wait_ticket()
        assert t["statement"] == "COPY inbox FROM STDIN", t
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = read_until(r, b"G", timeout=30)
        r.send(S(), S(), codec.encode_message(b"d", b"a21-approved\n"),
               codec.encode_message(b"c", b""))
        assert closed_during_copy(r, []), a
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a21-approved'") == [(0,)]


def test_an_approved_copy_runs_and_the_session_stays_in_step(kt: Keyturn,
                                                           pg: LocalPostgres) -> None:
    """The approved COPY as clients send it (data, CopyDone) loads its rows; answers
    after it are the right statements' answers."""
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        kt.skip_pending()
        r.send(Q("COPY inbox FROM STDIN"))
        t = kt.wait_ticket()
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = read_until(r, b"G", timeout=30)
        r.send(codec.encode_message(b"H", b""), codec.encode_message(b"d", b"a21-ok\n"),
               codec.encode_message(b"c", b""))
        a = read_until(r, b"Z")
        assert any(t == b"C" and body.startswith(b"COPY 1") for t, body in a), a
        in_step(r)
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a21-ok'") == [(1,)]


def test_copy_with_other_statements_in_one_query_is_refused(kt: Keyturn) -> None:
    """The gateway's own statements or the client's next one would be read as COPY data;
    COPY FROM STDIN must be alone in its Query."""
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        for sql in ("COPY inbox FROM STDIN; SELECT 1", "SELECT 1; COPY inbox FROM STDIN"):
            a = r.run(Q(sql))
            assert refused_copy(a) and not any(t == b"G" for t, _ in a), a
        in_step(r)


def test_unreadable_text_naming_copy_counts_as_copy_from_stdin(kt: Keyturn) -> None:
    """What the analyser cannot read may still be a COPY FROM STDIN to the server (the
    riskiest reading), even where a rule allows unreadable statements: refused through
    Parse/Bind/Execute; as a simple Query it is sent with COPY's rules."""
    sql = "COPY inbox FROM STDIN WITH (FORMAT csv"  # unterminated: unreadable
    with RawConn(kt.dsn("alice", dbname="a21u")) as r:
        a = r.run(P("", sql), B("", ""), E(""), S())
        assert refused_copy(a), a
        a = r.run(Q(sql))
        assert errors(a) and errors(a)[0]["C"] == "42601", a  # the server's syntax error
        in_step(r)


def test_a_copy_that_fails_to_start_leaves_the_session_usable(kt: Keyturn) -> None:
    """A COPY the target refuses (no such table) never reads COPY data: the client's next
    statements are answered as usual."""
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        a = r.run(Q("COPY inbox (no_such_column) FROM STDIN"))
        assert errors(a) and not any(t == b"G" for t, _ in a), a
        in_step(r)


@pytest.fixture()
def kt_own(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    """A gateway of its own (stopped to read its whole audit trail)."""
    import uuid
    db = "atk21_" + uuid.uuid4().hex[:8]
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a21own"), db, schema=SCHEMA,
                            policies=POLICIES, connections={"a21w": "policy: a21w"})
    k.start()
    yield k
    k.stop()


def test_copy_desync_swap_is_audited_as_what_ran(kt_own: Keyturn) -> None:
    """Whatever the server ran for an Execute must be what the audit trail records: a
    read of the vault must not be recorded as the decoy it was swapped for."""
    vault = "SELECT s FROM a21_vault.secrets"
    with RawConn(kt_own.dsn("alice", dbname="a21w")) as r:
        r.run(P("s5", "SELECT 'decoy5'::text"), S())
        copy_desync(r)
        r.run(Q("SELECT 1"), syncs=1)
        r.run(close_s("s5"), S())
        copy_desync(r)
        r.run(Q("SELECT 2"), syncs=1)
        r.run(P("s5", vault), S())
        a = r.run(B("", "s5"), E(""), S())
    assert not leaked(a), a
    assert kt_own.stop() == 0
    export = kt_own.cli("audit", "export", "--format", "jsonl").stdout
    copies = [json.loads(ln) for ln in export.splitlines() if "COPY inbox FROM STDIN" in ln]
    assert len(copies) == 2 and all(
        c["action"] == "block" and c["rule"] == "builtin:copy-in-batch" for c in copies), copies
    reads = [json.loads(ln) for ln in export.splitlines() if "a21_vault" in ln]
    assert reads and all(r["outcome"] != "ok" for r in reads), reads


def test_psycopg_and_asyncpg_copy_from_stdin_work(kt: Keyturn, pg: LocalPostgres) -> None:
    """Drivers send COPY FROM STDIN as a simple Query of its own: it runs, rows arrive,
    and the session goes on in step."""
    with psycopg.connect(kt.dsn("alice", dbname="a21w"), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY inbox (v) FROM STDIN") as copy:
                for i in range(3):
                    copy.write_row((f"a21-psycopg-{i}",))
            cur.execute("SELECT count(*) FROM inbox WHERE v LIKE 'a21-psycopg-%'")
            assert cur.fetchone() == (3,)
        with conn.transaction():
            with conn.cursor() as cur:
                with cur.copy("COPY inbox (v) FROM STDIN") as copy:
                    copy.write_row(("a21-psycopg-tx",))
                cur.execute("SELECT 'after'")
                assert cur.fetchone() == ("after",)

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=kt.gateway_port, user="alice",
                                     password=kt.tokens["alice"], database="a21w", ssl=False)
        try:
            await conn.copy_records_to_table("inbox", records=[("a21-asyncpg-1",),
                                                              ("a21-asyncpg-2",)],
                                             columns=["v"])
            assert await conn.fetchval("SELECT count(*) FROM inbox WHERE v LIKE "
                                       "'a21-asyncpg-%'") == 2
            # asyncpg prepares with Parse/Describe/Flush (no Sync): a write sent as a
            # simple Query right after runs in the implicit transaction they began.
            await conn.prepare("SELECT v FROM inbox WHERE v = $1")
            await conn.execute("INSERT INTO inbox VALUES ('a21-asyncpg-3')")
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a21-psycopg-tx'") == [(1,)]
    assert direct(pg, "SELECT count(*) FROM inbox WHERE v = 'a21-asyncpg-3'") == [(1,)]


# ------------------------------------------------ families 1, 2, 5: statements that must be refused

def victim_intact(pg: LocalPostgres) -> bool:
    return direct(pg, "SELECT count(*) FROM a21_vault.victim") == [(1,)]


def no_secret_copied(pg: LocalPostgres) -> bool:
    return direct(pg, "SELECT count(*) FROM public.open_data WHERE v LIKE '%secret%'") == [(0,)] \
        and direct(pg, "SELECT count(*) FROM public.uq WHERE v LIKE '%secret%'") == [(0,)]


@pytest.mark.parametrize("sql", [
    "MERGE INTO open_data d USING a21_vault.secrets s ON false "
    "WHEN NOT MATCHED THEN INSERT VALUES (s.s)",
    "MERGE INTO open_data d USING (SELECT s FROM a21_vault.secrets) s ON false "
    "WHEN NOT MATCHED THEN INSERT VALUES (s.s)",
    "MERGE INTO open_data d USING (VALUES (1)) s(x) ON false "
    "WHEN NOT MATCHED AND (SELECT count(*) FROM a21_vault.secrets) > 0 THEN INSERT VALUES ('m')",
    "MERGE INTO open_data d USING (VALUES (1)) s(x) ON false "
    "WHEN NOT MATCHED AND rb_run('DELETE FROM a21_vault.victim') = 'ok' THEN INSERT VALUES ('m')",
    "MERGE INTO a21_vault.victim d USING (VALUES (1)) s(x) ON true WHEN MATCHED THEN DELETE",
    "INSERT INTO open_data SELECT s FROM a21_vault.secrets",
    "WITH x AS (SELECT s FROM a21_vault.secrets) INSERT INTO open_data SELECT * FROM x",
    "INSERT INTO open_data VALUES ('r') RETURNING (SELECT s FROM a21_vault.secrets)",
    "INSERT INTO uq VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
    "SET v = (SELECT s FROM a21_vault.secrets)",
    "INSERT INTO uq VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = rb_run('DELETE FROM "
    "a21_vault.victim')",
    "INSERT INTO uq VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET v = 'y' "
    "WHERE rb_run('DELETE FROM a21_vault.victim') = 'ok'",
    "INSERT INTO uq VALUES (1, 'x') ON CONFLICT (id) WHERE rb_run('DELETE FROM "
    "a21_vault.victim') = 'ok' DO NOTHING",
    "INSERT INTO trg_in VALUES ('t')",
    "UPDATE open_data SET v = v FROM a21_vault.secrets WHERE s IS NULL",
    "DELETE FROM open_data USING a21_vault.secrets WHERE false",
    "COPY (SELECT s FROM a21_vault.secrets) TO STDOUT",
    "COPY (SELECT rb_run('DELETE FROM a21_vault.victim')) TO STDOUT",
    "COPY a21_vault.secrets TO STDOUT",
    "COPY a21_vault.victim FROM STDIN",
    "SELECT * INTO TEMP stolen FROM a21_vault.secrets",
    "CREATE TEMP TABLE stolen2 AS SELECT * FROM a21_vault.secrets",
    "CREATE TEMP VIEW open_data AS SELECT s AS v FROM a21_vault.secrets",
    "TRUNCATE a21_vault.victim",
    "LOCK TABLE a21_vault.victim",
    "EXPLAIN ANALYZE DELETE FROM a21_vault.victim",
    "DECLARE c CURSOR WITH HOLD FOR SELECT s FROM a21_vault.secrets",
    "PREPARE TRANSACTION 'a21x'",
    "CALL nothing()",
    "DO $$BEGIN DELETE FROM a21_vault.victim; END$$",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT pg_read_file('/etc/passwd')",
    "REFRESH MATERIALIZED VIEW open_data",
    "VACUUM a21_vault.victim",
    "ANALYZE a21_vault.victim",
])
@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_refused_on_allowed_write_connection(kt: Keyturn, pg: LocalPostgres, sql: str,
                                             mode: str) -> None:
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        if mode == "simple":
            a = r.run(Q(sql))
        else:
            a = r.run(P("", sql), B("", ""), E(""), S())
        assert not leaked(a), a
        if sql.startswith("COPY a21_vault.victim FROM") and not errors(a):
            r.send(codec.encode_message(b"d", b"pwned\n"), codec.encode_message(b"c", b""),
                   S())
            a += drain(r, 1.0)
        assert errors(a), a
    assert victim_intact(pg) and no_secret_copied(pg)


def test_copy_into_table_whose_trigger_writes_the_vault(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a21w")) as r:
        r.send(Q("COPY trg_in FROM STDIN"))
        a = drain(r, 1.5)
        if any(t == b"G" for t, _ in a):
            r.send(codec.encode_message(b"d", b"t\n"), codec.encode_message(b"c", b""))
            a += drain(r, 1.5)
    assert victim_intact(pg)


# ------------------------------------------------ family 6: what rides on an approval

def inbox_count(pg: LocalPostgres, note: str) -> int:
    return direct(pg, f"SELECT count(*) FROM public.inbox WHERE v = '{note}'")[0][0]


def test_pipelined_statements_after_an_approved_write_are_judged(kt: Keyturn,
                                                                 pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        kt.skip_pending()
        r.send(Q("INSERT INTO inbox VALUES ('ride1')"), Q("DELETE FROM a21_vault.victim"),
               Q("SELECT s FROM a21_vault.secrets"))
        t = kt.wait_ticket()
        assert "ride1" in t["statement"], t
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = r.until_ready(3)
        assert not leaked(a) and len(errors(a)) == 2, a
    assert inbox_count(pg, "ride1") == 1 and victim_intact(pg)


def test_extended_batch_after_an_approved_write_is_judged(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        kt.skip_pending()
        r.send(P("w6", "INSERT INTO inbox VALUES ('ride2')"), B("pw6", "w6"), E("pw6"),
               codec.encode_close("S", "w6"), P("w6", "DELETE FROM a21_vault.victim"),
               B("pw7", "w6"), E("pw7"), P("", "SELECT s FROM a21_vault.secrets"), B("", ""),
               E(""), S())
        t = kt.wait_ticket()
        assert "ride2" in t["statement"], t
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = r.until_ready(1)
        assert not leaked(a), a
    # (the refusal aborts the batch's implicit transaction: the INSERT is rolled back)
    assert inbox_count(pg, "ride2") in (0, 1) and victim_intact(pg)


def test_rebinding_an_approved_statement_needs_a_new_approval(kt: Keyturn,
                                                              pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        kt.skip_pending()
        r.send(P("w8", "INSERT INTO inbox VALUES ('ride3')"), B("", "w8"), E(""), S())
        t = kt.wait_ticket()
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = r.until_ready(1)
        assert not errors(a), a
        r.send(B("", "w8"), E(""), E(""), S())
        a = drain(r, 2.0)
    assert inbox_count(pg, "ride3") == 1


def test_re_executing_the_approved_portal_needs_a_new_approval(kt: Keyturn,
                                                               pg: LocalPostgres) -> None:
    """An Execute of a portal whose INSERT already ran returns nothing more; an approved
    portal of a statement with a row limit (a cursor-like SELECT ... FOR UPDATE) may
    go on: it must not run more than what was approved."""
    with RawConn(kt.dsn("alice", dbname="a21r")) as r:
        kt.skip_pending()
        r.send(P("w9", "INSERT INTO inbox SELECT 'ride4' FROM generate_series(1, 3)"),
               B("pw9", "w9"), E("pw9"), E("pw9"), S())
        t = kt.wait_ticket()
        kt.cli("approve", str(t["id"]), token_of="bob")
        a = drain(r, 2.0)
        held = [b for k, b in a if k == b"N" and b"held for approval" in b]
        assert len(held) == 2 or errors(a), a  # the second Execute is judged again
    time.sleep(0.5)
    assert inbox_count(pg, "ride4") in (0, 3)


# ------------------------------------------------ family 7: start-up settings

@pytest.mark.parametrize("options", ["-c role=pg_read_all_data",
                                     "-c session_authorization=app",
                                     "-c default_transaction_read_only=off"])
def test_startup_options_are_refused(kt: Keyturn, options: str) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(kt.dsn("alice", dbname="a21plain") + f" options='{options}'").close()


def test_startup_search_path_to_the_vault_is_seen(kt: Keyturn) -> None:
    try:
        c = psycopg.connect(kt.dsn("alice", dbname="a21plain"), autocommit=True,
                            options="-c search_path=a21_vault,public")
    except psycopg.OperationalError:
        return  # refused at login: safe
    with c:
        with pytest.raises(psycopg.Error):
            c.execute("SELECT s FROM secrets").fetchall()


def test_set_search_path_to_the_vault_is_seen(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a21plain")) as r:
        a = r.run(Q("SET search_path = a21_vault, public"), Q("SELECT s FROM secrets"),
                  Q("RESET search_path"), Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def test_copy_desync_does_not_unmask_computed_columns(kt: Keyturn) -> None:
    """Masked connection: after the Sync swallowed by COPY IN, a computed column of a
    tagged one (no table OID in its RowDescription) is masked by the plan of the
    statement before it, a decoy with nothing to mask."""
    with RawConn(kt.dsn("alice", dbname="a21m")) as r:
        copy_desync(r)
        r.run(Q("SELECT 'decoy'::text AS x"), syncs=1)
        r.send(Q("SELECT substr(email, 1, 11) AS x FROM people WHERE id = 1"))
        b = drain(r, 2.0)
        assert not leaked(b), b


def test_control_computed_column_is_masked_without_desync(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a21m")) as r:
        a = r.run(Q("SELECT substr(email, 1, 11) AS x FROM people WHERE id = 1"))
        assert not leaked(a), a
