"""Families from attack run 26 through the live gateway; each test asserts the safe
behaviour and checks the target directly.

- The approval re-check (hold and defer modes): a trigger's arguments, a second trigger
  on the same function, a default's arguments, a rule's action, or a helper function a
  trigger body calls changed while the write was held: the approved statement is refused
  (55000), since the re-check compares a digest of all user code stored on the target.
- A deferred re-run after the session's settings changed (search_path read by a trigger
  body), and a deferred EXECUTE whose prepared name was prepared again with another
  statement: refused or held anew.
- REFRESH MATERIALIZED VIEW runs its query's functions: they count like a SELECT's.
- ALTER FUNCTION (SET search_path, owner, SECURITY DEFINER...) of a function a vault
  trigger calls counts the vault table.
- Masked values in run-time name-lookup errors (regoper, regoperator, regclass, regtype,
  has_table_privilege): the error text is withheld.

And what held: masked values parked in settings, ~70 masking probes (cursors, PREPARE,
COPY forms, JOIN USING, reg* casts with quoted errors, VARIADIC...), malformed protocol
messages (each ends at most its own session).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from keyturn.launch.localpg import LocalPostgres
from proxies.postgres import codec
from tests.conftest import APP_PASSWORD, Keyturn, keyturn_on_database
from tests.pg_raw import (
    Q,
    RawConn,
    direct_on,
    drain,
    errors,
    masked_policy,
    read_until,
    vault_policy,
    vault_schema,
)
from tests.pg_raw import leaked as secret_leaked

DB = "atk26"
V = "a26_vault"

POLICIES = (vault_policy("a26", [V])
            + vault_policy("a26w", [V], """\
      - name: w
        match: {class: [write, ddl], tables: ["public.*"]}
        action: allow
""")
            + vault_policy("a26dd", [V], """\
      - name: d
        match: {class: [write, ddl]}
        action: allow
""")
            + vault_policy("a26rr", [V], """\
      - name: d
        match: {class: [ddl]}
        action: allow
      - name: w
        match: {class: [write]}
        action: review
        review: {approvers: [approvers], timeout: 10m}
""")
            + vault_policy("a26def", [V], """\
      - name: d
        match: {class: [ddl], tables: ["public.*"]}
        action: allow
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m, mode: defer}
""")
            + vault_policy("a26def2", [V], """\
      - name: d
        match: {class: [ddl]}
        action: allow
      - name: w
        match: {class: [write], tables: ["public.*"]}
        action: review
        review: {approvers: [approvers], timeout: 10m, mode: defer}
""")
            + masked_policy("a26m", [V], ["public.inbox"]))

SCHEMA = vault_schema(V) + f"""
CREATE TABLE public.inbox (v text);
CREATE FUNCTION public.trig_run() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN EXECUTE TG_ARGV[0]; RETURN NEW; END$$;
CREATE TABLE public.tbox1 (v text);
CREATE TRIGGER t1 BEFORE INSERT ON public.tbox1 FOR EACH ROW
  EXECUTE FUNCTION public.trig_run('SELECT 1');
CREATE TABLE {V}.victim1 (v text);
INSERT INTO {V}.victim1 VALUES ('keep me');
CREATE TABLE public.tbox2 (v text);
CREATE TRIGGER t2 BEFORE INSERT ON public.tbox2 FOR EACH ROW
  EXECUTE FUNCTION public.trig_run('SELECT 1');
CREATE TABLE {V}.victim2 (v text);
INSERT INTO {V}.victim2 VALUES ('keep me');
CREATE TABLE public.tbox3 (v text);
CREATE TRIGGER t3 BEFORE INSERT ON public.tbox3 FOR EACH ROW
  EXECUTE FUNCTION public.trig_run('SELECT 1');
CREATE TABLE {V}.victim3 (v text);
INSERT INTO {V}.victim3 VALUES ('keep me');
CREATE TABLE public.jobs (q text);
CREATE MATERIALIZED VIEW public.job_results AS SELECT public.rb_run(q) AS r FROM public.jobs
  WITH NO DATA;
