"""Families from attack run 24, through the live gateway against a real PostgreSQL: what a
statement changes without naming it (CASCADE, a schema's tables, the table of a trigger,
every column of an enum, a sequence by nextval/setval), writes through a view over
pg_settings, an approved statement whose trigger was added while it was held, masked
columns renamed by an alias list over ``*``; and what held (name tracking, two-phase commit,
large objects, notifications, timeouts, identity changes...). Each test asserts the safe
behaviour and checks the target directly."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    FLUSH,
    B,
    E,
    P,
    Q,
    RawConn,
    S,
    close_statement,
    drain,
    errors,
    in_step,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

DB = "atk24"

POLICIES = (vault_policy("a24", ["a24_vault"])
            + vault_policy("a24w", ["a24_vault"], """\
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: allow
""")
            + vault_policy("a24d", ["a24_vault"], """\
      - name: w
        match: {class: [write, ddl], tables: ["public.*"]}
        action: allow
""")
            + vault_policy("a24ww", ["a24_vault"], """\
      - name: w
        match: {class: [write]}
        action: allow
""")
            + vault_policy("a24dd", ["a24_vault", "a24_vault_b", "a24_vault_c"], """\
      - name: d
        match: {class: [write, ddl]}
        action: allow
""")
            + vault_policy("a24r", ["a24_vault"], """\
      - name: d
        match: {class: [ddl], tables: ["public.*"]}
        action: allow
      - name: w
        match: {class: [write]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")
            + masked_policy("a24m", ["a24_vault"], ["public.inbox"]))

SCHEMA = vault_schema("a24_vault") + """
CREATE TABLE public.inbox (v text);
CREATE TABLE a24_vault.victim (v text);
INSERT INTO a24_vault.victim VALUES ('keep me');
CREATE TABLE public.people (id int PRIMARY KEY, email text, nick text);
INSERT INTO public.people VALUES (1, 'realperson1@example.org', 'zorblax1'),
                                 (2, 'realperson2@example.org', 'zorblax2');
CREATE VIEW public.settings_v AS SELECT name, setting FROM pg_catalog.pg_settings;
CREATE FUNCTION public.json_scalar(x int) RETURNS text LANGUAGE sql
  AS $$ SELECT s FROM a24_vault.secrets LIMIT 1 $$;
CREATE FUNCTION public.json_serialize(x text) RETURNS text LANGUAGE plpgsql
  AS $$BEGIN DELETE FROM a24_vault.victim2; RETURN x; END$$;
CREATE FUNCTION public.merge_action() RETURNS text LANGUAGE plpgsql AS
  $$BEGIN PERFORM set_config('search_path', 'a24_vault, public', false); RETURN 'ok'; END$$;
CREATE FUNCTION public.json_array(a int, b int) RETURNS text LANGUAGE sql
  AS $$ SELECT string_agg(nick, ',') FROM public.people $$;
CREATE SEQUENCE a24_vault.vseq;
CREATE TABLE a24_vault.docs (body text);
ALTER TABLE a24_vault.docs ALTER body SET STORAGE EXTERNAL;
INSERT INTO a24_vault.docs VALUES (repeat('top secret ', 400));
CREATE TABLE public.pdocs (id int, body text);
ALTER TABLE public.pdocs ALTER body SET STORAGE EXTERNAL;
INSERT INTO public.pdocs VALUES (1, repeat('realperson3 private notes ', 200));
CREATE TABLE public.tparent (id int PRIMARY KEY);
INSERT INTO public.tparent VALUES (1);
CREATE TABLE a24_vault.tchild (pid int REFERENCES public.tparent, v text);
INSERT INTO a24_vault.tchild VALUES (1, 'keep me');
CREATE TYPE public.mood AS ENUM ('happy', 'sad');
CREATE TABLE a24_vault.moods (v text, m public.mood);
INSERT INTO a24_vault.moods VALUES ('keep me', 'happy');
CREATE SCHEMA a24_vault_b;
CREATE TABLE a24_vault_b.secrets (s text);
INSERT INTO a24_vault_b.secrets VALUES ('top secret b');
CREATE SCHEMA a24_vault_c;
CREATE TABLE a24_vault_c.victim (v text);
INSERT INTO a24_vault_c.victim VALUES ('keep me');
CREATE TYPE public.level AS ENUM ('low', 'high');
CREATE TABLE a24_vault.levels (v text, l public.level);
INSERT INTO a24_vault.levels VALUES ('keep me', 'high');
CREATE TABLE a24_vault.guarded (v text);
CREATE FUNCTION public.no_delete() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN RAISE EXCEPTION 'vault rows are never deleted'; END$$;
CREATE TRIGGER guard_rows BEFORE DELETE ON a24_vault.guarded
  FOR EACH ROW EXECUTE FUNCTION public.no_delete();
CREATE PROCEDURE public.commit_inside() LANGUAGE plpgsql AS
  $$BEGIN DELETE FROM a24_vault.victim; COMMIT; END$$;
CREATE TABLE public.iparent (v text);
CREATE TABLE a24_vault.ichild () INHERITS (public.iparent);
INSERT INTO a24_vault.ichild VALUES ('keep me');
CREATE TABLE public.iparent2 (v text);
CREATE TABLE a24_vault.ichild2 () INHERITS (public.iparent2);
INSERT INTO a24_vault.ichild2 VALUES ('keep me');
CREATE TABLE public.iparent3 (v text);
CREATE TABLE a24_vault.ichild3 () INHERITS (public.iparent3);
INSERT INTO a24_vault.ichild3 VALUES ('keep me');
CREATE FUNCTION public.trig_run() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN EXECUTE TG_ARGV[0]; RETURN NEW; END$$;
CREATE TABLE public.rinbox (v text);
CREATE TABLE a24_vault.victim4 (v text);
INSERT INTO a24_vault.victim4 VALUES ('keep me');
CREATE VIEW public.people_v AS SELECT id, nick FROM public.people;
CREATE MATERIALIZED VIEW public.people_mv AS SELECT id, nick FROM public.people;
CREATE TABLE a24_vault.victim2 (v text);
INSERT INTO a24_vault.victim2 VALUES ('keep me');
"""

