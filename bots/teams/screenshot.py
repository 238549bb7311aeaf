"""Render the ticket Adaptive Card with Microsoft's ``adaptivecards`` renderer
in headless Chromium, for the docs (docs/chatops-teams-card*.png).

    python -m bots.teams.screenshot OUT_DIR

Needs ``npm`` and ``chromium``; installs ``adaptivecards`` into a temporary
directory. Not used at run time.

It must not be imported by the running product.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bots.render import ticket_view
from bots.teams.cards import ticket_card

SAMPLE: dict[str, Any] = {
    "id": 42, "status": "pending", "requester": "alice", "connection": "shop",
    "statement": "DELETE FROM orders WHERE status = 'cancelled' AND created_at < now() - "
                 "interval '90 days'",
    "classification": "write", "rule": "writes-need-approval",
    "reason": "data changes need a second pair of eyes",
    "facts": [["Class", "write on public.orders"], ["Estimated rows", "40 (EXPLAIN)"],
              ["Transaction open", "no"]],
    "expires_at": 0.0, "min_approvals": 2, "decided_by": None, "decided_at": None,
    "decision_comment": None, "result_rows": None, "result_error": None,
    "votes": [{"approver": "dana", "vote": "approve", "comment": None, "via": "teams",
               "at": 0.0}],
}

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<style>body{{margin:0;padding:16px;background:#f5f5f5;font-family:'Segoe UI',sans-serif}}
#card{{width:520px;background:#fff;border-radius:6px;box-shadow:0 1px 4px #0003}}
.ac-pushButton{{padding:6px 14px;margin-right:6px;border:1px solid #8a8886;border-radius:4px;
background:#fff}}.ac-textBlock{{line-height:1.35}}</style>
<script src="adaptivecards.js"></script></head><body><div id="card"></div><script>
var card = new AdaptiveCards.AdaptiveCard();
card.parse({card});
document.getElementById('card').appendChild(card.render());
</script></body></html>"""


def render(out: Path) -> list[Path]:
    npm, chromium = shutil.which("npm"), shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not npm or not chromium:
        raise SystemExit("needs npm and chromium")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([npm, "install", "--prefix", tmp, "--no-audit", "--no-fund",
                        "adaptivecards@3"], check=True, capture_output=True)
        shutil.copy(work / "node_modules/adaptivecards/dist/adaptivecards.js", work)
        decided = {**SAMPLE, "status": "approved", "decided_by": "dana, bob",
                   "decided_at": 1795900000.0, "votes": SAMPLE["votes"] + [
                       {"approver": "bob", "vote": "approve", "comment": "checked the count",
                        "via": "slack", "at": 0.0}]}
        for name, detail in (("pending", {**SAMPLE, "expires_at": 1795900000.0 + 420}),
                             ("approved", decided)):
            view = ticket_view(detail, portal_url="https://keyturn.example.com", limit=700,
                               now=1795900000.0)
            page = work / f"{name}.html"
            page.write_text(PAGE.format(card=json.dumps(ticket_card(view))))
            target = out / f"chatops-teams-card-{name}.png"
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", f"--screenshot={target}",
                            "--window-size=560,560", page.as_uri()], check=True,
                           capture_output=True, timeout=60)
            written.append(target)
    return written


if __name__ == "__main__":
    for p in render(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(p)
