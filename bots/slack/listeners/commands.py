"""``/keyturn mine | pending | status N | help``; every answer is ephemeral.

It must not post anything visible to others or change a ticket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from slack_bolt.async_app import AsyncApp

from bots.context import UNMAPPED
from bots.render import TicketView, ticket_view
from bots.slack.blocks import code, esc, pending_blocks
from bots.slack.listeners.deps import SlackDeps
from keyturn.approvals import PENDING
from keyturn.errors import NotFound

HELP = ("*/keyturn* commands:\n"
        "• `/keyturn mine`: your requests and their status\n"
        "• `/keyturn pending`: requests you can decide, with buttons\n"
        "• `/keyturn status N`: one ticket\n"
        "• `/keyturn link`: link this Slack account to your Keyturn user\n"
        "• `/keyturn help`: this text")
LINK_TEXT = ("To link this Slack account to your Keyturn user, within 10 minutes enter the "
             "code `{code}` on the portal's Chat accounts page (<{portal}/chat-accounts>), or "
             "run, with your access token in KEYTURN_TOKEN:\n`keyturn bots claim {code}`\n"
             "Keep the code to yourself: whoever redeems it decides who this account is.")
OVERSIGHT = {"auditors", "managers", "admins"}


def register(app: AsyncApp, deps: SlackDeps) -> None:
    @app.command("/keyturn")
    async def keyturn(ack: Any, command: dict[str, Any]) -> None:
        words = (command.get("text") or "").split()
        sub = words[0].lower() if words else "help"
        if sub == "link":
            code = await asyncio.to_thread(deps.ctx.links.start_claim, "slack",
                                           command["user_id"])
            await ack(response_type="ephemeral", text=LINK_TEXT.format(
                code=code, portal=deps.ctx.portal_url.rstrip("/")))
            return
        if sub == "help" or sub not in ("mine", "pending", "status"):
            await ack(response_type="ephemeral", text=HELP)
            return
        user = await deps.people.keyturn_user(command["user_id"])
        if user is None:
            deps.ctx.audit_refusal(platform="slack", user=None, platform_user=command["user_id"],
                                   ticket_id=None, reason="unmapped chat user",
                                   action=f"command:{sub}")
            await ack(response_type="ephemeral", text=UNMAPPED)
            return
        answer = await asyncio.to_thread(_answer, deps, user, sub, words[1:])
        await ack(response_type="ephemeral", **answer)


def _view(deps: SlackDeps, ticket_id: int) -> TicketView:
    return ticket_view(deps.ctx.services.approvals.detail(ticket_id),
                       portal_url=deps.ctx.portal_url, limit=deps.settings.statement_chars)


def _answer(deps: SlackDeps, user: str, sub: str, args: list[str]) -> dict[str, Any]:
    svc = deps.ctx.services
    ident = svc.identities.identity_of(user)
    if sub == "mine":
        rows = svc.approvals.find(requester=user, limit=15)
        if not rows:
            return {"text": "You have no requests."}
        lines = [f"• *#{t.id}* {t.status} · {esc(t.classification)} on {esc(t.connection)}: "
                 f"`{esc(' '.join(t.statement.split())[:80])}`" for t in rows]
        return {"text": "Your requests:\n" + "\n".join(lines)}
    if sub == "pending":
        rows = [t for t in svc.approvals.find(status=PENDING, limit=200)
                if svc.approvals.can_decide(ident, t)]
        views = [_view(deps, t.id) for t in rows]
        return {"text": f"{len(views)} request(s) wait for you", "blocks": pending_blocks(views)}
    if not args or not args[0].lstrip("#").isdigit():
        return {"text": "Usage: `/keyturn status N`"}
    tid = int(args[0].lstrip("#"))
    try:
        t = svc.approvals.get(tid)
    except NotFound:
        return {"text": f"There is no ticket #{tid}."}
    if not (t.requester == user or set(ident.groups) & set(t.approver_groups)
            or set(ident.groups) & OVERSIGHT):
        return {"text": f"You may not see ticket #{tid}."}
    v = _view(deps, tid)
    text = (f"*#{v.id}* {v.status_word} · {esc(v.classification)} on {esc(v.connection)} by "
            f"{esc(v.requester)} · {v.approvals} of {v.required} approvals"
            + (f" · {v.time_left} left" if v.pending else f"\n{esc(v.outcome_line())}")
            + f"\n{code(v.statement)}\n<{v.portal_url}|View in portal>")
    return {"text": text}
