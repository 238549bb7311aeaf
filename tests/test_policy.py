"""Policy evaluation with the real analyser: rule order, matching, explain.

These tests need no server: policy is evaluated in-process and ``keyturn policy
explain`` only reads the config; nothing here may connect to a database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from keyturn.analysis import Analyzer
from keyturn.config import parse_config
from keyturn.policy import Decision, PolicyEngine, Request, evaluate

CONFIG = """
identity:
  users:
    alice: {groups: [engineers]}
    ops: {groups: [dba]}
connections:
  - {name: shop, type: postgres, target: {host: h}, policy: p}
  - {name: other, type: postgres, target: {host: h}, policy: p}
policies:
  p:
    rules:
      - name: dba-anything
        match: {groups: [dba]}
        action: allow
      - name: payroll-is-private
        match: {tables: ["payroll.*"]}
        action: block
        reason: payroll data is private
      - name: reads-of-public
        match: {class: read, tables: ["public.*"]}
        action: allow
      - name: plain-reads
        match: {class: read}
        action: allow
      - name: writes-on-other
        match: {class: write, connections: [other]}
        action: block
      - name: writes
        match: {class: write}
        action: review
        review: {approvers: [dba], timeout: 5m}
      - name: no-sleep
        match: {functions: ["pg_catalog.pg_sleep"]}
        action: block
"""

cfg = parse_config(CONFIG, "k.yaml")
analyzer = Analyzer()
engine = PolicyEngine(cfg)


def decide(sql: str, user: str = "alice", conn: str = "shop") -> Decision:
    a = analyzer.analyze(sql)
    req = Request(user, cfg.groups_of(user), cfg.connections[conn], a.statements, a.error)
    plain = evaluate(cfg, req)
    # The gateway's memoised engine must agree with the plain evaluation, twice.
    assert engine.evaluate(req) == plain
    assert engine.evaluate(req) == plain
    return plain


@pytest.mark.parametrize("sql, user, conn, action, rule", [
    ("SELECT * FROM orders", "alice", "shop", "allow", "reads-of-public"),
    ("SELECT * FROM payroll.salaries", "alice", "shop", "block", "payroll-is-private"),
    # An allow rule with tables must cover every table: payroll still blocks first,
    # and a join outside public.* falls through to the next allow rule.
    ("SELECT * FROM orders JOIN audit.log USING (id)", "alice", "shop", "allow", "plain-reads"),
    ("DELETE FROM orders", "alice", "shop", "review", "writes"),
    ("DELETE FROM orders", "alice", "other", "block", "writes-on-other"),
    ("DELETE FROM payroll.salaries", "ops", "shop", "allow", "dba-anything"),  # first match wins
    ("SELECT 1; DELETE FROM orders", "alice", "shop", "review", "writes"),  # riskiest wins
    ("SELECT 1; DELETE FROM payroll.x; DELETE FROM orders", "alice", "shop", "block",
     "payroll-is-private"),
    ("DROP TABLE orders", "alice", "shop", "block", None),  # no rule: policy default
    ("not sql at all", "alice", "shop", "block", "builtin:unparsed"),
    ("SET ROLE postgres", "ops", "shop", "block", "builtin:session-identity"),
    # Planner statistics may show any table's values: every table rule that blocks
    # matches, and an allow rule with a table list does not cover them.
    ("SELECT most_common_vals FROM pg_stats", "alice", "shop", "block",
     "payroll-is-private"),
    ("SELECT * FROM pg_stats_ext JOIN orders ON true", "alice", "shop", "block",
     "payroll-is-private"),
])
def test_rule_order_and_matching(sql: str, user: str, conn: str, action: str,
                                 rule: str | None) -> None:
    d = decide(sql, user, conn)
    assert (d.action, d.rule) == (action, rule), d.to_json()
    assert d.reason


def test_review_settings_travel_with_the_decision() -> None:
    d = decide("UPDATE orders SET total = 0")
    assert d.review is not None and d.review.approvers == ("dba",) and d.review.timeout == 300


def test_policy_explain_cli_prints_decision_json(tmp_path: Path) -> None:
    path = tmp_path / "keyturn.yaml"
    path.write_text(CONFIG + f"store: {{url: 'sqlite:///{tmp_path}/k.db'}}\n")
    res = subprocess.run([sys.executable, "-m", "keyturn.launch", "policy", "explain", "-h"],
                         capture_output=True, text=True)
    assert res.returncode == 0
    res = subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", str(path), "policy",
                          "explain", "--user", "alice", "--connection", "shop",
                          "WITH x AS (DELETE FROM orders RETURNING *) SELECT * FROM x"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["action"] == "review" and out["rule"] == "writes" and out["class"] == "write"
    assert out["statements"][0]["tables"] == ["public.orders"]
    assert out["review"]["timeout_seconds"] == 300
    bad = subprocess.run([sys.executable, "-m", "keyturn.launch", "-c", str(path), "policy",
                          "explain", "--user", "mallory", "--connection", "shop", "SELECT 1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown user 'mallory'" in bad.stderr
