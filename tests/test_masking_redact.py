"""Redaction of statements for display (tickets, portal, chat, audit)."""

from __future__ import annotations

import pytest

from keyturn.masking.detectors import DetectorSet
from keyturn.masking.redact import redact_params, redact_statement, sensitive_names

SENSITIVE = sensitive_names(["public.people.ssn", "public.people.email", "public.*.card_*"])


@pytest.mark.parametrize(("sql", "shown"), [
    ("SELECT * FROM people WHERE ssn = '123-45-6789'",
     "SELECT * FROM people WHERE ssn = '<redacted>'"),
    ("SELECT * FROM people p WHERE p.ssn = E'12\\'3' AND id = 5",
     "SELECT * FROM people p WHERE p.ssn = '<redacted>' AND id = 5"),
    ("SELECT * FROM people WHERE ssn IN ('1', '2') OR email LIKE $$%@x.org$$",
     "SELECT * FROM people WHERE ssn IN ('<redacted>', '<redacted>') OR email LIKE "
     "'<redacted>'"),
    ("SELECT * FROM people WHERE upper(ssn) BETWEEN 'A' AND 'B'",
     "SELECT * FROM people WHERE upper(ssn) BETWEEN '<redacted>' AND '<redacted>'"),
    ("UPDATE people SET email = 'x@y.org', city = 'Paris'",
     "UPDATE people SET email = '<redacted>', city = 'Paris'"),
    ("INSERT INTO people (id, ssn) VALUES (7, '999-00-1234')",
     "INSERT INTO people (id, ssn) VALUES (7, '<redacted>')"),
    ("SELECT * FROM cards WHERE card_number = 4111111111111111",
     "SELECT * FROM cards WHERE card_number = '<redacted>'"),
    ("SELECT CASE WHEN ssn = '1' THEN 'a' END FROM people",
     "SELECT CASE WHEN ssn = '<redacted>' THEN 'a' END FROM people"),
    ("SELECT * FROM people WHERE city = 'Oslo'", "SELECT * FROM people WHERE city = 'Oslo'"),
])
def test_literals_touching_sensitive_columns_are_redacted(sql: str, shown: str) -> None:
    assert redact_statement(sql, SENSITIVE)[0] == shown


def test_parameters_in_sensitive_places_are_hidden() -> None:
    text, hidden = redact_statement("UPDATE people SET city = $1 WHERE ssn = $2", SENSITIVE)
    assert hidden == {2} and text == "UPDATE people SET city = $1 WHERE ssn = $2"
    assert redact_params(["Oslo", "123-45-6789"], hidden) == ["Oslo", "<redacted>"]


def test_detectors_catch_what_no_column_names() -> None:
    d = DetectorSet.build()
    text, _ = redact_statement("SELECT 1 WHERE note = 'card 4111 1111 1111 1111'", SENSITIVE, d)
    assert "4111" not in text
    assert redact_params(["mail jane@example.com"], set(), d) != ["mail jane@example.com"]


def test_unparseable_text_still_passes_the_detectors() -> None:
    d = DetectorSet.build()
    text, hidden = redact_statement("SELEC 'jane@example.com' garbage", SENSITIVE, d)
    assert "jane@example.com" not in text and hidden == set()


@pytest.mark.parametrize(("sql", "shown"), [
    ("SELECT * FROM people WHERE starts_with(ssn, '123-45')",
     "SELECT * FROM people WHERE starts_with(ssn, '<redacted>')"),
    ("INSERT INTO people (id, ssn) SELECT 1, '999-00-1111'",
     "INSERT INTO people (id, ssn) SELECT 1, '<redacted>'"),
    ("INSERT INTO people (id, city) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET ssn = '5'",
     "INSERT INTO people (id, city) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET ssn = "
     "'<redacted>'"),
    ("MERGE INTO people p USING src s ON p.id = s.id WHEN MATCHED THEN UPDATE SET ssn = '1' "
     "WHEN NOT MATCHED THEN INSERT (id, ssn) VALUES (2, '2')",
     "MERGE INTO people p USING src s ON p.id = s.id WHEN MATCHED THEN UPDATE SET ssn = "
     "'<redacted>' WHEN NOT MATCHED THEN INSERT (id, ssn) VALUES (2, '<redacted>')"),
])
def test_more_places_where_literals_meet_sensitive_columns(sql: str, shown: str) -> None:
    assert redact_statement(sql, SENSITIVE)[0] == shown


def test_copy_text_with_an_escaped_delimiter_keeps_fields_aligned() -> None:
    from keyturn.masking.copy import CopyMasker, copy_options

    opts, why = copy_options("COPY people (name, ssn) TO STDOUT WITH (DELIMITER 'e')")
    assert why is None
    masker = CopyMasker(opts, {1: lambda v: "********"})
    assert masker.rewrite(b"Alic\\e Smithe123-45-6789\n") == b"Alic\\e Smithe********\n"


def test_mixed_case_identifiers_in_config_follow_postgresql_folding() -> None:
    from keyturn.config import fold_identifiers

    assert fold_identifiers('public."Staff".SSN') == "public.Staff.ssn"
    assert fold_identifiers("Public.Staff.SSN") == "public.staff.ssn"