CREATE TABLE {V}.victim4 (v text);
INSERT INTO {V}.victim4 VALUES ('keep me');
CREATE FUNCTION public.helper5() RETURNS void LANGUAGE sql AS $$ SELECT 1 $$;
CREATE FUNCTION public.t5_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN PERFORM public.helper5(); RETURN NEW; END$$;
CREATE TABLE public.tbox5 (v text);
CREATE TRIGGER t5 BEFORE INSERT ON public.tbox5 FOR EACH ROW EXECUTE FUNCTION public.t5_fn();
CREATE TABLE {V}.victim5 (v text);
INSERT INTO {V}.victim5 VALUES ('keep me');
CREATE TABLE public.rbox6 (v text);
CREATE TABLE public.rlog6 (v text);
INSERT INTO public.rlog6 VALUES ('keep me');
CREATE RULE r6 AS ON INSERT TO public.rbox6 DO ALSO INSERT INTO public.rlog6 VALUES (NEW.v);
CREATE TABLE public.dbox7 (v text, w text DEFAULT public.rb_run('SELECT 1'));
CREATE TABLE {V}.victim7 (v text);
INSERT INTO {V}.victim7 VALUES ('keep me');
CREATE TABLE public.pbox8 (v text);
INSERT INTO public.pbox8 VALUES ('keep me'), ('approved to go');
CREATE TABLE public.queue9 (v text);
CREATE TABLE {V}.queue9 (v text);
INSERT INTO {V}.queue9 VALUES ('keep me');
CREATE FUNCTION public.t9_fn() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN DELETE FROM queue9; RETURN NEW; END$$;
CREATE TABLE public.tbox9 (v text);
CREATE TRIGGER t9 BEFORE INSERT ON public.tbox9 FOR EACH ROW EXECUTE FUNCTION public.t9_fn();
CREATE FUNCTION public.deletes_allowed() RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
CREATE FUNCTION public.v10_guard() RETURNS trigger LANGUAGE plpgsql AS
  $$BEGIN IF NOT deletes_allowed() THEN RAISE EXCEPTION 'vault rows are kept'; END IF;
  RETURN OLD; END$$;
CREATE TABLE {V}.victim10 (v text);
INSERT INTO {V}.victim10 VALUES ('keep me');
CREATE TRIGGER v10 BEFORE DELETE ON {V}.victim10 FOR EACH ROW
  EXECUTE FUNCTION public.v10_guard();
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
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("a26"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={
                                "a26plain": "policy: a26",
                                "a26w": "policy: a26w",
                                "a26dd": "policy: a26dd",
                                "a26rr": "policy: a26rr",
                                "a26def": "policy: a26def",
                                "a26def2": "policy: a26def2",
                                "a26m": "policy: a26m" + MASKED_COLUMNS})
    k.start()
    yield k
    k.stop()


def settle(r: RawConn) -> None:
    deadline = time.monotonic() + 20
    while errors(r.run(Q("SELECT 'probe'::text"))) and time.monotonic() < deadline:
        time.sleep(0.5)


# -- F: re-check identifies triggers by function only

