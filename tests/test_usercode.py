"""The target-catalog model (keyturn.analysis.pgcatalog) and judging statements by the
user code they run (keyturn.analysis.usercode): rows in, classes out, no database."""

from __future__ import annotations

from typing import Any

import pytest

from keyturn.analysis import Analyzer, Statement, StatementClass
from keyturn.analysis.pgcatalog import TargetCatalog
from keyturn.analysis.postgres import ANY_OBJECT
from keyturn.analysis.usercode import MAX_DEPTH, Scope, resolve

C = StatementClass
AN = Analyzer()


def fn(schema: str, name: str, *, kind: str = "f", volatility: str = "v",
       language: str = "plpgsql", definer: bool = False,
       extension: str | None = None) -> tuple[Any, ...]:
    return (schema, name, kind, volatility, language, definer, extension)


def catalog(**rows: Any) -> TargetCatalog:
    rows.setdefault("user", "app")
    rows.setdefault("search_path", '"$user", public')
    return TargetCatalog.from_rows(**rows)


def judge(sql: str, cat: TargetCatalog | None, *, schemas: tuple[str, ...] = ("public",),
          created: dict[tuple[str, str], tuple[str, ...]] | None = None,
          unavailable: str | None = None) -> Statement:
    (st,) = AN.analyze(sql).statements
    return resolve(AN, st, cat, Scope(frozenset(schemas), created or {}, unavailable))


LOCKER = catalog(routines=[fn("public", "upper"), fn("public", "lockit"),
                           fn("public", "sum", kind="a"), fn("public", "fullname"),
                           fn("public", "generate_series"), fn("public", "make_interval"),
                           fn("evil", "now"), fn("app", "lower"),
                           fn("public", "citext_upper", volatility="i", language="c",
                              extension="citext")])


@pytest.mark.parametrize("sql", [
    "SELECT upper(name) FROM customers",              # overloading a built-in name
    "SELECT sum(total) FROM orders",                  # a user aggregate
    "SELECT * FROM generate_series(1, 3)",            # a set-returning function in FROM
    "SELECT make_interval(days => 1)",                # named arguments
    "SELECT c.fullname FROM customers c",             # attribute notation calls fullname(c)
    "SELECT (c).fullname FROM customers c",
    "SELECT lower('x')",                              # "$user" (app) is on the default path
])
def test_a_user_function_under_a_built_in_name_is_an_unknown_function(sql: str) -> None:
    plain = judge(sql, None or catalog())
    assert plain.cls in (C.READ, C.SESSION)
    st = judge(sql, LOCKER)
    assert st.cls is C.WRITE, st.reasons
    assert any("user-defined" in r for r in st.reasons)


def test_a_schema_before_pg_catalog_counts_only_when_the_session_may_name_it() -> None:
    assert judge("SELECT now()", LOCKER).cls is C.READ
    st = judge("SELECT now()", LOCKER, schemas=("evil", "pg_catalog", "public"))
    assert st.cls is C.WRITE and "evil.now" in st.functions
    assert judge("SELECT now()", LOCKER, schemas=("*",)).cls is C.WRITE
    assert judge("SELECT pg_catalog.now()", LOCKER, schemas=("evil",)).cls is C.READ


def test_extension_code_that_is_vetted_stays_a_read() -> None:
    cat = catalog(routines=[fn("public", "upper", volatility="i", language="c",
                               extension="citext")])
    assert judge("SELECT upper(name) FROM customers", cat).cls is C.READ
    definer = catalog(routines=[fn("public", "upper", volatility="i", extension="citext",
                                   definer=True)])
    assert judge("SELECT upper(name) FROM customers", definer).cls is C.WRITE


def test_the_unknown_functions_setting_decides_the_class() -> None:
    an = Analyzer(unknown_function_class=C.ADMIN)
    (st,) = an.analyze("SELECT upper('x')").statements
    assert resolve(an, st, LOCKER, Scope()).cls is C.ADMIN


