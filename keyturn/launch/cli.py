"""The ``keyturn`` command line (the console script and ``python -m keyturn.launch``).

Part of the launcher, the composition root: it reads the config, builds services and
starts surfaces (gateway, portal, bots) through runner.py. Surfaces are imported lazily,
inside the commands that need them, so ``keyturn --help`` and the store commands stay
cheap to start.

Ticket commands (``tickets``, ``approve``, ``reject``) talk to the portal's
JSON API with ``KEYTURN_TOKEN``, exactly as a script would.

What it must not do: hold a rule of the domain (who may decide, what a statement is, how
the trail is chained: audit verification is ``keyturn.audit``'s); commands parse
arguments, call the core or an edge, and print. Nothing outside keyturn.launch may import
it (see keyturn/launch/__init__.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from keyturn.config import Config, load_config, parse_duration
from keyturn.errors import ConfigError, KeyturnError
from keyturn.launch.installed import install

log = logging.getLogger("keyturn")


def _config(args: argparse.Namespace) -> Config:
    install()  # every protocol's and edge's registration, before the file is read
    return load_config(args.config)


def _services(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from keyturn.services import build_services

    return build_services(_config(args))


def _when(value: str | None) -> float | None:
    """An ISO date/time (UTC if no zone) or a relative age like ``2h`` / ``7d``."""
    if not value:
        return None
    try:
        return dt.datetime.now(dt.UTC).timestamp() - parse_duration(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise KeyturnError(f"cannot read time {value!r}: use ISO 8601 (2026-11-22T10:00) "
                           "or an age like 2h") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---------------------------------------------------------------- commands

def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from keyturn.store import Store

    cfg = _config(args)
    Store(cfg.store_url).upgrade()
    print(f"store schema is current ({cfg.store_url.split('://')[0]})")
    return 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from keyturn.analysis import Analyzer, StatementClass
    from keyturn.policy import Request, evaluate

    cfg = _config(args)
    if args.connection not in cfg.connections:
        raise KeyturnError(f"unknown connection {args.connection!r} "
                           f"(configured: {', '.join(cfg.connections) or 'none'})")
    if args.user not in cfg.users:
        raise KeyturnError(f"unknown user {args.user!r}")
    conn = cfg.connections[args.connection]
    sql = args.sql if args.sql != "-" else sys.stdin.read()
    if conn.type == "ssh":
        from proxies.ssh.shell import classify

        action = classify(sql)
        decision = evaluate(cfg, Request(args.user, cfg.groups_of(args.user), conn, [action]))
        out = decision.to_json()
        out["statements"][0].update(programs=list(action.programs), paths=list(action.paths),
                                    parsed=list(action.commands), reasons=list(action.reasons))
        out["user"], out["groups"], out["connection"] = \
            args.user, list(cfg.groups_of(args.user)), conn.name
        print(json.dumps(out, indent=2))
        return 0
    if conn.type == "http":
        from proxies.http.codec import Refused, action_of, normalise

        method, _, path = sql.strip().partition(" ")
        try:
            target = normalise(f"/{conn.name}/{path.strip().lstrip('/')}")
        except Refused as exc:
            raise KeyturnError(f"the gateway refuses this path ({exc.status}): "
                               f"{exc.message}") from None
        act = action_of(method.upper(), target, conn.option("routes", ()))
        out = evaluate(cfg, Request(args.user, cfg.groups_of(args.user), conn,
                                    [act])).to_json()
        out["statements"][0].update(paths=list(act.paths), methods=list(act.methods),
                                    reasons=list(act.reasons))
        out["user"], out["groups"], out["connection"] = \
            args.user, list(cfg.groups_of(args.user)), conn.name
        print(json.dumps(out, indent=2))
        return 0
    analyzer = Analyzer(unknown_function_class=StatementClass(conn.unknown_function_class))
    analysis = analyzer.analyze(sql)
    decision = evaluate(cfg, Request(args.user, cfg.groups_of(args.user), conn,
                                     analysis.statements, analysis.error))
    out = decision.to_json()
    out["user"], out["groups"], out["connection"] = args.user, list(cfg.groups_of(args.user)), \
        conn.name
    if decision.masks and decision.action != "block":
        from keyturn.masking.engine import explain

        masking = explain(sql, decision.masks, conn, cfg.groups_of(args.user),
                          tables=decision.tables,
                          classes=[s.classification for s in decision.statements])
        out["masking"] = masking
        if masking["refused"]:
            # What the gateway does with it: refuse, naming the masking rule.
            out["action"], out["rule"] = "block", decision.masks[0][0]
            out["reason"] = masking["refused"]
    print(json.dumps(out, indent=2))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    svc = _services(args)
    ids = svc.identities
    if args.token_cmd == "create":
        ttl = parse_duration(args.ttl) if args.ttl else None
        issued = ids.create_token(args.user, description=args.description or "", ttl=ttl)
        svc.record_audit(kind="token", user=args.user, action="create",
                         detail={"token_id": issued.id, "by": "cli"})
        if args.quiet:
            print(issued.token)
        else:
            print(f"token {issued.id} for {issued.user}, expires {_fmt_time(issued.expires_at)}")
            print("It is shown once; store it now:")
            print(issued.token)
        return 0
    if args.token_cmd == "list":
        rows = ids.list_tokens(args.user)
        print(f"{'id':>4}  {'user':<12} {'prefix':<11} {'state':<8} {'expires':<21} description")
        import time

        now = time.time()
        for r in rows:
            state = "revoked" if r.revoked_at else ("expired" if r.expires_at <= now else "active")
            print(f"{r.id:>4}  {r.user:<12} {r.prefix:<11} {state:<8} {_fmt_time(r.expires_at):<21}"
                  f" {r.description}")
        return 0
    row = ids.revoke_token(args.id)
    svc.record_audit(kind="token", user=row.user, action="revoke",
                     detail={"token_id": row.id, "by": "cli"})
    print(f"token {row.id} of {row.user} revoked")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    """People's SSH public keys (they log in to the SSH gateway with them)."""
    svc = _services(args)
    ids = svc.identities
    if args.key_cmd == "add":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if not lines:
            raise KeyturnError(f"{args.file}: no public key in it")
        for line in lines:
            row = ids.add_key(args.user, line)
            svc.record_audit(kind="key", user=args.user, action="add",
                             detail={"key_id": row.id, "fingerprint": row.fingerprint,
                                     "by": "cli"})
            print(f"key {row.id} for {row.user}: {row.fingerprint} ({row.algorithm}"
                  + (f", {row.comment}" if row.comment else "") + ")")
        return 0
    if args.key_cmd == "list":
        rows = ids.list_keys(args.user)
        print(f"{'id':>4}  {'user':<12} {'fingerprint':<51} {'last used':<21} comment")
        for r in rows:
            used = _fmt_time(r.last_used_at) if r.last_used_at else "never"
            print(f"{r.id:>4}  {r.user:<12} {r.fingerprint:<51} {used:<21} {r.comment}")
        return 0
    row = ids.remove_key(args.id)
    svc.record_audit(kind="key", user=row.user, action="remove",
                     detail={"key_id": row.id, "fingerprint": row.fingerprint, "by": "cli"})
    print(f"key {row.id} of {row.user} removed ({row.fingerprint})")
    return 0


