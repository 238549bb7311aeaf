"""Ordinary SQL that must pass: functions of PostgreSQL's trusted extensions and long
generated expressions, read through the live gateway under a policy that allows reads
only (and treats unknown functions as writes, the default).

The extensions are installed on the target directly, as a database owner would (they are
trusted: the database owner may create them; their functions belong to the bootstrap
superuser), before the gateway reads the catalog.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from keyturn.launch.localpg import LocalPostgres
from tests.conftest import APP_PASSWORD, Keyturn, make_keyturn

POLICIES = """
  reads_only:
    default: block
    rules:
      - name: reads
        match: {class: [read, transaction, session]}
        action: allow
"""


#: A database of its own: the extensions' operators (hstore's =...) would change how
#: other modules' statements are judged.
DB = "compat_ext"


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    pg.create_database(DB, owner="app")
    with psycopg.connect(pg.dsn(DB, user="app", password=APP_PASSWORD), autocommit=True) as c:
        for ext in ("pg_trgm", "fuzzystrmatch", "pgcrypto", "hstore"):
            c.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
    k = make_keyturn(tmp_path_factory.mktemp("compat"), pg, extra=POLICIES,
                     shop_policy="reads_only", shop_db=DB)
    k.start()
    yield k
    k.stop()


def test_a_function_shadowed_by_a_builtin_counts_once_the_path_puts_it_first(
        kt: Keyturn) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        # Named into public, or with public searched before pg_catalog: pgcrypto's
        # volatile C function runs, which keyturn does not know: a write, blocked.
        for sql in ("SELECT public.gen_random_uuid()",
                    "SET search_path = public, pg_catalog; SELECT gen_random_uuid()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="gen_random_uuid"):
                c.execute(sql)


@pytest.mark.parametrize("sql, want", [
    ("SELECT similarity('word', 'words') > 0.5", True),
    ("SELECT levenshtein('kitten', 'sitting')", 3),
    ("SELECT encode(digest('abc', 'sha256'), 'hex')",
     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ("SELECT hstore('a', 'b') -> 'a'", "b"),
    ("SELECT length(pg_catalog.gen_random_uuid()::text)", 36),
    # pgcrypto's own gen_random_uuid() is never reached: pg_catalog's comes first.
    ("SELECT length(gen_random_uuid()::text)", 36),
    ("SELECT " + "+".join(str(i) for i in range(600)), sum(range(600))),
    ("SELECT " + " + ".join(f"({i} * 2)" for i in range(2000)), 2 * sum(range(2000))),
])
def test_trusted_extensions_and_long_expressions_are_reads(kt: Keyturn, sql: str,
                                                           want: object) -> None:
    with psycopg.connect(kt.dsn("alice"), autocommit=True) as c:
        assert c.execute(sql).fetchone()[0] == want