OPS = catalog(routines=[fn("public", "add_lock")],
              operators=[("public", "+", "public", "add_lock"),
                         ("public", "=", "public", "add_lock")])


@pytest.mark.parametrize("sql", [
    "SELECT a + b FROM t", "SELECT * FROM t WHERE a IN (1, 2)",
    "SELECT * FROM t WHERE a BETWEEN 1 AND 2", "SELECT CASE a WHEN 1 THEN 2 END FROM t",
    "SELECT * FROM t WHERE a = ANY (ARRAY[1])", "SELECT a IS DISTINCT FROM b FROM t",
    "SELECT NULLIF(a, b) FROM t", "SELECT * FROM t WHERE a IN (SELECT 1)",
    "SELECT a OPERATOR(public.+) b FROM t",
])
def test_operators_with_user_functions_are_unknown_functions(sql: str) -> None:
    if "BETWEEN" in sql:
        cat = catalog(routines=[fn("public", "ge")], operators=[("public", ">=", "public", "ge")])
    else:
        cat = OPS
    st = judge(sql, cat)
    assert st.cls is C.WRITE, (sql, st.reasons)
    assert any(f.startswith("public.") for f in st.functions)


def test_operators_without_user_code_stay_reads() -> None:
    assert judge("SELECT a - b FROM t WHERE a < 3", OPS).cls is C.READ


def test_casts_to_types_with_user_code() -> None:
    cat = catalog(routines=[fn("public", "to_mine")],
                  type_code=[("public", "mytype", "a cast", "public", "to_mine")],
                  type_bases=[("public", "mydomain", "public", "mytype")])
    assert judge("SELECT 'x'::mytype", cat).cls is C.WRITE
    assert judge("SELECT CAST('x' AS public.mydomain)", cat).cls is C.WRITE
    assert judge("SELECT 'x'::text", cat).cls is C.READ


def test_views_are_judged_by_their_definition_recursively() -> None:
    cat = catalog(routines=[fn("public", "lockit")], views=[
        ("public", "v_lock", "SELECT public.lockit() AS x"),
        ("public", "v_outer", " SELECT x FROM public.v_lock"),
        ("public", "v_plain", " SELECT id FROM vault.secrets"),
    ])
    st = judge("SELECT * FROM v_outer", cat)
    assert st.cls is C.WRITE and "public.lockit" in st.functions
    assert any("view public.v_lock" in r for r in st.reasons)
    plain = judge("SELECT * FROM v_plain", cat)
    assert plain.cls is C.READ and "vault.secrets" in plain.tables  # policy sees the base


def test_a_view_chain_deeper_than_the_limit_is_unknown() -> None:
    views = [("public", f"v{i}", f"SELECT * FROM public.v{i + 1}") for i in range(MAX_DEPTH + 2)]
    st = judge("SELECT * FROM v0", catalog(views=views))
    assert st.cls is C.UNKNOWN


def test_rules_and_write_code_count_for_writes_only() -> None:
    cat = catalog(routines=[fn("public", "audit_lock")], rules=[
        ("public", "t", "3", "CREATE RULE r AS ON INSERT TO public.t DO ALSO "
                             "DELETE FROM public.victim"),
        ("public", "n", "3", "CREATE RULE r AS ON INSERT TO public.n DO ALSO NOTIFY ch"),
    ], relation_code=[("public", "w", "trigger tw", "public", "audit_lock", False),
                      ("public", "p", "a row security policy", "public", "audit_lock", True)])
    assert judge("SELECT * FROM t", cat).cls is C.READ
    st = judge("INSERT INTO t VALUES (1)", cat)
    assert "public.victim" in st.tables and any("rule on public.t" in r for r in st.reasons)
    assert any("NOTIFY" in r for r in judge("INSERT INTO n VALUES (1)", cat).reasons)
    assert "public.audit_lock" in judge("UPDATE w SET a = 1", cat).functions
    assert judge("SELECT * FROM w", cat).cls is C.READ
    assert judge("SELECT * FROM p", cat).cls is C.WRITE  # policies run on reads


