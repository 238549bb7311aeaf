"""Adversarial tests: ways to get a statement judged as one thing while the server runs
another. Each sequence goes through the live gateway (psycopg, or raw protocol messages
after psycopg logged in) on a connection whose policy allows reads and blocks everything
else, and a direct connection then checks that no data changed.

These tests must not depend on a server a person started: every PostgreSQL and Keyturn
process here is started by the tests themselves and stopped after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, direct_shop, make_keyturn
from tests.pg_raw import B, E, P, Q, RawConn, S, close_statement, errors, tags

STRICT = """
  strict:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
"""
ROWS = 20
DELETE = "DELETE FROM ns_victim"


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    base: Path = tmp_path_factory.mktemp("bypass")
    kt = make_keyturn(base, pg, extra=STRICT, shop_policy="strict")
    kt.start()
    yield kt
    kt.stop()


direct = direct_shop


@pytest.fixture()
def victim(pg: LocalPostgres) -> Iterator[None]:
    """A table of ROWS rows; after the test it must still hold exactly them."""
    with direct(pg) as c:
        c.execute("DROP TABLE IF EXISTS ns_victim")
        c.execute("CREATE TABLE ns_victim (id int PRIMARY KEY)")
        c.execute("INSERT INTO ns_victim SELECT generate_series(1, %s)", (ROWS,))
    yield
    with direct(pg) as c:
        left = c.execute("SELECT count(*) FROM ns_victim").fetchone()
        assert left == (ROWS,), f"the server ran a hidden write: {left[0] if left else 0} rows left"


def raw(kt: Keyturn) -> RawConn:
    return RawConn(kt.dsn("alice"))


def refused(answers: list[tuple[bytes, bytes]]) -> bool:
    return any(e.get("C") == "42501" and "keyturn" in e.get("M", "") for e in errors(answers))


# ---------------------------------------------------------------- the server's namespace

def test_stock_psycopg_redefining_its_prepared_name(kt: Keyturn, victim: None) -> None:
    """A prepared SELECT, then DEALLOCATE and PREPARE of a DELETE under the same name,
    then the same prepared execute again."""
    with psycopg.connect(kt.dsn("alice"), autocommit=True, prepare_threshold=0) as c:
        query = "SELECT count(*) FROM ns_victim WHERE id > %s"
        assert c.execute(query, (0,)).fetchone() == (ROWS,)
        names = [r[0] for r in c.execute("SELECT name FROM pg_prepared_statements")]
        assert names, "psycopg prepared the statement"
        for name in names:
            c.execute(f'DEALLOCATE "{name}"')
            c.execute(f'PREPARE "{name}"(int2) AS DELETE FROM ns_victim WHERE id > $1')
        with pytest.raises(psycopg.Error) as err:
            c.execute(query, (0,))
        assert "keyturn" in str(err.value)


def test_a_refused_reparse_keeps_the_old_definition(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(P("x", DELETE), S()))
        answers = r.run(P("x", "SELECT 1"), B("", "x"), E(), S())  # 42P05: x exists
        assert errors(answers)[0]["C"] == "42P05"
        answers = r.run(B("", "x"), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)


def test_pipelined_reparse_is_ambiguous_until_answered(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(P("x", DELETE), S()))
        answers = r.run(P("x", "SELECT 1"), S(), B("", "x"), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)


def test_a_close_skipped_after_an_error_frees_nothing(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(P("x", DELETE), S()))
        answers = r.run(P("", "SELEC broken"), close_statement("x"), P("x", "SELECT 1"), S())
        assert [e["C"] for e in errors(answers)] == ["42601"]
        answers = r.run(B("", "x"), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)


def test_names_are_one_at_63_bytes(kt: Keyturn, victim: None) -> None:
    a, b = "p" * 63 + "a", "p" * 63 + "b"  # the server keeps "p" * 63 for both
    with raw(kt) as r:
        assert not errors(r.run(P(a, "SELECT 1"), S()))
        assert not errors(r.run(close_statement(b), P(b, DELETE), S()))
        answers = r.run(B("", a), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)
    with raw(kt) as r:  # the same for multibyte names cut inside a character
        c, d = "p" * 62 + "é", "p" * 62 + "è"  # é and è share their first byte
        assert not errors(r.run(P(c, "SELECT 1"), S()))
        assert not errors(r.run(close_statement(d), P(d, DELETE), S()))
        answers = r.run(B("", c), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)


def test_a_portal_keeps_the_plan_it_was_bound_with(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(Q("BEGIN")))
        answers = r.run(P("x", DELETE), B("p1", "x"), close_statement("x"),
                        P("x", "SELECT 1"), E("p1"), S())
        assert refused(answers) and "DELETE" not in tags(answers)
        r.run(Q("ROLLBACK"))
    with raw(kt) as r:  # the unnamed portal too, bound in an earlier batch
        assert not errors(r.run(Q("BEGIN")))
        assert not errors(r.run(P("y", DELETE), B("", "y"), S()))
        answers = r.run(close_statement("y"), P("y", "SELECT 1"), E(""), S())
        assert refused(answers) and "DELETE" not in tags(answers)
        r.run(Q("ROLLBACK"))


def test_protocol_changes_reach_sql_execute(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(Q("PREPARE s AS SELECT 1")))
        assert not errors(r.run(close_statement("s"), P("s", DELETE), S()))
        answers = r.run(Q("EXECUTE s"))
        assert refused(answers) and "DELETE" not in tags(answers)


def test_sql_changes_reach_protocol_bind(kt: Keyturn, victim: None) -> None:
    with raw(kt) as r:
        assert not errors(r.run(P("t", "SELECT 1"), S()))
        assert not errors(r.run(Q(f"DEALLOCATE t; PREPARE t AS {DELETE}")))
        answers = r.run(B("", "t"), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)
    with raw(kt) as r:  # the same, with DEALLOCATE / PREPARE sent as extended queries
        assert not errors(r.run(P("t", "SELECT 1"), S()))
        assert not errors(r.run(P("", "DEALLOCATE t"), B("", ""), E(), S()))
        assert not errors(r.run(P("", f"PREPARE t AS {DELETE}"), B("", ""), E(), S()))
        answers = r.run(B("", "t"), E(), S())
        assert refused(answers) and "DELETE" not in tags(answers)
        answers = r.run(Q("EXECUTE t"))
        assert refused(answers) and "DELETE" not in tags(answers)


@pytest.mark.parametrize("messages", [
    # one message
    [f"PREPARE q AS SELECT 1; DEALLOCATE q; PREPARE q AS {DELETE}; EXECUTE q"],
    # across messages
    ["PREPARE q AS SELECT 1", f"DEALLOCATE q; PREPARE q AS {DELETE}", "EXECUTE q"],
    # DEALLOCATE ALL / DISCARD ALL, then a new definition
    ["PREPARE q AS SELECT 1", "DEALLOCATE ALL", f"PREPARE q AS {DELETE}", "EXECUTE q"],
    ["PREPARE q AS SELECT 1", "DISCARD ALL", f"PREPARE q AS {DELETE}", "EXECUTE q"],
    # a PREPARE that fails (the name exists) does not replace the definition
    [f"PREPARE q AS {DELETE}", "PREPARE q AS SELECT 1", "EXECUTE q"],
    # a DEALLOCATE in an aborted transaction changes nothing
    [f"PREPARE q AS {DELETE}", "BEGIN", "SELECT 1/0", "DEALLOCATE q", "ROLLBACK",
     "EXECUTE q"],
])
def test_sql_prepare_orders(kt: Keyturn, victim: None, messages: list[str]) -> None:
    with raw(kt) as r:
        answers = []
        for sql in messages:
            answers += r.run(Q(sql))
        assert refused(answers) and "DELETE" not in tags(answers)
    # and everything pipelined in one write
    with raw(kt) as r:
        answers = r.run(*[Q(sql) for sql in messages])
        assert refused(answers) and "DELETE" not in tags(answers)
