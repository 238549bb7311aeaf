"""Chat latency: from a statement held by the gateway to the Slack message and the Teams
card, and from a decision (in the portal, or a click in Slack) to every surface.

    .venv/bin/python bench/chat_latency.py [-n 30] [--stores sqlite,postgres]
                                           [--poll 0.5] [--keep]

For each store it runs Keyturn as an operator would with the Procfile: ``keyturn
gateway``, ``keyturn portal`` and ``keyturn bots`` as three processes sharing the store
(nothing in-process can help), with the bots talking to local stand-ins of the Slack Web
API and the Bot Framework connector (tests/chat_standins.py: the real wire formats; they
stamp each call as it arrives). ``integrations.poll_interval`` is left at ``--poll``
(default 0.5 s, the shipped default): the outbox is woken by the store's change feed
(LISTEN/NOTIFY with PostgreSQL, a 0.1 s read with SQLite) and polls only as a backstop.

For each of N sequential ``UPDATE t SET v = v + 1 WHERE id = ...`` sent by psycopg
through the gateway:

1. **held -> Slack** and **held -> Teams**: from the ticket's ``created_at`` (stamped by
   the gateway when it holds the statement) to the stand-in receiving the
   ``chat.postMessage`` / the card's POST activity;
2. decisions alternate: even statements are approved through the portal's API
   (``POST /api/v1/tickets/N/approve``, as the CLI and the portal page do); odd ones by a
   signed Slack button click on ``keyturn bots``' ``/slack/events``. **decided -> Slack**
   / **decided -> Teams**: from the decision (the ticket's ``decided_at``, stamped in the
   deciding transaction) to the stand-in receiving the update of that ticket's message /
   card that shows "Approved by" (a Slack click does not change its message itself: the
   outbox does, like for any decision).

Times come from one clock (same machine). Target (issue 13): p95 <= 1 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import _common as common
import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.chat_standins import (  # noqa: E402 - after the path is set
    SlackStandIn,
    TeamsStandIn,
    block_action,
    slack_headers,
)

TARGET_P95 = 1.0
SECRET = "bench-slack-signing-secret"
CHANNEL = "CAPPROVALS"
CONV = "19:approvers@thread.tacv2"

INTEGRATIONS = """
integrations:
  listen: 127.0.0.1:{port}
  poll_interval: {poll}
  slack:
    bot_token_file: {base}/slack-bot-token
    signing_secret_file: {base}/slack-signing-secret
    channel: {channel}
    api_base_url: {slack}/api/
  teams:
    app_id: {app_id}
    app_password_file: {base}/teams-secret
    tenant_id: tenant-1
    service_url: {teams}
    conversation_id: "{conv}"
    openid_metadata_url: {teams}/openid
    token_url: {teams}/botframework/token