def test_columns_of_types_with_user_code() -> None:
    cat = catalog(routines=[fn("public", "cmp")],
                  type_code=[("public", "mytype", "an operator class", "public", "cmp")],
                  typed_columns=[("public", "t", "m", "public", "mytype")])
    st = judge("SELECT DISTINCT m FROM t", cat)
    assert st.cls is C.WRITE and "public.cmp" in st.functions


def test_what_the_session_created_counts_before_the_catalog_shows_it() -> None:
    cat = catalog()
    created: dict[tuple[str, str], tuple[str, ...]] = {("f", "upper"): (), ("o", "+"): ()}
    assert judge("SELECT upper('x')", cat, created=created).cls is C.WRITE
    assert judge("SELECT 1 + 1", cat, created=created).cls is C.WRITE
    view = {("r", "v"): ("CREATE VIEW v AS SELECT pg_advisory_lock(1)",)}
    assert judge("SELECT * FROM v", cat, created=view).cls is C.LOCK


def test_without_a_catalog_everything_outside_pg_catalog_may_be_user_code() -> None:
    st = judge("SELECT now()", None, unavailable="connection refused")
    assert st.cls is C.WRITE and "connection refused" in st.reasons[0]
    assert judge("SELECT * FROM customers", None, unavailable="down").cls is C.WRITE
    assert judge("SELECT 1", None, unavailable="down").cls is C.READ
    assert judge("SELECT pg_catalog.now()", None, unavailable="down").cls is C.READ


def test_catalog_model_answers() -> None:
    assert LOCKER.schemas({"public", "$user"}) == {"public", "app"}
    assert [r.qualified for r in LOCKER.functions("now", frozenset({"evil"}))] == ["evil.now"]
    assert LOCKER.functions("now", frozenset({"public"})) == []
    assert LOCKER.routine("public.citext_upper") is not None
    assert LOCKER.routine("public.citext_upper").vetted  # type: ignore[union-attr]
    same = catalog(routines=[fn("public", "upper"), fn("public", "lockit"),
                             fn("public", "sum", kind="a"), fn("public", "fullname"),
                             fn("public", "generate_series"), fn("public", "make_interval"),
                             fn("evil", "now"), fn("app", "lower"),
                             fn("public", "citext_upper", volatility="i", language="c",
                                extension="citext")][::-1])
    assert same.fingerprint == LOCKER.fingerprint  # row order does not matter
    assert catalog().fingerprint != LOCKER.fingerprint


def test_statements_record_what_they_define() -> None:
    def defines(sql: str) -> tuple[tuple[str, str, str], ...]:
        return AN.analyze(sql).statements[0].defines

    assert defines("CREATE FUNCTION public.upper(int) RETURNS int LANGUAGE sql "
                   "AS 'SELECT 1'") == (("f", "public", "upper"),)
    assert defines("CREATE OPERATOR + (leftarg = mytype, function = f)") == (("o", "", "+"),)
    assert defines("CREATE AGGREGATE sum(mytype) (sfunc = f, stype = int)") == \
        (("f", "", "sum"),)
    assert defines("CREATE RULE r AS ON INSERT TO t DO ALSO NOTIFY c") == (("r", "", "t"),)
    assert defines("ALTER FUNCTION f(int) RENAME TO upper") == (("f", "", "upper"),)
    assert defines("CREATE CAST (mytype AS int) WITH FUNCTION f(mytype)") == \
        (("t", "", "mytype"), ANY_OBJECT)
    # What changes existing relations or built-in types in ways not followed by name.
    assert ANY_OBJECT in defines("CREATE CAST (date AS int) WITH FUNCTION f(date)")
    assert ANY_OBJECT in defines("ALTER TABLE vault.kid INHERIT public.parent_t")
    assert defines("CREATE TABLE kid () INHERITS (parent)") == (ANY_OBJECT,)
    assert defines("CREATE OPERATOR CLASS c FOR TYPE box USING btree AS OPERATOR 1 <") == \
        (ANY_OBJECT,)
    assert defines("CREATE TABLE plain (id int)") == ()
    assert defines("SELECT 1") == ()