MASKED_COLUMNS = """
columns:
  public.people.email: [pii.email]
  public.people.nick: [pii.name]
  public.pdocs.body: [pii.doc]
"""


def leaked(answers: list[tuple[bytes, bytes]]) -> bool:
    return secret_leaked(answers) or any(
        t == b"D" and (b"realperson" in body.lower() or b"zorblax" in body.lower())
        for t, body in answers)


def direct(pg: LocalPostgres, sql: str) -> list[tuple]:
    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD),
                         autocommit=True) as c:
        cur = c.execute(sql)
        return cur.fetchall() if cur.description else []


def fresh_victim(pg: LocalPostgres, table: str) -> None:
    direct(pg, f"CREATE TABLE IF NOT EXISTS {table} (v text); TRUNCATE {table}; "
               f"INSERT INTO {table} VALUES ('keep me')")


def victim_intact(pg: LocalPostgres, table: str) -> bool:
    return direct(pg, f"SELECT count(*) FROM {table}") == [(1,)]


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a24"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a24read": "policy: a24\nunknown_functions: read",
                                "a24plain": "policy: a24",
                                "a24w": "policy: a24w",
                                "a24wr": "policy: a24w\nunknown_functions: read",
                                "a24d": "policy: a24d",
                                "a24ww": "policy: a24ww",
                                "a24dd": "policy: a24dd",
                                "a24r": "policy: a24r",
                                "a24m": "policy: a24m" + MASKED_COLUMNS})
    k.start()
    yield k
    k.stop()


