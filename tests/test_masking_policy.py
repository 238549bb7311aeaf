"""Masking rules in the config, and what ``keyturn policy explain`` says about them.

These tests need no server: the CLI reads the config and prints decisions; nothing here
may connect to a database.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyturn.config import parse_config
from keyturn.errors import ConfigError

CONFIG = textwrap.dedent("""\
    identity:
      users:
        alice: {groups: [engineers]}
        carol: {groups: [auditors]}
        sam: {groups: [support]}
    connections:
      - name: crm
        type: postgres
        target: {host: 127.0.0.1, port: 5432}
        policy: crm
        columns:
          public.people.email: [pii.email]
          public.people.ssn: [pii.ssn]
    policies:
      crm:
        rules:
          - name: masked-reads
            match: {class: read}
            action: mask
            mask:
              tags: ["pii.*"]
              columns: ["public.people.phone"]
              style: full
              styles: {pii.email: email}
              groups: {auditors: "partial:4", support: exempt}
    """)


def explain(tmp_path: Path, user: str, sql: str) -> dict:
    path = tmp_path / "keyturn.yaml"
    path.write_text(CONFIG)
    # The form the docs use: -c after the subcommand.
    res = subprocess.run([sys.executable, "-m", "keyturn.launch", "policy", "explain", "-c",
                          str(path), "--user", user, "--connection", "crm", sql],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_explain_names_each_masked_output_and_why(tmp_path: Path) -> None:
    out = explain(tmp_path, "alice", "SELECT email AS e, upper(ssn), phone, city FROM people")
    assert out["action"] == "mask" and out["rule"] == "masked-reads"
    cols = {o["name"]: o["masked"] for o in out["masking"]["outputs"]}
    assert cols["e"]["style"] == "email" and "tag pii.email" in cols["e"]["why"]
    assert cols["upper"]["style"] == "full" and "pii.ssn" in cols["upper"]["why"]
    assert cols["phone"]["style"] == "full" and "column public.people.phone" in cols["phone"]["why"]
    assert cols["city"] is None


def test_explain_shows_group_styles_and_exemptions(tmp_path: Path) -> None:
    carol = explain(tmp_path, "carol", "SELECT ssn FROM people")
    assert carol["masking"]["outputs"][0]["masked"]["style"] == "partial:4"
    sam = explain(tmp_path, "sam", "SELECT ssn FROM people")
    assert sam["masking"]["outputs"][0]["masked"] is None


def test_explain_reports_a_refusal_as_the_gateway_would(tmp_path: Path) -> None:
    out = explain(tmp_path, "alice", "SELECT row_to_json(p) FROM people p")
    assert out["action"] == "block" and out["rule"] == "masked-reads"
    assert "row_to_json" in out["reason"]


@pytest.mark.parametrize(("snippet", "needle"), [
    ("style: sometimes", "expected a mask style"),
    ("style: partial:x", "expected a mask style"),
    ("allow: [everything]", "unknown refusal"),
    ("columns: [people.ssn, public.people.phone]", "expected schema.table.column"),
    ("writes: review", "expected block, or review"),
    ("writes: {review: {approvers: []}}", "a review needs approver groups"),
])
def test_bad_mask_settings_name_the_line(snippet: str, needle: str) -> None:
    if snippet.startswith("columns"):
        text = CONFIG.replace('columns: ["public.people.phone"]', snippet)
    elif snippet.startswith("style"):
        text = CONFIG.replace("style: full", snippet)
    else:
        text = CONFIG.replace("style: full", f"style: full\n          {snippet}")
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "k.yaml")
    assert needle in str(exc.value) and "k.yaml:" in str(exc.value)
    assert "policies.crm.rules[0].mask" in str(exc.value)


def test_writes_review_settings_are_parsed() -> None:
    cfg = parse_config(CONFIG.replace("style: full", "style: full\n          writes: {review: "
                                                     "{approvers: [dba], timeout: 5m}}"))
    mask = cfg.policies["crm"].rules[0].mask
    assert mask is not None and mask.writes == "review"
    assert mask.writes_review is not None and mask.writes_review.approvers == ("dba",)
    assert mask.writes_review.timeout == 300


def test_a_block_rule_cannot_mask() -> None:
    text = CONFIG.replace("action: mask", "action: block")
    with pytest.raises(ConfigError, match="nothing to mask"):
        parse_config(text)