def test_too_large_or_too_many_statements_is_unknown_and_quick() -> None:
    import time

    from keyturn.analysis.postgres import MAX_ANALYSED_TEXT, MAX_STATEMENTS

    an = Analyzer()
    started = time.perf_counter()
    huge = an.analyze("SELECT * FROM t WHERE id IN (" + ",".join(map(str, range(200_000))) + ")")
    assert huge.cls is C.UNKNOWN and "too large" in (huge.error or "")
    many = an.analyze("SELECT 1;" * (MAX_STATEMENTS + 1))
    assert many.cls is C.UNKNOWN and "statements" in (many.error or "")
    deep = an.analyze("SELECT " + "abs(" * 3000 + "1" + ")" * 3000)
    assert deep.cls is C.UNKNOWN
    assert time.perf_counter() - started < 2
    ok = "SELECT * FROM t WHERE id IN (" + ",".join(map(str, range(30_000))) + ")"
    assert len(ok) < MAX_ANALYSED_TEXT and an.analyze(ok).cls is C.READ


HOOKED = catalog(routines=[fn("public", "m2t"), fn("public", "d2i"), fn("public", "icmp")],
                 hooks=[("an implicit cast from macaddr to text", "public", "m2t")])


@pytest.mark.parametrize("sql", ["SELECT 1", "SELECT * FROM orders", "VALUES (1)",
                                 "INSERT INTO t VALUES (1)",
                                 "SELECT set_config('a.b', 'c', false)"])
def test_code_any_statement_may_run_is_judged_on_every_statement(sql: str) -> None:
    st = judge(sql, HOOKED)
    assert st.cls is C.WRITE, st.reasons
    assert "public.m2t" in st.functions and "public.m2t" in st.opaque
    assert any("implicit cast from macaddr to text" in r for r in st.reasons)


@pytest.mark.parametrize("sql", ["BEGIN", "COMMIT", "SAVEPOINT a", "SET search_path = x",
                                 "SHOW work_mem", "DEALLOCATE ALL"])
def test_statements_that_evaluate_no_value_run_no_type_hooks(sql: str) -> None:
    assert judge(sql, HOOKED).cls is judge(sql, catalog()).cls


EXPLICIT = catalog(routines=[fn("public", "d2i")],
                   type_code=[("pg_catalog", "int4", "a cast from date", "public", "d2i")],
                   type_bases=[("public", "posint", "pg_catalog", "int4")])


@pytest.mark.parametrize("sql, ran", [
    ("SELECT current_date::int", True), ("SELECT CAST(current_date AS integer)", True),
    ("SELECT int4(current_date)", True), ("SELECT pg_catalog.int4(current_date)", True),
    ("SELECT current_date::posint", True), ("SELECT now()::date", False),
    ("SELECT 1", False), ("SELECT int8(2)", False),
])
def test_an_explicit_user_cast_to_a_built_in_type_runs_where_the_type_is_cast_to(
        sql: str, ran: bool) -> None:
    st = judge(sql, EXPLICIT)
    assert (st.cls is C.WRITE) is ran, st.reasons
    assert ("public.d2i" in st.functions) is ran


def test_children_and_materialized_views_bring_their_tables() -> None:
    cat = catalog(views=[("public", "mv", "SELECT v FROM vault.secret", "m"),
                         ("public", "v", "SELECT v FROM vault.secret", "v")],
                  children=[("public", "parent", "vault", "kid"),
                            ("public", "parent", "vault", "grandkid")],
                  relation_code=[("vault", "kid", "foreign-data wrapper x", "public",
                                  "x_handler", "True")],
                  routines=[fn("public", "x_handler", language="c")])
    mv = judge("SELECT * FROM mv", cat)
    assert "vault.secret" in mv.tables and mv.cls is C.READ  # its query does not run
    parent = judge("SELECT * FROM parent", cat)
    assert {"vault.kid", "vault.grandkid"} <= set(parent.tables)
    assert parent.cls is C.WRITE and "public.x_handler" in parent.functions  # a foreign child


