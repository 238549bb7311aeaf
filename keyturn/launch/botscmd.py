"""``keyturn bots`` and its subcommands (link, unlink, links, outbox, claim).

Part of the launcher: with no subcommand it runs the Slack / Teams bots alone through the
runner; the subcommands manage chat account links (bots.links) and show the undelivered
notifications (bots.models), and ``claim`` redeems a link code over HTTP with the
caller's own access token.

What it must not do: be imported by bots/ (the bots know nothing of how they are
launched), or keep chat logic of its own: linking rules live in bots.links, and it only
parses, calls and prints.
"""

from __future__ import annotations

import argparse
import os
import sys

from bots.settings import CHAT
from keyturn.config import Config
from keyturn.errors import KeyturnError


def run_bots_command(args: argparse.Namespace, cfg: Config) -> int:
    if args.bots_cmd is None:
        if CHAT.of(cfg) is None:
            print("no integrations configured (integrations: slack / teams in the config); "
                  "nothing to run", file=sys.stderr)
            return 2
        from keyturn.launch.runner import run

        return run(cfg, gateway=False, portal=False, bots=True)
    if args.bots_cmd == "claim":
        return _claim(args, cfg)
    from bots.links import Links
    from keyturn.services import build_services

    svc = build_services(cfg)
    links = Links(cfg, svc.store)
    by = os.environ.get("USER") or "cli"
    if args.bots_cmd == "link":
        row = links.link(args.platform, args.id, args.user, by=by)
        svc.record_audit(kind="chat", user=args.user, action="link", outcome="ok",
                         detail={"platform": args.platform, "platform_user": args.id, "by": by})
        print(f"{row.platform} account {row.platform_user} is now {row.user}")
        return 0
    if args.bots_cmd == "unlink":
        if not links.unlink(args.platform, args.id):
            raise KeyturnError(f"no {args.platform} link for {args.id}")
        svc.record_audit(kind="chat", action="unlink", outcome="ok",
                         detail={"platform": args.platform, "platform_user": args.id, "by": by})
        print(f"{args.platform} account {args.id} unlinked")
        return 0
    if args.bots_cmd == "links":
        rows = links.all()
        if not rows:
            print("no links")
        for r in rows:
            print(f"{r.platform:<6} {r.platform_user:<40} {r.user:<16} {r.source}")
        return 0
    from sqlalchemy import select

    from bots.models import OutboxItem

    with svc.store.session() as s:
        waiting = list(s.scalars(select(OutboxItem).where(OutboxItem.sent_at.is_(None))
                                 .order_by(OutboxItem.id)))
    print(f"{len(waiting)} undelivered")
    for item in waiting:
        print(f"{item.id:>6} {item.platform:<6} ticket {item.ticket_id:<6} {item.kind:<10} "
              f"attempts {item.attempts:<3} {item.last_error or ''}")
    return 0


def _claim(args: argparse.Namespace, cfg: Config) -> int:
    """Redeem a link code with the caller's own access token."""
    from keyturn.launch.cli import access_token, token_request

    token = access_token()
    base = args.url or os.environ.get("KEYTURN_BOTS_URL")
    if not base:
        chat = CHAT.of(cfg)
        if chat is None:
            raise KeyturnError("no integrations configured; give --url of `keyturn bots`")
        base = f"http://{chat.listen.host}:{chat.listen.port}"
    data = token_request("POST", base, "/links/claim", {"code": args.code}, token=token,
                         service="the bots", answerer="the bots", fallback="error")
    print(f"{data['platform']} account {data['platform_user']} is now linked to {data['user']}")
    return 0