def test_held_insert_trigger_arguments_swapped_while_held(kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a26rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a26rr")) as r2:
        r.send(Q("INSERT INTO public.tbox1 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE OR REPLACE TRIGGER t1 BEFORE INSERT ON public.tbox1 FOR EACH ROW "
                     f"EXECUTE FUNCTION public.trig_run('DELETE FROM {V}.victim1')"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F1", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim1") == [(1,)], (held, b, a)


def test_refresh_matview_runs_user_code_unseen(kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a26w")) as r:
        c = r.run(Q("SELECT public.rb_run(q) FROM public.jobs"))
        a = r.run(Q(f"INSERT INTO public.jobs VALUES ('DELETE FROM {V}.victim4')"))
        a += r.run(Q("REFRESH MATERIALIZED VIEW public.job_results"))
    print("F4", c, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim4") == [(1,)], (c, a)


def test_held_insert_helper_replaced_while_held(kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a26rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a26rr")) as r2:
        r.send(Q("INSERT INTO public.tbox5 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE OR REPLACE FUNCTION public.helper5() RETURNS void LANGUAGE sql AS "
                     f"$$ DELETE FROM {V}.victim5 $$"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F5", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim5") == [(1,)], (held, b, a)


@pytest.mark.parametrize("sql", [
    "SELECT set_config('a26.x', nick, false) IS NULL FROM people WHERE id = 1; ",
    "SELECT set_config('application_name', nick, false) IS NULL FROM people WHERE id = 1",
])
# held
def test_mask_via_setting(kt: Keyturn, sql: str) -> None:
    with RawConn(kt.dsn("alice", dbname="a26m")) as r:
        a = r.run(Q(sql))
        a += r.run(Q("SELECT current_setting('a26.x', true), current_setting('application_name')"))
        a += r.run(Q("SHOW application_name"))
        print("MS", a)
        assert not leaked(a), a


def test_held_insert_second_trigger_same_function_added_while_held(
        kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a26rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a26rr")) as r2:
        r.send(Q("INSERT INTO public.tbox2 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE TRIGGER t2b BEFORE INSERT ON public.tbox2 FOR EACH ROW "
                     f"EXECUTE FUNCTION public.trig_run('DELETE FROM {V}.victim2')"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F2", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim2") == [(1,)], (held, b, a)


def _defer_approve(kt: Keyturn, r: RawConn, sql: str) -> list:
    kt.skip_pending()
    a = r.run(Q(sql))
    assert errors(a), a  # deferred: an error naming the ticket
    ticket = kt.wait_ticket()
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    time.sleep(1.5)
    return a


def test_deferred_insert_trigger_arguments_swapped_after_approval(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a26def2")) as r, \
            RawConn(kt.dsn("alice", dbname="a26def2")) as r2:
        a = _defer_approve(kt, r, "INSERT INTO public.tbox3 VALUES ('benign')")
        b = r2.run(Q("CREATE OR REPLACE TRIGGER t3 BEFORE INSERT ON public.tbox3 FOR EACH ROW "
                     f"EXECUTE FUNCTION public.trig_run('DELETE FROM {V}.victim3')"))
        time.sleep(2)
        a += r.run(Q("INSERT INTO public.tbox3 VALUES ('benign')"))
    print("F3", a, b)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim3") == [(1,)], (a, b)


def test_held_insert_rule_action_swapped_while_held(kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a26rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a26rr")) as r2:
        r.send(Q("INSERT INTO public.rbox6 VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("CREATE OR REPLACE RULE r6 AS ON INSERT TO public.rbox6 "
                     "DO ALSO DELETE FROM public.rlog6"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F6", held, b, a)
    assert direct(pg, "SELECT count(*) FROM public.rlog6 WHERE v = 'keep me'") == [(1,)], \
        (held, b, a)


def test_held_insert_default_arguments_swapped_while_held(kt: Keyturn, pg: LocalPostgres) -> None:
    kt.skip_pending()
    with RawConn(kt.dsn("alice", dbname="a26rr")) as r, \
            RawConn(kt.dsn("alice", dbname="a26rr")) as r2:
        r.send(Q("INSERT INTO public.dbox7 (v) VALUES ('benign')"))
        held = read_until(r, b"N")
        ticket = kt.wait_ticket()
        b = r2.run(Q("ALTER TABLE public.dbox7 ALTER COLUMN w SET DEFAULT "
                     f"public.rb_run('DELETE FROM {V}.victim7')"))
        time.sleep(1)
        kt.cli("approve", str(ticket["id"]), token_of="bob")
        a = r.until_ready()
    print("F7", held, b, a)
    assert direct(pg, f"SELECT count(*) FROM {V}.victim7") == [(1,)], (held, b, a)


def test_deferred_execute_of_a_prepared_name_redefined_after_approval(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a26def")) as r:
        p = r.run(Q("PREPARE p8 AS DELETE FROM public.pbox8 WHERE v = 'approved to go'"))
        a = _defer_approve(kt, r, "EXECUTE p8")
        a += r.run(Q("DEALLOCATE p8"))
        a += r.run(Q("PREPARE p8 AS DELETE FROM public.pbox8"))
        a += r.run(Q("EXECUTE p8"))
    print("F8", p, a)
    assert direct(pg, "SELECT count(*) FROM public.pbox8 WHERE v = 'keep me'") == [(1,)], (p, a)


def test_deferred_insert_rerun_after_search_path_moved_trigger_body(
        kt: Keyturn, pg: LocalPostgres) -> None:
    with RawConn(kt.dsn("alice", dbname="a26def2")) as r:
        a = _defer_approve(kt, r, "INSERT INTO public.tbox9 VALUES ('benign')")
        a += r.run(Q(f"SET search_path = {V}, public"))
        a += r.run(Q("INSERT INTO public.tbox9 VALUES ('benign')"))
    print("F9", a)
    assert direct(pg, f"SELECT count(*) FROM {V}.queue9") == [(1,)], a


MASK_PROBES = [
    ["BEGIN", "DECLARE c CURSOR FOR SELECT nick, email FROM people", "FETCH ALL FROM c",
     "COMMIT"],
    ["DECLARE c2 CURSOR WITH HOLD FOR SELECT nick FROM people", "FETCH ALL FROM c2"],
    ["BEGIN", "DECLARE c3 SCROLL CURSOR FOR SELECT * FROM people", "FETCH ALL FROM c3",
     "FETCH BACKWARD ALL FROM c3", "COMMIT"],
    ["PREPARE q1 AS SELECT nick FROM people", "EXECUTE q1"],
    ["PREPARE q2(int) AS SELECT email FROM people WHERE id = $1", "EXECUTE q2(1)"],
    ["COPY people TO STDOUT"],
    ["COPY people (nick) TO STDOUT"],
    ["COPY (TABLE people) TO STDOUT WITH (FORMAT csv, HEADER)"],
    ["COPY people TO STDOUT WITH (FORMAT binary)"],
    ["SELECT nick FROM people p1 JOIN people p2 USING (nick)"],
    ["SELECT * FROM people p1 FULL JOIN people p2 USING (id, email, nick)"],
    ["SELECT * FROM people NATURAL JOIN people"],
    ["SELECT j.nick FROM (people p1 JOIN people p2 USING (nick)) AS j"],
    ["SELECT (p).* FROM people p"],
    ["SELECT x.* FROM (TABLE people) x"],
    ["SELECT 1, 'a', 'b' WHERE false UNION ALL SELECT id, nick, email FROM people"],
    ["SELECT nick::varchar(3) FROM people"],
    ["SELECT nick::\"char\" FROM people"],
    ["SELECT nick COLLATE \"C\" FROM people"],
    ["SELECT GREATEST(nick, '') FROM people"],
    ["SELECT COALESCE(nick, 'x') FROM people"],
    ["SELECT * FROM people TABLESAMPLE SYSTEM (100)"],
    ["WITH x AS MATERIALIZED (SELECT nick FROM people) SELECT * FROM x"],
    ["SELECT * FROM json_to_recordset((SELECT json_agg(p) FROM people p)) AS x(nick text)"],
    ["SELECT * FROM regexp_split_to_table((SELECT string_agg(nick, ',') FROM people), ',')"],
    ["SELECT * FROM XMLTABLE('/a' PASSING (SELECT xmlelement(name a, nick) FROM people "
     "LIMIT 1) COLUMNS x text PATH '.')"],
    ["SELECT ARRAY[p] FROM people p"],
    ["SELECT (ARRAY[p])[1].nick FROM people p"],
    ["SELECT row(p.*)::text FROM people p"],
    ["SELECT to_json(p.*) ->> 'nick' FROM people p"],
    ["SELECT nick FROM people EXCEPT SELECT ''"],
    ["SELECT string_agg(nick, ',') FILTER (WHERE true) FROM people"],
    ["SELECT * FROM unnest(ARRAY(SELECT nick FROM people)) WITH ORDINALITY"],
    ["SELECT * FROM ROWS FROM (unnest(ARRAY(SELECT nick FROM people)))"],
    ["SELECT nick::regnamespace FROM people"],
    ["SELECT nick::regconfig FROM people"],
    ["SELECT nick::regrole FROM people"],
    ["SELECT 1 FROM people WHERE nick::regoper IS NULL"],
    ["SELECT (nick || '()')::regprocedure FROM people"],
    ["SELECT has_function_privilege(nick || '()', 'execute') FROM people"],
    ["SELECT current_setting('x.\"\"' || nick) FROM people"],
    ["SELECT nick::regprocedure FROM people"],
    ["SELECT nick::pg_lsn FROM people"],
    ["SELECT nick::aclitem FROM people"],
    ["SELECT nick::int4range FROM people"],
    ["SELECT nick::tid FROM people"],
    ["SELECT 1; SELECT nick FROM people"],
    ["SELECT nick FROM people WHERE id = 1 \\; SELECT 2"],
    ["VALUES ((SELECT nick FROM people LIMIT 1))"],
    ["SELECT * FROM (VALUES (1)) v(a), LATERAL (SELECT nick FROM people) s"],
    ["SELECT ts_debug('simple', nick)::text FROM people"],
    ["SELECT * FROM ts_debug('simple', (SELECT string_agg(nick, ' ') FROM people))"],
    ["SELECT ts_lexize('simple_dict', nick) FROM people"],
    ["SELECT * FROM ts_parse('default', (SELECT string_agg(nick, ' ') FROM people))"],
    ["SELECT * FROM ts_token_type('default'), people WHERE false"],
    ["SELECT setweight(to_tsvector('simple', nick), 'A')::text FROM people"],
    ["SELECT strip(to_tsvector('simple', nick))::text FROM people"],
    ["SELECT tsvector_to_array(to_tsvector('simple', nick)) FROM people"],
    ["SELECT * FROM unnest(to_tsvector('simple', (SELECT string_agg(nick, ' ') FROM people)))"],
    ["SELECT querytree(plainto_tsquery('simple', nick)) FROM people"],
    ["SELECT numnode(plainto_tsquery('simple', nick)), plainto_tsquery('simple', nick)::text "
     "FROM people"],
    ["SELECT * FROM generate_series(1, 1) g, LATERAL unnest(ARRAY(SELECT email FROM people)) e"],
    ["SELECT array_agg(nick)::text FROM people"],
    ["SELECT nick FROM people WHERE nick = ANY(SELECT nick FROM people)"],
    ["SELECT (SELECT array_agg(x) FROM unnest(ARRAY(SELECT nick FROM people)) x)"],
    ["SELECT pg_catalog.concat_ws(',', VARIADIC ARRAY(SELECT nick FROM people))"],
    ["SELECT format('%s', VARIADIC ARRAY(SELECT nick FROM people))"],
    ["SELECT jsonb_build_object(VARIADIC ARRAY(SELECT nick FROM people))::text"],
    ["SELECT json_object(ARRAY(SELECT nick FROM people), ARRAY(SELECT email FROM people))::text"],
]


@pytest.mark.parametrize("sqls", MASK_PROBES)
# held (all but the ones moved to test_masked_value_in_a_name_lookup_error)
def test_mask_probe26(kt: Keyturn, sqls: list[str]) -> None:
    with RawConn(kt.dsn("alice", dbname="a26m")) as r:
        a = []
        for sql in sqls:
            a += r.run(Q(sql))
        print("MP", sqls, [x for x in a if x[0] in (b"D", b"d", b"E")][:4])
        assert not leaked(a), a


def test_alter_function_of_a_vault_trigger_is_blocked(kt: Keyturn, pg: LocalPostgres) -> None:
    """CREATE OR REPLACE of a vault trigger's function is blocked (run 25); ALTER FUNCTION
    ... SET search_path changes what its body calls just as well."""
    with RawConn(kt.dsn("alice", dbname="a26dd")) as r:
        c = r.run(Q("CREATE OR REPLACE FUNCTION public.v10_guard() RETURNS trigger "
                    "LANGUAGE plpgsql AS $$BEGIN RETURN OLD; END$$"))
        assert errors(c), c  # control (run 25's fix)
        a = r.run(Q("CREATE SCHEMA a26_evil"))
        a += r.run(Q("CREATE FUNCTION a26_evil.deletes_allowed() RETURNS boolean "
                     "LANGUAGE sql AS $$ SELECT true $$"))
        a += r.run(Q("ALTER FUNCTION public.v10_guard() SET search_path = a26_evil, public"))
    print("F10", a)
    cfg = direct(pg, "SELECT proconfig FROM pg_proc WHERE proname = 'v10_guard'")
    assert cfg == [(None,)], (a, cfg)


def _other_client_ok(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="a26plain")) as r:
        a = r.run(Q("SELECT 'alive'::text"))
        assert any(t == b"D" and body.endswith(b"alive") for t, body in a), a


@pytest.mark.parametrize("msgs", [
    [codec.encode_message(b"B", b"\0\0" + b"\xff\xff" + b"\0\0" + b"\0\0")],
    [codec.encode_message(b"B", b"\0\0\0\0\0\x01\x7f\xff\xff\xff")],
    [codec.encode_message(b"P", b"\0SELECT 1\0" + b"\xff\xff" + b"\0\0\0\x19" * 10)],
    [codec.encode_message(b"D", b"Xfoo\0")],
    [codec.encode_message(b"C", b"Zfoo\0")],
    [codec.encode_message(b"E", b"\0\xff\xff\xff\xff")],
    [codec.encode_message(b"d", b"junk"), codec.encode_message(b"c", b"")],
    [codec.encode_message(b"f", b"nope\0")],
    [codec.encode_message(b"p", b"token\0")],
    [codec.encode_message(b"E", b"x" * 100000 + b"\0\0\0\0\0")],
    [codec.encode_message(b"P", b"s1\0SELECT 1\0\0\0"), codec.encode_message(b"B",
     b"\0s1\0\0\0\0\0\0\x01\0\0"), codec.encode_message(b"E", b"\0\0\0\0\0"),
     codec.encode_sync()],
    [codec.encode_message(b"P", b"\0SELECT $1::text\0\0\x01\0\0\0\x19"),
     codec.encode_message(b"B", b"\0\0\0\x01\0\x01\0\x01\xff\xff\xff\xfe"),
     codec.encode_message(b"E", b"\0\0\0\0\0"), codec.encode_sync()],
    [codec.encode_message(b"P", b"\0SELECT $1::text\0\0\x01\0\0\0\x19"),
     codec.encode_message(b"B", b"\0\0\0\x01\0\x01\0\x01\x00\x00\x00\x10ab"),
     codec.encode_message(b"E", b"\0\0\0\0\0"), codec.encode_sync()],
    [codec.encode_message(b"Q", b"SELECT 1")],
    [codec.encode_message(b"Q", b"\0\0\0")],
    [codec.encode_message(b"Q", b"SELECT '\xff\xfe'\0")],
    [codec.encode_message(b"P", b"\0SELECT '\xc3'\0\0\0"), codec.encode_sync()],
])
# held
def test_malformed_messages_do_not_stop_the_gateway(kt: Keyturn, msgs: list) -> None:
    """held: malformed or odd messages end at most their own session."""
    with RawConn(kt.dsn("alice", dbname="a26plain")) as r:
        r.send(*msgs, codec.encode_sync(), Q("SELECT 1"))
        out = drain(r, 2)
    print("PROTO", out[-3:])
    _other_client_ok(kt)


@pytest.mark.parametrize("sql", [
    "SELECT nick::regoper FROM people",
    "SELECT (nick || '(int,int)')::regoperator FROM people",
    "SELECT ('\"x\"\"' || nick || '\"')::regclass FROM people",
    "SELECT ('\"x\"\"' || nick || '\"')::regtype FROM people",
    "SELECT has_table_privilege('\"x\"\"' || nick || '\"', 'SELECT') FROM people",
])
def test_masked_value_in_a_name_lookup_error(kt: Keyturn, sql: str) -> None:
    """FINDING: errors of the SQLSTATE classes the masker lets through (42xxx: "raised
    before any row is read") are raised at run time by reg* input functions fed a masked
    value; the value is printed unquoted (regoper/regoperator) or inside double quotes
    that the value itself can break ("x""<value>"), past the '"[^"]*"' redaction."""
    with RawConn(kt.dsn("alice", dbname="a26m")) as r:
        c = r.run(Q("SELECT nick FROM people"))
        assert not leaked(c) and any(t == b"D" for t, _ in c), c  # control: masked
        a = r.run(Q(sql))
        assert not any(t == b"E" and b"zorblax" in body for t, body in a), a