def test_control_vault_blocked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24w")) as r:
        a = r.run(Q("SET search_path = a24_vault, public"), Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def test_view_over_pg_settings_cannot_move_search_path(kt: Keyturn) -> None:
    """An UPDATE of a view over pg_settings runs pg_settings' rule (set_config) unseen."""
    with RawConn(kt.dsn("alice", dbname="a24w")) as r:
        a = r.run(Q("UPDATE settings_v SET setting = 'a24_vault, public' "
                    "WHERE name = 'search_path'"))
        a += r.run(Q("SELECT s FROM secrets"))
        a += r.run(Q("SHOW search_path"))
        assert not leaked(a), a


def test_view_over_pg_settings_made_through_the_gateway(kt: Keyturn) -> None:
    """The same with the view created through the gateway under a policy that allows
    schema changes and writes in public (pg_settings unqualified: the policy sees
    public.pg_settings, the server reads pg_catalog.pg_settings)."""
    import time
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("CREATE VIEW public.settings_v2 AS SELECT name, setting FROM pg_settings"))
        assert not errors(a), a
        # Refused at once (the session's own definition) and after the catalog read it.
        for _ in range(2):
            b = r.run(Q("UPDATE settings_v2 SET setting = 'a24_vault, public' "
                        "WHERE name = 'search_path'"))
            assert errors(b) and "pg_settings" in errors(b)[0]["M"], b
            time.sleep(6)
        a += b
        a += r.run(Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def test_view_over_pg_settings_cannot_turn_timeout_off(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24w")) as r:
        b = r.run(Q("SET statement_timeout = 0"))
        assert errors(b), b  # control: the policy blocks it
        r.run(Q("SET statement_timeout = '5s'"))
        a = r.run(Q("UPDATE settings_v SET setting = '0' WHERE name = 'statement_timeout'"))
        b = r.run(Q("SHOW statement_timeout"))
        rows = [body for t, body in b if t == b"D"]
        assert rows == [b"\x00\x01\x00\x00\x00\x025s"], (a, b)


def test_view_over_pg_settings_cannot_turn_read_only_off(kt: Keyturn,
                                                         pg: LocalPostgres) -> None:
    fresh_victim(pg, "a24_vault.victim1")
    with RawConn(kt.dsn("alice", dbname="a24wr")) as r:
        a = []
        try:
            a += r.run(Q("UPDATE settings_v SET setting = 'off' "
                         "WHERE name = 'default_transaction_read_only'"))
            a += r.run(Q("SELECT rb_run('DELETE FROM a24_vault.victim1')"))
        except ConnectionError:
            pass  # the gateway ended the session (guard_lost): safe
    assert victim_intact(pg, "a24_vault.victim1"), a


# -- The analyser parses with PostgreSQL 18's grammar, the target is 15: SQL/JSON syntax ------
# (json_scalar, json_serialize, json_value, json_array, merge_action(), ...) is a special node
# to the analyser, a plain call of a user function of that name to the target.


def test_control_user_function_call_is_blocked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(Q("SELECT rb_run('SELECT 1')"))
        assert errors(a), a


def test_json_scalar_user_function_cannot_read_the_vault(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(Q("SELECT json_scalar(1)"))
        assert not leaked(a), a


def test_json_serialize_user_function_cannot_write_the_vault(kt: Keyturn,
                                                             pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24w")) as r:
        a = r.run(Q("INSERT INTO inbox VALUES (json_serialize('a24-json'))"))
    assert direct(pg, "SELECT count(*) FROM a24_vault.victim2") == [(1,)], a


def test_merge_action_user_function_cannot_move_search_path(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(Q("SELECT merge_action()"))
        a += r.run(Q("SELECT s FROM secrets"))
        assert not leaked(a), a


def test_json_array_user_function_cannot_unmask(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        a = r.run(Q("SELECT json_array(1, 2)"))
        assert not leaked(a), a


# -- A sequence named by a string: currval and pg_sequence_last_value count it as read;
# setval / nextval change it.


def test_control_vault_write_blocked_under_broad_writes(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24ww")) as r:
        a = r.run(Q("INSERT INTO a24_vault.victim2 VALUES ('x')"))
        b = r.run(Q("SELECT currval('a24_vault.vseq')"))
        c = r.run(Q("INSERT INTO inbox VALUES ('a24-broad')"))
    assert errors(a) and errors(b) and not errors(c), (a, b, c)


def test_setval_of_a_vault_sequence_is_blocked(kt: Keyturn, pg: LocalPostgres) -> None:
    before = direct(pg, "SELECT last_value, is_called FROM a24_vault.vseq")
    with RawConn(kt.dsn("alice", dbname="a24ww")) as r:
        a = r.run(Q("SELECT setval('a24_vault.vseq', 424242)"))
        a += r.run(Q("SELECT nextval('a24_vault.vseq')"))
    after = direct(pg, "SELECT last_value, is_called FROM a24_vault.vseq")
    assert after == before, (before, after, a)


# -- TOAST: a long value of a table lives in its TOAST table (pg_toast.pg_toast_<oid>),
# which the table's owner may read directly.


def toast_of(r: RawConn, table: str) -> str:
    schema, name = table.split(".")
    a = r.run(Q("SELECT c.reltoastrelid::regclass::text FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE n.nspname = '{schema}' AND c.relname = '{name}'"))
    rows = [body for t, body in a if t == b"D"]
    assert rows, a
    return rows[0][6:].decode()


def test_control_masked_long_value_is_masked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        a = r.run(Q("SELECT body FROM pdocs"))
        assert not leaked(a) and any(t == b"D" for t, _ in a), a


def test_vault_value_cannot_be_read_from_its_toast_table(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        toast = toast_of(r, "a24_vault.docs")
        a = r.run(Q(f"SELECT encode(chunk_data, 'escape') FROM {toast}"))
        assert not leaked(a), (toast, a)


def test_masked_value_cannot_be_read_from_its_toast_table(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        toast = toast_of(r, "public.pdocs")
        a = r.run(Q(f"SELECT encode(chunk_data, 'escape') FROM {toast}"))
        assert not leaked(a), (toast, a)


# -- CASCADE reaches into the vault.


def test_truncate_cascade_cannot_empty_a_vault_table(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("TRUNCATE public.tparent CASCADE"))
    assert direct(pg, "SELECT count(*) FROM a24_vault.tchild") == [(1,)], a


def test_drop_type_cascade_cannot_drop_a_vault_column(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24dd")) as r:
        c = r.run(Q("ALTER TABLE a24_vault.moods ADD COLUMN x int"))
        assert errors(c), c  # control: the vault's schema is off limits
        a = r.run(Q("DROP TYPE public.mood CASCADE"))
    cols = direct(pg, "SELECT count(*) FROM information_schema.columns "
                      "WHERE table_schema = 'a24_vault' AND table_name = 'moods'")
    assert cols == [(2,)], a


def test_drop_table_cascade_cannot_change_a_vault_table(kt: Keyturn, pg: LocalPostgres) -> None:
    direct(pg, "CREATE TABLE IF NOT EXISTS public.tparent2 (id int PRIMARY KEY); "
               "CREATE TABLE IF NOT EXISTS a24_vault.tchild2 "
               "(pid int REFERENCES public.tparent2, v text)")
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("DROP TABLE public.tparent2 CASCADE"))
    fks = direct(pg, "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                     "AND conrelid = 'a24_vault.tchild2'::regclass")
    assert fks == [(1,)], a


def test_rename_of_the_vault_schema_is_blocked(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24dd")) as r:
        a = r.run(Q("ALTER SCHEMA a24_vault_b RENAME TO a24_loot"))
        a += r.run(Q("SELECT s FROM a24_loot.secrets"))
        assert not leaked(a), a


def test_drop_of_the_vault_schema_is_blocked(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24dd")) as r:
        a = r.run(Q("DROP SCHEMA a24_vault_c CASCADE"))
    assert direct(pg, "SELECT count(*) FROM pg_namespace WHERE nspname = 'a24_vault_c'") \
        == [(1,)], a


def test_renaming_a_type_value_cannot_change_vault_rows(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24dd")) as r:
        a = r.run(Q("ALTER TYPE public.level RENAME VALUE 'high' TO 'pwned'"))
    assert direct(pg, "SELECT l::text FROM a24_vault.levels") == [("high",)], a


def test_drop_trigger_on_a_vault_table_is_blocked(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24dd")) as r:
        a = r.run(Q("DROP TRIGGER guard_rows ON a24_vault.guarded"))
    assert direct(pg, "SELECT count(*) FROM pg_trigger WHERE tgname = 'guard_rows'") \
        == [(1,)], a


# -- Family 2: statements that must be refused outright under a read-only policy.

REFUSED = [
    "NOTIFY a24ch, 'x'",
    "SELECT pg_notify('a24ch', 'x')",
    "DO $$BEGIN DELETE FROM a24_vault.victim; END$$",
    "CALL public.commit_inside()",
    "COPY open_data TO PROGRAM 'cat > /dev/null'",
    "COPY open_data FROM PROGRAM 'echo pwned'",
    "COPY open_data TO '/tmp/a24-out.txt'",
    "SELECT lo_from_bytea(0, 'x'::bytea)",
    "SELECT lo_create(0)",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_terminate_backend(pg_backend_pid())",
    "SELECT pg_cancel_backend(1)",
    "SET statement_timeout = 0",
    "SET lock_timeout = '0ms'",
    "SET idle_in_transaction_session_timeout = 0",
    "SELECT set_config('statement_timeout', '0', false)",
    "RESET ALL",
    "SET ROLE app",
    "SET SESSION AUTHORIZATION app",
    "RESET SESSION AUTHORIZATION",
    "SET TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET default_transaction_read_only = off",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "RESET default_transaction_read_only",
    "SELECT pg_advisory_lock(24)",
    "SELECT nextval('a24_vault.vseq')",
    "PREPARE TRANSACTION 'a24'",
    "COMMIT PREPARED 'a24'",
    "SELECT pg_read_file('/etc/hostname')",
    "CREATE TABLE public.a24_new AS SELECT 1",
    "SELECT 1 INTO public.a24_new2",
    "EXPLAIN ANALYZE DELETE FROM open_data",
    "WITH d AS (DELETE FROM open_data RETURNING 1) SELECT 1",
    "SELECT * FROM pg_catalog.pg_stat_activity",
    "LOCK TABLE open_data",
    "DISCARD ALL",
    "SELECT setseed(0.5), set_config('role', 'app', false)",
]


def settled(r: RawConn) -> None:
    """Wait out the window after another test's DDL in which every statement of the
    target is judged as if the catalog were unread (documented), then check the client
    and the gateway are in step."""
    import time
    deadline = time.monotonic() + 20
    while errors(r.run(Q("SELECT 'probe'::text"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    in_step(r)


@pytest.mark.parametrize("sql", REFUSED)
def test_refused_under_read_only_policy(kt: Keyturn, pg: LocalPostgres, sql: str) -> None:
    before = direct(pg, "SELECT (SELECT count(*) FROM a24_vault.victim), "
                        "(SELECT count(*) FROM pg_largeobject_metadata), "
                        "(SELECT count(*) FROM open_data)")
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        settled(r)
        a = r.run(Q(sql))
        settled(r)
    after = direct(pg, "SELECT (SELECT count(*) FROM a24_vault.victim), "
                       "(SELECT count(*) FROM pg_largeobject_metadata), "
                       "(SELECT count(*) FROM open_data)")
    assert errors(a) and before == after, (a, before, after)


# -- Inheritance children in the vault of a public parent.


def test_delete_from_a_public_parent_does_not_reach_a_vault_child(kt: Keyturn,
                                                                  pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("DELETE FROM public.iparent"))
    assert direct(pg, "SELECT count(*) FROM a24_vault.ichild") == [(1,)], a


def test_truncate_of_a_public_parent_does_not_reach_a_vault_child(kt: Keyturn,
                                                                  pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("TRUNCATE public.iparent2"))
    assert direct(pg, "SELECT count(*) FROM a24_vault.ichild2") == [(1,)], a


def test_drop_cascade_of_a_public_parent_does_not_drop_a_vault_child(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a24d")) as r:
        a = r.run(Q("DROP TABLE public.iparent3 CASCADE"))
    assert direct(pg, "SELECT count(*) FROM pg_class WHERE relname = 'ichild3'") == [(1,)], a


def test_vault_sequence_value_is_not_readable_through_pg_sequences(kt: Keyturn,
                                                                   pg: LocalPostgres) -> None:
    direct(pg, "SELECT setval('a24_vault.vseq', 987654)")
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        c = r.run(Q("SELECT pg_sequence_last_value('a24_vault.vseq')"))
        assert errors(c), c  # control: the vault's sequence is blocked when named
        a = r.run(Q("SELECT sequencename, last_value FROM pg_sequences "
                    "WHERE schemaname = 'a24_vault'"))
    assert not any(t == b"D" and b"987654" in body for t, body in a), a


# -- Approval is given to what the reviewer saw; the catalog may change while it is held.


def test_approved_insert_does_not_run_a_trigger_added_while_held(kt: Keyturn,
                                                                 pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a24r")) as r, \
            RawConn(kt.dsn("alice", dbname="a24r")) as r2:
        r.send(Q("INSERT INTO rinbox VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE TRIGGER t24 BEFORE INSERT ON public.rinbox FOR EACH ROW "
                     "EXECUTE FUNCTION public.trig_run('DELETE FROM a24_vault.victim4')"))
        assert not errors(b), b  # the policy allows schema changes in public
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    assert direct(pg, "SELECT count(*) FROM a24_vault.victim4") == [(1,)], (held, ticket, a)


@pytest.mark.parametrize("sql", [
    "SELECT nick FROM people_v",
    "SELECT nick FROM people_mv",
    "SELECT upper(nick) FROM people_v",
    "COPY (SELECT nick FROM people_v) TO STDOUT",
    "COPY people_mv TO STDOUT",
    "SELECT * FROM people_mv",
    "TABLE people_v",
])
def test_masked_column_through_a_view_stays_masked(kt: Keyturn, sql: str) -> None:
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        a = r.run(Q(sql))
        assert not leaked(a) and not any(t == b"d" and b"zorblax" in body for t, body in a), a


LINEAGE_PROBES = [
    "SELECT upper(c) FROM people AS p(x, y, c)",
    "SELECT upper(b) FROM (SELECT id, nick FROM people) AS s(a, b)",
    "WITH w(a, b) AS (SELECT id, nick FROM people) SELECT upper(b) FROM w",
    "SELECT upper(x) FROM people_v AS v(i, x)",
    "SELECT upper(column2) FROM (VALUES (1, (SELECT nick FROM people LIMIT 1))) v",
    "SELECT upper(x) FROM people, LATERAL (SELECT nick) s(x)",
    "SELECT upper(u) FROM unnest(ARRAY(SELECT nick FROM people)) u",
    "SELECT upper((array_agg(nick))[1]) FROM people",
    "SELECT upper(x) FROM (SELECT 'a' UNION SELECT nick FROM people) s(x)",
    "WITH RECURSIVE r(x) AS (SELECT nick FROM people UNION ALL SELECT x FROM r WHERE false) "
    "SELECT upper(x) FROM r",
    "SELECT upper(nick COLLATE \"C\") FROM people",
    "SELECT upper((p.*).nick) FROM people p",
    "SELECT upper((people).nick) FROM people",
    "SELECT upper(t.n) FROM people, LATERAL (SELECT people.nick) t(n)",
    "SELECT upper(r[1]) FROM people, regexp_match(nick, '.*') r",
    "SELECT upper(m) FROM people, regexp_split_to_table(nick, ',') m",
    "SELECT upper(k) FROM people, string_to_table(nick, ',') k",
    "SELECT upper(x) FROM people CROSS JOIN LATERAL unnest(ARRAY[nick]) WITH ORDINALITY AS z(x, o)",
    "SELECT upper(x) FROM ROWS FROM (unnest(ARRAY(SELECT nick FROM people))) AS z(x)",
    "SELECT upper(nick) FROM people_v JOIN people USING (id, nick)",
    "SELECT upper(x) FROM (TABLE people_v) AS t(i, x)",
    "SELECT upper(grp) FROM (SELECT nick FROM people GROUP BY ROLLUP (nick)) AS g(grp)",
    "SELECT upper(x) FROM (SELECT DISTINCT ON (id) nick FROM people) AS d(x)",
    "SELECT upper(x) FROM (SELECT nick FROM people FOR SHARE) AS d(x)",
    "SELECT upper(first_value(nick) OVER ()) FROM people",
    "SELECT upper(lag(nick, 0) OVER w) FROM people WINDOW w AS (ORDER BY id)",
    "SELECT upper(max(nick) FILTER (WHERE id > 0)) FROM people",
    "SELECT upper(x) FROM people, "
    "LATERAL (SELECT nick FROM people q WHERE q.id = people.id) AS z(x)",
    "SELECT upper(x) FROM people p JOIN LATERAL (VALUES (p.nick)) AS z(x) ON true",
    "SELECT upper(x.nick) FROM (SELECT * FROM people) x",
    "SELECT upper(x.nick) FROM (SELECT * FROM people_v) x",
    "SELECT upper(y) FROM (SELECT *, nick AS y FROM people) x",
    "SELECT upper(coalesce(NULL, nick)) FROM people",
    "SELECT upper(greatest(nick, '')) FROM people",
    "SELECT upper(nullif(nick, '')) FROM people",
    "SELECT upper(CASE WHEN true THEN nick END) FROM people",
    "SELECT upper(v) FROM people, LATERAL (SELECT nick UNION ALL SELECT 'a') AS u(v)",
    "SELECT upper(x) FROM (SELECT * FROM people_v) AS t(i, x)",
    "SELECT upper(x) FROM (TABLE people) AS t(i, e, x)",
    "SELECT upper(x) FROM (SELECT * FROM people) AS t(i, e, x)",
    "SELECT upper(x) FROM people_v AS t(i, x)",
    "WITH w(i, x) AS (SELECT * FROM people_v) SELECT upper(x) FROM w",
    "WITH w(i, e, x) AS (SELECT * FROM people) SELECT upper(x) FROM w",
    "SELECT upper(x) FROM (SELECT * FROM people_mv) AS t(i, x)",
    "SELECT upper(x) FROM (SELECT p.* FROM people p) AS t(i, e, x)",
    "COPY (SELECT upper(x) FROM (SELECT * FROM people) AS t(i, e, x)) TO STDOUT",
    "SELECT upper(x) FROM (SELECT *, 1 FROM people) t(i, e, x)",
    "SELECT upper(x) FROM (SELECT id, * FROM people) t(a, i, e, x)",
    "SELECT upper(nick) FROM (SELECT * FROM people) t(i)",
    "SELECT upper(nick) FROM (SELECT * FROM (SELECT * FROM people) a) b",
    "SELECT upper(b.nick) FROM people AS b(id)",
    "SELECT upper(x) FROM (SELECT * FROM people) t(i, e, x) WHERE true",
    "SELECT upper(x) FROM (SELECT * FROM people ORDER BY 1) t(i, e, x)",
    "SELECT upper(x) FROM (people CROSS JOIN open_data) AS j(i, e, x, v)",
    "SELECT upper(j.nick) FROM (people CROSS JOIN open_data) AS j",
    "SELECT upper(u.nick) FROM people JOIN people_v USING (id, nick) AS u",
    "SELECT upper(x) FROM (SELECT * FROM people UNION ALL SELECT * FROM people) t(i, e, x)",
    "SELECT upper(t.x) FROM open_data, LATERAL (SELECT * FROM people) t(i, e, x)",
    "SELECT upper(x) FROM (SELECT nick FROM people) AS t(x)",
    "SELECT upper(x) FROM (SELECT p FROM people p) AS t(r), LATERAL (SELECT (t.r).nick) z(x)",
    "COPY (SELECT x FROM (SELECT * FROM people) AS t(i, e, x)) TO STDOUT",
    "COPY (SELECT * FROM (SELECT * FROM people) AS t(i, e, x)) TO STDOUT",
    "COPY (WITH w(i, e, x) AS (SELECT * FROM people) SELECT x FROM w) TO STDOUT",
    "COPY (SELECT x FROM (SELECT * FROM people) AS t(i, e, x)) TO STDOUT (FORMAT csv)",
    "WITH w AS (SELECT * FROM people) SELECT upper(nick) FROM w",
    "SELECT upper(x) FROM (SELECT * FROM people) AS t(i, e, x) LIMIT 1",
]


def test_masked_column_renamed_over_a_star_cannot_be_copied_out(kt: Keyturn) -> None:
    """INSERT … SELECT of a masked column renamed over * into an allowed table, then read
    the table back."""
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        a = r.run(Q("INSERT INTO inbox SELECT x FROM (SELECT * FROM people) AS t(i, e, x)"))
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a += r.run(Q("SELECT v FROM inbox"))
    assert not leaked(a), a


@pytest.mark.parametrize("sql", LINEAGE_PROBES)
def test_masked_lineage_probe(kt: Keyturn, sql: str) -> None:
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        a = r.run(Q(sql))
        assert not leaked(a) and not any(
            t == b"d" and (b"zorblax" in body.lower() or b"realperson" in body.lower())
            for t, body in a), a


def test_masked_columns_renamed_over_a_star_stay_masked(kt: Keyturn) -> None:
    """A derived table (or CTE) whose select list is * and whose columns are renamed by
    an alias list: an expression over a renamed masked column comes back unmasked."""
    with RawConn(kt.dsn("alice", dbname="a24m")) as r:
        c = r.run(Q("SELECT upper(nick), upper(email) FROM people"))
        assert not leaked(c) and any(t == b"D" for t, _ in c), c  # control: masked
        a = r.run(Q("SELECT upper(e), upper(x) FROM (SELECT * FROM people) AS t(i, e, x)"))
        a += r.run(Q("WITH w(i, e, x) AS (SELECT * FROM people) SELECT x || '', e || '' "
                     "FROM w"))
        assert not leaked(a), a


@pytest.mark.parametrize("name,value", [("standard_conforming_strings", "off"),
                                        ("client_encoding", "LATIN1"),
                                        ("client_encoding", "SQL_ASCII"),
                                        ("default_transaction_read_only", "off")])
def test_pg_settings_view_guard_changes_are_refused(kt: Keyturn, name: str,
                                                              value: str) -> None:
    with RawConn(kt.dsn("bob", dbname="a24w")) as other:
        in_step(other)
        with RawConn(kt.dsn("alice", dbname="a24w")) as r:
            a = r.run(Q(f"UPDATE settings_v SET setting = '{value}' WHERE name = '{name}'"))
            assert errors(a) and "pg_settings" in errors(a)[0]["M"], a  # refused
            b = r.run(Q(f"SELECT setting FROM pg_settings WHERE name = '{name}'"))
            rows = [body for t, body in b if t == b"D"]
            assert rows and all(not body.endswith(value.encode()) for body in rows), b
        in_step(other)


# -- Family 1: the shared statement namespace.

VAULT = "SELECT s FROM a24_vault.secrets"
DECOY = "SELECT 'decoy'::text"


def test_long_multibyte_names_share_a_key(kt: Keyturn) -> None:
    base = "\u00e4" * 31  # 62 bytes
    n1, n2 = base + "\u00f6x", base + "\u00f6y"  # same first 63 bytes (a cut character)
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(P(n1, VAULT), S())
        a += r.run(P(n2, DECOY), S())  # fails on the server: the name exists
        a += r.run(B("", n2), E(""), S())
        in_step(r)
        assert not leaked(a), a


def test_close_of_a_missing_name_then_parse_fails_then_bind(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(P("v", VAULT), S())
        a += r.run(close_statement("nope"), P("v", DECOY), B("", "v"), E(""), S())
        a += r.run(B("", "v"), E(""), S())
        in_step(r)
        assert not leaked(a), a


def test_sql_deallocate_in_a_batch_then_protocol_parse(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(P("v", VAULT), S())
        r.send(P("", "SELECT 1"), B("", ""), E(""), FLUSH)
        a += read_until(r, b"C")
        r.send(Q("DEALLOCATE ALL; SELECT 1/0"))
        a += drain(r, 1.0)
        a += r.run(P("v", DECOY), S())
        a += r.run(B("", "v"), E(""), S())
        in_step(r)
        assert not leaked(a), a


def test_sql_prepare_then_protocol_close_then_prepare_again(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(Q(f"PREPARE v AS {DECOY}"))
        a += r.run(close_statement("v"), P("v", VAULT), S())
        a += r.run(Q(f"DEALLOCATE v; PREPARE v AS {DECOY}"))
        a += r.run(Q("EXECUTE v"))
        a += r.run(B("", "v"), E(""), S())
        in_step(r)
        assert not leaked(a), a


def test_unnamed_statement_replaced_by_a_query(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a24plain")) as r:
        a = r.run(P("", DECOY), S())
        a += r.run(Q(VAULT))
        a += r.run(B("", ""), E(""), S())
        r.send(P("", VAULT), FLUSH)
        a += read_until(r, b"1")
        r.send(Q("SELECT 1"))
        a += drain(r, 1.0)
        a += r.run(S())
        a += r.run(B("", ""), E(""), S())
        in_step(r)
        assert not leaked(a), a