@pytest.mark.parametrize("sql, safety", [
    ("SET statement_timeout = '6s'", True), ("SET statement_timeout = 5000", False),
    ("SET statement_timeout = '1s'", False), ("SET lock_timeout = '1min'", False),
    ("SELECT set_config('statement_timeout', '1h', true)", True),
    ("SET LOCAL statement_timeout = 2147483647", True),
])
def test_a_timeout_above_the_target_s_own_is_safety(sql: str, safety: bool) -> None:
    cat = catalog(settings=[("statement_timeout", "5000"), ("lock_timeout", "0")])
    st = judge(sql, cat)
    assert (st.cls is C.SAFETY) is safety, st.reasons
    # Without the target's values the gateway cannot tell: the riskier answer.
    assert judge(sql, None).cls is C.SAFETY


def test_order_by_using_is_judged_by_the_families_holding_the_operator() -> None:
    cat = catalog(routines=[fn("public", "boxcmp", volatility="i")],
                  sort_code=[("pg_catalog", "<", "operator family box_sort", "public",
                              "boxcmp")])
    st = judge("SELECT b FROM boxes ORDER BY b USING <", cat)
    assert st.cls is C.WRITE and "public.boxcmp" in st.functions
    assert judge("SELECT b FROM boxes WHERE b < b ORDER BY b", cat).cls is C.READ
    assert judge("SELECT b FROM boxes ORDER BY b USING >", cat).cls is C.READ


def test_user_code_created_in_pg_catalog_counts() -> None:
    cat = catalog(routines=[fn("pg_catalog", "upper")])
    for sql in ("SELECT upper('x')", "SELECT pg_catalog.upper('x')"):
        st = judge(sql, cat)
        assert st.cls is C.WRITE and "pg_catalog.upper" in st.functions, sql
    assert judge("SELECT lower('x')", cat).cls is C.READ


@pytest.mark.parametrize("sql", ["SELECT * FROM pg_stats", "SELECT * FROM pg_catalog.pg_stats_ext",
                                 "SELECT 1 FROM pg_stats_ext_exprs"])
def test_planner_statistics_read_any_table(sql: str) -> None:
    (st,) = AN.analyze(sql).statements
    assert "*" in st.tables
    (other,) = AN.analyze("SELECT * FROM myschema.pg_stats").statements
    assert "*" not in other.tables


@pytest.mark.parametrize("sql, table", [
    ("SELECT pg_sequence_last_value('vault.s_seq')", "vault.s_seq"),
    ("SELECT currval('\"Vault\".S')", "Vault.s"),
    ("SELECT pg_sequence_last_value('s_seq')", "public.s_seq"),
    # regclass reads the constant as the function's own argument does
    ("SELECT pg_sequence_parameters('vault.s_seq'::regclass)", "vault.s_seq"),
    ("SELECT pg_sequence_parameters('vault.s_seq'::text)", "*"),  # another type's text
    ("SELECT nextval('vault.s_seq')", "vault.s_seq"),  # changes it
    ("SELECT setval('vault.s_seq', 5)", "vault.s_seq"),
    ("SELECT sequencename, last_value FROM pg_sequences", "*"),
    ("SELECT pg_sequence_last_value($1)", "*"),
    ("SELECT pg_sequence_last_value('a.b.c.d')", "*"),  # not a relation name
    ("SELECT query FROM pg_stat_activity", "*"),
    ("SELECT * FROM extensions.pg_stat_statements", "*"),
    ("SELECT pg_stat_get_activity(NULL)", "*"),
])
def test_functions_and_views_that_show_a_relation_s_data_count_it_as_read(
        sql: str, table: str) -> None:
    (st,) = AN.analyze(sql).statements
    assert table in st.tables, st.tables