def cmd_ssh_config(args: argparse.Namespace) -> int:
    """``Host`` blocks for ~/.ssh/config so that ``ssh web1`` goes through the gateway,
    and the gateway's host key for ~/.ssh/known_hosts."""
    from proxies.ssh.gateway import host_key_path, load_host_key

    config = _config(args)
    listen = config.gateway.listener("ssh")
    conns = [c for c in config.connections.values() if c.type == "ssh"]
    if not conns or listen is None:
        raise KeyturnError(f"{config.path}: no ssh connection is configured")
    user = args.user or os.environ.get("USER") or "me"
    host = args.host or listen.host
    key = load_host_key(host_key_path(config))
    public = key.export_public_key("openssh").decode().split()[:2]
    where = host if listen.port == 22 else f"[{host}]:{listen.port}"
    print(f"# keyturn SSH gateway {host}:{listen.port}, host key "
          f"{key.get_fingerprint('sha256')}")
    print("# add this line to ~/.ssh/known_hosts:")
    print(f"#   {where} {' '.join(public)}")
    for c in conns:
        print(f"\nHost {c.name}\n    HostName {host}\n    Port {listen.port}\n"
              f"    User {user}:{c.name}")
    return 0


def cmd_recordings(args: argparse.Namespace) -> int:
    """``recordings export``: session recordings and the audit records that seal them, in
    one tar.gz (the files as recorded plus ``manifest.jsonl``: each recording record, with
    whether its file still matches the SHA-256 the chain holds)."""
    import io
    import tarfile

    from sqlalchemy import select

    from keyturn.auditspool import AuditIngester
    from keyturn.models import AuditRecord
    from keyturn.recording import Recorder

    svc = _services(args)
    AuditIngester(svc.audit, svc.config.gateway.audit_spool,
                  recordings=svc.config.gateway.recordings).run_once()
    recorder = Recorder(svc.config.gateway.recordings)
    q = select(AuditRecord).where(AuditRecord.kind == "recording").order_by(AuditRecord.seq)
    if args.user:
        q = q.where(AuditRecord.user == args.user)
    if args.connection:
        q = q.where(AuditRecord.connection == args.connection)
    since, until = _when(getattr(args, "from")), _when(args.to)
    if since is not None:
        q = q.where(AuditRecord.at >= since)
    if until is not None:
        q = q.where(AuditRecord.at < until)
    with svc.store.session() as s:
        rows = [r for r in s.scalars(q)
                if not args.format or (r.detail or {}).get("format") == args.format]
    manifest: list[bytes] = []
    broken = 0
    with tarfile.open(args.out, "w:gz") as tar:
        for r in rows:
            ref = r.detail or {}
            problem = recorder.verify_file(ref)
            broken += problem is not None
            entry = {"seq": r.seq, "at": r.at, "user": r.user, "connection": r.connection,
                     "session_id": r.session_id, "protocol": r.protocol, **ref,
                     "verified": problem is None, "problem": problem}
            manifest.append(json.dumps(entry, default=str).encode() + b"\n")
            if problem is None:
                tar.add(recorder.path(ref), arcname=f"recordings/{ref['path']}")
                if ref.get("index"):
                    tar.add(recorder.path({"path": ref["index"]}),
                            arcname=f"recordings/{ref['index']}")
        data = b"".join(manifest)
        info = tarfile.TarInfo("manifest.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    svc.record_audit(kind="export", action="recordings", outcome="ok",
                     detail={"recordings": len(rows), "broken": broken, "by": "cli"})
    print(f"{len(rows)} recordings written to {args.out}" +
          (f"; {broken} do not match their SHA-256 and were left out (see manifest.jsonl)"
           if broken else ""))
    return 1 if broken else 0