"""


def first_call(stand_in: Any, method: str, needles: tuple[str, ...], after: float,
               timeout: float = 30) -> float:
    """When ``stand_in`` first received ``method`` whose arguments contain every one of
    ``needles`` (at or after ``after``)."""
    def probe() -> Any:
        for c in stand_in.calls:
            if c.method == method and c.at >= after:
                blob = json.dumps(c.args, ensure_ascii=False)
                if all(n in blob for n in needles):
                    return c.at
        return None
    return float(stand_in.wait_for(probe, timeout, f"{method} with {needles!r}"))


def run(ws: common.Workspace, pg: Any, slack: SlackStandIn, teams: TeamsStandIn, store: str,
        n: int, poll: float) -> dict[str, list[float]]:
    store_url = None
    if store == "postgres":
        pg.create_database("store_chat")
        store_url = f"postgresql://postgres@127.0.0.1:{pg.port}/store_chat"
    bots_port = common.free_port()
    kt = common.KeyturnProcess(ws, pg, "app", common.POLICY_WRITES_REVIEWED, portal=True,
                               store_url=store_url, name=f"keyturn-{store}")
    base = kt.dir
    (base / "slack-bot-token").write_text(slack.token)
    (base / "slack-signing-secret").write_text(SECRET)
    (base / "teams-secret").write_text(teams.app_password)
    with open(kt.config, "a") as f:
        f.write(INTEGRATIONS.format(port=bots_port, poll=poll, base=base, channel=CHANNEL,
                                    slack=slack.url, app_id=teams.app_id, teams=teams.url,
                                    conv=CONV))
    kt.create_tokens("alice", "bob")
    kt.cli("bots", "link", "--platform", "slack", "--id", "UBOB", "--user", "bob")
    kt.start("split")
    with open(kt.log_path, "ab") as log:
        bots = ws.popen([*kt.cmd, "-c", str(kt.config), "bots"], cwd=kt.dir, stdout=log,
                        stderr=subprocess.STDOUT, env=kt.env)
    common.wait_port(bots_port, proc=bots, log=kt.log_path)
    common.progress(f"[{store}] keyturn gateway :{kt.gateway_port}, portal {kt.url}, "
                    f"bots :{bots_port}")
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {kt.tokens['bob']}"
    out: dict[str, list[float]] = {k: [] for k in (
        "held_slack", "held_teams", "api_slack", "api_teams", "click_slack", "click_teams")}
    with psycopg.connect(kt.dsn("alice", "app"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        last = 0
        for i in range(1, n + 1):
            result: dict[str, Any] = {}

            def client(i: int = i, result: dict[str, Any] = result) -> None:
                try:
                    result["status"] = conn.execute(
                        "UPDATE t SET v = v + 1 WHERE id = %s", (i,)).statusmessage
                except Exception as exc:  # reported below
                    result["error"] = exc

            th = threading.Thread(target=client)
            th.start()
            deadline = time.monotonic() + 30
            tid = 0
            while time.monotonic() < deadline:
                tickets = api.get(f"{kt.url}/api/v1/tickets?status=pending", timeout=10).json()
                fresh = [t for t in tickets["tickets"] if t["id"] > last]
                if fresh:
                    tid, created = fresh[0]["id"], fresh[0]["created_at"]
                    break
                time.sleep(0.01)
            if not tid:
                raise RuntimeError("no ticket appeared")
            last = tid
            out["held_slack"].append(first_call(slack, "chat.postMessage",
                                                (f"Ticket #{tid}>",), created) - created)
            out["held_teams"].append(first_call(teams, "post_activity",
                                                (f"Ticket #{tid} ",), created) - created)
            if i % 2 == 0:
                r = api.post(f"{kt.url}/api/v1/tickets/{tid}/approve",
                             json={"comment": "bench"}, timeout=10)
                r.raise_for_status()
                via = "api"
            else:
                body = urlencode({"payload": json.dumps(block_action("UBOB", "kt_approve",
                                                                     tid))})
                r = requests.post(f"http://127.0.0.1:{bots_port}/slack/events", data=body,
                                  headers=slack_headers(body, SECRET), timeout=10)
                r.raise_for_status()
                via = "click"
            # From the decision's commit (decided_at, stamped in the deciding transaction).
            decided = None
            while decided is None:
                decided = api.get(f"{kt.url}/api/v1/tickets/{tid}", timeout=10).json()[
                    "decided_at"]
                time.sleep(0.005)
            out[f"{via}_slack"].append(first_call(
                slack, "chat.update", (f"Ticket #{tid}>", "Approved by"), decided) - decided)
            out[f"{via}_teams"].append(first_call(
                teams, "put_activity", (f"Ticket #{tid} ", "Approved by"), decided) - decided)
            th.join(60)
            if th.is_alive() or result.get("status") != "UPDATE 1":
                raise RuntimeError(f"ticket {tid}: the client got "
                                   f"{result.get('error') or result.get('status')}")
            if i % 10 == 0 or i == n:
                common.progress(f"[{store}] {i}/{n}: held -> Slack "
                                f"{out['held_slack'][-1] * 1000:.0f} ms, Teams "
                                f"{out['held_teams'][-1] * 1000:.0f} ms")
    common.finish(kt, bots)
    return out


def main() -> int:
    ap = common.store_arguments(__doc__, 30, "held statements per store")
    ap.add_argument("--poll", type=float, default=0.5, help="integrations.poll_interval")
    args = ap.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    print(f"machine: {common.machine_line()}")
    results = {}
    slack, teams = SlackStandIn().start(), TeamsStandIn().start()
    try:
        with common.Workspace("chat", keep=args.keep) as ws:
            common.progress("starting PostgreSQL (target and PostgreSQL store)")
            pg = ws.postgres("pg")
            pg.create_database("app")
            pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);"
                       f"INSERT INTO t (id) SELECT generate_series(1, {args.n})", dbname="app")
            for store in stores:
                results[store] = run(ws, pg, slack, teams, store, args.n, args.poll)
    finally:
        slack.stop()
        teams.stop()
    print()
    print(f"chat latency, {args.n} sequential held UPDATEs per store; keyturn gateway, portal "
          f"and bots as three processes; poll_interval {args.poll} s; ms")
    labels = {"held_slack": "held -> Slack message", "held_teams": "held -> Teams card",
              "api_slack": "approved in portal API -> Slack updated",
              "api_teams": "approved in portal API -> Teams updated",
              "click_slack": "Slack click -> Slack updated",
              "click_teams": "Slack click -> Teams updated"}
    rows = []
    for store, lat in results.items():
        for key, label in labels.items():
            v = lat[key]
            p95 = common.percentile(v, 95)
            rows.append([store, label, len(v), f"{common.percentile(v, 50) * 1000:.0f}",
                         f"{p95 * 1000:.0f}", f"{max(v) * 1000:.0f}", f"{min(v) * 1000:.0f}",
                         "yes" if p95 <= TARGET_P95 else "NO"])
    common.print_table(["store", "path", "n", "p50", "p95", "max", "min",
                        f"p95 <= {TARGET_P95 * 1000:.0f}?"], rows)
    return 0


if __name__ == "__main__":
    common.run_script(main)
