"""Unqualified names after user code moved search_path or the role.

The server reports neither search_path nor the current role. A function the policy lets
run (``unknown_functions: read``) may change both, so that ``SELECT * FROM secrets``
next resolves in a schema a rule blocks. The gateway reads them back from the target
after such a statement completed, before it judges anything the client sent after it;
statements after user code in the same message cannot be resolved at all (unknown).
These tests drive that through the live gateway against a real PostgreSQL, with psql's
simple protocol, psycopg's extended one and hand-made pipelines.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import Keyturn, keyturn_on_database
from tests.pg_raw import B, E, P, Q, RawConn, S, errors, leaked, vault_policy, vault_schema

POLICIES = vault_policy("no_vault", ["rb_vault", "rb_keeper"])

SCHEMA = vault_schema("rb_vault") + """
-- "$user" (first in the default search_path) names the role in force.
CREATE SCHEMA IF NOT EXISTS rb_keeper AUTHORIZATION rb_keeper;
CREATE TABLE IF NOT EXISTS rb_keeper.secrets (s text);
INSERT INTO rb_keeper.secrets VALUES ('keeper secret');
ALTER TABLE rb_keeper.secrets OWNER TO rb_keeper;
GRANT EXECUTE ON FUNCTION rb_run(text) TO rb_keeper;
"""

MOVE = "SELECT rb_run('SET search_path = rb_vault, public')"
DB = "readback"


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    pg.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rb_keeper') "
               "THEN CREATE ROLE rb_keeper NOLOGIN; END IF; END$$; GRANT rb_keeper TO app")
    k = keyturn_on_database(pg, tmp_path_factory.mktemp("readback"), DB, schema=SCHEMA,
                            policies=POLICIES, connections={
                                "fnread": "policy: no_vault\nunknown_functions: read"})
    k.start()
    yield k
    k.stop()


def blocked(answers: list[tuple[bytes, bytes]]) -> bool:
    return any("keyturn" in e.get("M", "") and e.get("C") == "42501" for e in errors(answers))



def test_simple_queries_after_user_code_moved_search_path(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        assert not errors(r.run(Q("SELECT v FROM open_data")))
        assert not errors(r.run(Q(MOVE)))
        answers = r.run(Q("SELECT s FROM secrets"))
        assert blocked(answers) and not leaked(answers), answers
        # What still resolves where the rules allow runs as before.
        assert not errors(r.run(Q("SELECT v FROM public.open_data")))


def test_extended_queries_after_user_code_moved_search_path(kt: Keyturn) -> None:
    with psycopg.connect(kt.dsn("alice", dbname="fnread"), autocommit=True) as c:
        assert c.execute("SELECT v FROM open_data WHERE %s", [True]).fetchall()
        c.execute(MOVE + " WHERE %s", [True])
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-vault"):
            c.execute("SELECT s FROM secrets WHERE %s", [True])
        assert c.execute("SELECT 1 WHERE %s", [True]).fetchone() == (1,)


def test_a_pipeline_after_user_code_waits_for_the_read_back(kt: Keyturn) -> None:
    """The move and the read in one write: one batch, and two Queries."""
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        answers = r.run(P("", MOVE) + B("", "") + E("")
                        + P("", "SELECT s FROM secrets") + B("", "") + E("") + S(), syncs=1)
        assert blocked(answers) and not leaked(answers), answers
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        answers = r.run(Q(MOVE) + Q("SELECT s FROM secrets"), syncs=2)
        assert blocked(answers) and not leaked(answers), answers


def test_statements_after_user_code_in_the_same_message_are_unknown(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        answers = r.run(Q(f"{MOVE}; SELECT s FROM secrets"))
        assert errors(answers) and not leaked(answers), answers
        assert "cannot be resolved" in errors(answers)[0]["M"]
        # User code after the read does not matter to it.
        assert not errors(r.run(Q(f"SELECT v FROM public.open_data; {MOVE}")))


def test_a_role_set_by_user_code_moves_user_schema(kt: Keyturn) -> None:
    """``"$user"`` names the role in force: code that runs SET ROLE moves it."""
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        assert not errors(r.run(Q("SELECT rb_run('SET ROLE rb_keeper')")))
        answers = r.run(Q("SELECT s FROM secrets"))
        assert blocked(answers) and not leaked(answers), answers


def test_a_move_inside_a_transaction_then_commit(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        answers = r.run(Q("BEGIN") + Q(MOVE) + Q("COMMIT") + Q("SELECT s FROM secrets"),
                        syncs=4)
        assert blocked(answers) and not leaked(answers), answers


def test_a_failed_transaction_defers_the_read_back(kt: Keyturn) -> None:
    """The move commits inside one message, the transaction after it fails: the read
    cannot run then, so the statements after it wait for each other until it can."""
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        r.run(Q(f"{MOVE}; COMMIT; BEGIN; SELECT 1/0"))
        answers = r.run(Q("ROLLBACK") + Q("SELECT s FROM secrets"), syncs=2)
        assert blocked(answers) and not leaked(answers), answers


def test_user_code_that_leaves_search_path_alone_changes_nothing(kt: Keyturn) -> None:
    with RawConn(kt.dsn("alice", dbname="fnread")) as r:
        for _ in range(3):
            assert not errors(r.run(Q("SELECT rb_run('SELECT 1')")))
            answers = r.run(Q("SELECT v FROM open_data"))
            assert not errors(answers) and b"public value" in b"".join(
                body for t, body in answers if t == b"D")