def cmd_user(args: argparse.Namespace) -> int:
    """Portal accounts. The portal package is imported lazily (composition root)."""
    import getpass

    from portal.accounts import set_password

    svc = _services(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"portal password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise KeyturnError("the passwords differ; nothing changed")
    set_password(svc.config, svc.store, args.name, password)
    svc.record_audit(kind="account", user=args.name, action="set-password",
                     detail={"by": "cli"})
    print(f"portal password set for {args.name}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    svc = _services(args)
    if args.audit_cmd == "ingest":
        return _audit_ingest(args, svc)
    from keyturn.auditspool import AuditIngester

    # Include what this host's gateway has recorded but not yet ingested.
    AuditIngester(svc.audit, svc.config.gateway.audit_spool,
                  recordings=svc.config.gateway.recordings).run_once()
    if args.audit_cmd == "verify":
        from keyturn.recording import Recorder

        result = svc.audit.verify(Recorder(svc.config.gateway.recordings))
        if args.json:
            print(json.dumps(result.to_json(), indent=2))
        else:
            if result.chain_ok:
                versions = ", ".join(f"{n} in version {v}"
                                     for v, n in sorted(result.versions.items()))
                print(f"audit chain OK: {result.count} records"
                      f"{f' ({versions})' if versions else ''}, head {result.head_seq} "
                      f"{result.head_hash[:16]}…")
            else:
                print(f"audit chain BROKEN ({result.count} records):")
                for p in result.problems:
                    print(f"  - {p}")
            bad = result.recording_problems
            if not bad:
                print(f"recordings OK: {result.recordings} match their SHA-256 in the chain")
            else:
                print(f"recordings BROKEN: {len(bad)} of {result.recordings} do not match "
                      "the SHA-256 the audit trail holds:")
                for p in bad:
                    print(f"  - {p}")
        from keyturn.auditspool import spool_backlog

        backlog = spool_backlog(svc.config.gateway.audit_spool, svc.audit)
        if backlog:
            print(f"note: {backlog} bytes of gateway audit spool are not ingested yet "
                  f"({svc.config.gateway.audit_spool}); run `keyturn audit ingest`",
                  file=sys.stderr)
        return 0 if result.ok else 1
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        n = svc.audit.export(out, args.format, _when(args.since), _when(args.until))
    finally:
        if args.output:
            out.close()
    svc.record_audit(kind="export", user=os.environ.get("USER"), action="audit-export",
                     detail={"format": args.format, "since": args.since, "until": args.until,
                             "records": n})
    print(f"exported {n} records", file=sys.stderr)
    return 0


def _audit_ingest(args: argparse.Namespace, svc: Any) -> int:
    import signal
    import threading

    from keyturn.auditspool import AuditIngester

    ing = AuditIngester(svc.audit, svc.config.gateway.audit_spool,
                        recordings=svc.config.gateway.recordings)
    if not args.follow:
        n = ing.run_once()
        print(f"ingested {n} audit records from {ing.dir}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("audit ingester following %s", ing.dir)
    ing.follow(stop)
    log.info("audit ingester stopped after %d records", ing.ingested)
    return 0


# ---- API client commands

def access_token() -> str:
    """The caller's access token (KEYTURN_TOKEN), for commands that call Keyturn over HTTP."""
    token = os.environ.get("KEYTURN_TOKEN")
    if not token:
        raise KeyturnError("set KEYTURN_TOKEN to your access token (keyturn token create)")
    return token


def token_request(method: str, base: str, path: str, body: dict | None, *, token: str,
                  service: str, answerer: str, fallback: str, details: bool = False) -> Any:
    """A JSON request with the caller's access token, with errors people can read:
    ``service`` names what could not be reached, ``answerer`` what answered without JSON,
    ``fallback`` the error when the answer has no message; ``details`` keeps the answer's
    other fields on the error."""
    import requests

    try:
        resp = requests.request(method, f"{base.rstrip('/')}{path}", json=body,
                                headers={"Authorization": f"Bearer {token}"}, timeout=30)
    except requests.RequestException as exc:
        raise KeyturnError(f"cannot reach {service} at {base}: {exc}") from exc
    try:
        data = resp.json()
    except ValueError:
        raise KeyturnError(f"{answerer} answered {resp.status_code} without JSON") from None
    if resp.status_code >= 400:
        extra = {k: v for k, v in data.items() if k != "message"} if details else {}
        raise KeyturnError(data.get("message", f"{fallback} {resp.status_code}"), **extra)
    return data


def _api(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    token = access_token()
    base = args.url or os.environ.get("KEYTURN_URL")
    if not base:
        try:
            from portal.settings import PORTAL

            base = PORTAL.of(_config(args)).public_url
        except ConfigError:
            base = "http://127.0.0.1:8080"
    return token_request(method, base, f"/api/v1{path}", body, token=token,
                         service="the Keyturn API", answerer="API", fallback="API error",
                         details=True)


def cmd_tickets(args: argparse.Namespace) -> int:
    q = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "") + \
        ("&mine=1" if args.mine else "")
    data = _api(args, "GET", f"/tickets{q}")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    tickets = data["tickets"]
    if not tickets:
        print("no tickets")
        return 0
    for t in tickets:
        mark = "*" if t.get("can_decide") and t["status"] == "pending" else " "
        # Control characters (terminal escapes in a command) shown, never obeyed.
        stmt = _printable(" ".join(t["statement"].split()))
        print(f"{mark}{t['id']:>5} {t['status']:<9} {t['requester']:<10} {t['connection']:<12} "
              f"{t['classification']:<8} {stmt[:60]}")
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``), so a terminal
    shows them instead of acting on them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def cmd_decide(args: argparse.Namespace) -> int:
    vote = args.cmd
    body = {"comment": args.comment} if vote == "approve" else {"reason": args.reason}
    data = _api(args, "POST", f"/tickets/{args.ticket}/{vote}", body)
    t = data["ticket"]
    if data["decided"]:
        from types import SimpleNamespace

        from keyturn import wording

        print(f"ticket {t['id']} " + wording.outcome(SimpleNamespace(
            status=t["status"], decided_by=t.get("decided_by"),
            result_rows=t.get("result_rows"), result_error=t.get("result_error"))))
    else:
        print(f"ticket {t['id']}: approval recorded ({data['approvals']} of {data['required']})")
    return 0


# ---- long-running surfaces

def cmd_gateway(args: argparse.Namespace) -> int:
    from keyturn.launch.runner import run

    return run(_config(args), gateway=True, portal=False, bots=False)


def cmd_portal(args: argparse.Namespace) -> int:
    from keyturn.launch.runner import run

    return run(_config(args), gateway=False, portal=True, bots=False)


def cmd_up(args: argparse.Namespace) -> int:
    from keyturn.launch.runner import run

    return run(_config(args), gateway=True, portal=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from keyturn.launch.demo import run_demo

    return run_demo(args.dir, pg_port=args.pg_port, gateway_port=args.port,
                    portal_port=args.portal_port)


def cmd_bots(args: argparse.Namespace) -> int:
    from keyturn.launch.botscmd import run_bots_command

    return run_bots_command(args, _config(args))


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keyturn", description="Keyturn access gateway")
    p.add_argument("-c", "--config",
                   help="config file (default: $KEYTURN_CONFIG or ./keyturn.yaml)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="start a throwaway PostgreSQL, gateway and API with demo users")
    d.add_argument("--dir", default=".demo")
    d.add_argument("--port", type=int, default=6432, help="gateway port")
    d.add_argument("--portal-port", type=int, default=8080)
    d.add_argument("--pg-port", type=int, default=None)
    d.set_defaults(fn=cmd_demo)
    sub.add_parser("up", help="run gateway and portal in one process").set_defaults(fn=cmd_up)
    sub.add_parser("gateway", help="run the protocol gateway").set_defaults(fn=cmd_gateway)
    sub.add_parser("portal", help="run the web portal and JSON API").set_defaults(fn=cmd_portal)
    bots = sub.add_parser("bots", help="run the Slack / Teams bots (or manage chat links)")
    bots.set_defaults(fn=cmd_bots, bots_cmd=None)
    botss = bots.add_subparsers(dest="bots_cmd")
    bl = botss.add_parser("link", help="link a Slack / Teams account to a Keyturn user")
    bl.add_argument("--platform", choices=("slack", "teams"), required=True)
    bl.add_argument("--id", required=True, help="Slack user id (U...) or Teams AAD object id")
    bl.add_argument("--user", required=True, help="Keyturn user")
    bu = botss.add_parser("unlink", help="remove a chat account link")
    bu.add_argument("--platform", choices=("slack", "teams"), required=True)
    bu.add_argument("--id", required=True)
    botss.add_parser("links", help="list chat account links")
    botss.add_parser("outbox", help="show undelivered chat notifications")
    bc = botss.add_parser("claim", help="link your chat account with the code the bot gave you")
    bc.add_argument("code")
    bc.add_argument("--url", help="URL of `keyturn bots` (default: $KEYTURN_BOTS_URL or "
                                  "integrations.listen)")

    db = sub.add_parser("db", help="store maintenance")
    dbs = db.add_subparsers(dest="db_cmd", required=True)
    dbs.add_parser("upgrade", help="migrate the store to the newest schema").set_defaults(
        fn=cmd_db_upgrade)

    pol = sub.add_parser("policy", help="policy tools")
    pols = pol.add_subparsers(dest="policy_cmd", required=True)
    ex = pols.add_parser("explain", help="print the Decision for a statement (or, on an ssh "
                                         "connection, a command line; on an http one, "
                                         "METHOD /path) as JSON")
    ex.add_argument("--user", required=True)
    ex.add_argument("--connection", required=True)
    ex.add_argument("sql", help="the statement ('-' reads stdin)")
    ex.set_defaults(fn=cmd_policy_explain)

    tok = sub.add_parser("token", help="gateway access tokens")
    toks = tok.add_subparsers(dest="token_cmd", required=True)
    tc = toks.add_parser("create")
    tc.add_argument("--user", required=True)
    tc.add_argument("--description")
    tc.add_argument("--ttl", help="lifetime, e.g. 12h or 30d (default from config, 90d)")
    tc.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    tc.set_defaults(fn=cmd_token)
    tl = toks.add_parser("list")
    tl.add_argument("--user")
    tl.set_defaults(fn=cmd_token)
    tr = toks.add_parser("revoke")
    tr.add_argument("id", type=int)
    tr.set_defaults(fn=cmd_token)

    key = sub.add_parser("key", help="people's SSH public keys (SSH gateway logins)")
    keys = key.add_subparsers(dest="key_cmd", required=True)
    ka = keys.add_parser("add", help="register the public key(s) in FILE for a user")
    ka.add_argument("--user", required=True)
    ka.add_argument("file", help="an OpenSSH public key file (one key per line; '-': stdin)")
    ka.set_defaults(fn=cmd_key)
    kl = keys.add_parser("list")
    kl.add_argument("--user")
    kl.set_defaults(fn=cmd_key)
    kr = keys.add_parser("remove")
    kr.add_argument("id", type=int)
    kr.set_defaults(fn=cmd_key)

    rec = sub.add_parser("recordings", help="session recordings")
    recs = rec.add_subparsers(dest="recordings_cmd", required=True)
    rx = recs.add_parser("export", help="recordings and the records that seal them, as a "
                                        "tar.gz with a manifest")
    rx.add_argument("--out", required=True, help="the .tar.gz to write")
    rx.add_argument("--user")
    rx.add_argument("--connection")
    rx.add_argument("--from", help="ISO date/time or an age (7d)")
    rx.add_argument("--to", help="ISO date/time or an age")
    rx.add_argument("--format", choices=("asciicast", "transcript"),
                    help="terminal recordings (SSH) or statement transcripts (PostgreSQL)")
    rx.set_defaults(fn=cmd_recordings)

    sc = sub.add_parser("ssh-config", help="print ~/.ssh/config Host blocks for the SSH "
                                           "gateway's connections")
    sc.add_argument("--user", help="your keyturn user name (default $USER)")
    sc.add_argument("--host", help="the gateway's address as clients reach it (default "
                                   "the listener's)")
    sc.set_defaults(fn=cmd_ssh_config)

    us = sub.add_parser("user", help="portal sign-in accounts")
    uss = us.add_subparsers(dest="user_cmd", required=True)
    sp_pw = uss.add_parser("set-password", help="set a local portal password for a configured "
                                                 "user")
    sp_pw.add_argument("name")
    sp_pw.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
    sp_pw.set_defaults(fn=cmd_user)

    for name in ("tickets", "approve", "reject"):
        sp = sub.add_parser(name, help={"tickets": "list tickets (uses the API)",
                                        "approve": "approve a ticket", "reject": "reject a ticket"
                                        }[name])
        sp.add_argument("--url", help="portal URL (default: $KEYTURN_URL or the config's "
                                      "portal.public_url)")
        if name == "tickets":
            sp.add_argument("--status")
            sp.add_argument("--mine", action="store_true")
            sp.add_argument("--limit", type=int, default=50)
            sp.add_argument("--json", action="store_true")
            sp.set_defaults(fn=cmd_tickets)
        else:
            sp.add_argument("ticket", type=int)
            if name == "approve":
                sp.add_argument("--comment", default=None)
            else:
                sp.add_argument("--reason", required=True)
            sp.set_defaults(fn=cmd_decide)

    au = sub.add_parser("audit", help="audit trail")
    aus = au.add_subparsers(dest="audit_cmd", required=True)
    av = aus.add_parser("verify", help="check the hash chain")
    av.add_argument("--json", action="store_true")
    av.set_defaults(fn=cmd_audit)
    ai = aus.add_parser("ingest", help="move gateway audit spool records into the store")
    ai.add_argument("--follow", action="store_true",
                    help="keep ingesting until SIGTERM, then drain (run by the gateway)")
    ai.set_defaults(fn=cmd_audit)
    ae = aus.add_parser("export", help="export records")
    ae.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    ae.add_argument("--since", help="ISO time or age (2h, 7d)")
    ae.add_argument("--until", help="ISO time or age")
    ae.add_argument("-o", "--output", help="file (default stdout)")
    ae.set_defaults(fn=cmd_audit)
    _config_option_everywhere(p)
    return p


def _config_option_everywhere(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` is accepted after any subcommand too (``keyturn policy explain -c F``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("-c" in a.option_strings for a in sub._actions):
                    sub.add_argument("-c", "--config", default=argparse.SUPPRESS,
                                     help="config file (also accepted before the command)")
                _config_option_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        return int(args.fn(args) or 0)
    except KeyturnError as exc:
        print(f"keyturn: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
