"""Connections and policies, read-only, and a "try a statement" box.

The box runs exactly what ``keyturn policy explain`` runs (analyser +
``keyturn.policy.evaluate``) and shows the same JSON. Engineers and approvers
try statements as themselves; managers, auditors and admins may pick any
configured user, to answer "what would happen if alice ran this?".

It must not show secrets (credentials are references) nor run statements on a target.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, render_template, request

from keyturn.services import Services
from portal.roles import ADMIN, AUDITOR, MANAGER, require, viewer

bp = Blueprint("configview", __name__)
MAX_SQL = 20000


def services() -> Services:
    return current_app.extensions["keyturn"]


def explain(user: str, connection: str, sql: str) -> dict[str, Any]:
    from keyturn.analysis import Analyzer, StatementClass
    from keyturn.policy import Request, evaluate

    cfg = services().config
    conn = cfg.connections[connection]
    analyzer = Analyzer(unknown_function_class=StatementClass(conn.unknown_function_class))
    analysis = analyzer.analyze(sql)
    decision = evaluate(cfg, Request(user, cfg.groups_of(user), conn, analysis.statements,
                                     analysis.error))
    out = decision.to_json()
    out["user"], out["groups"], out["connection"] = user, list(cfg.groups_of(user)), conn.name
    return out


@bp.route("/policies", methods=["GET", "POST"])
@require()
def connections():  # type: ignore[no-untyped-def]
    cfg = services().config
    v = viewer()
    may_pick = v.has(MANAGER, AUDITOR, ADMIN)
    form = {"user": v.user, "connection": next(iter(cfg.connections), ""), "sql": ""}
    result = error = None
    status = 200
    if request.method == "POST":
        form = {"user": (request.form.get("user") or v.user).strip(),
                "connection": (request.form.get("connection") or "").strip(),
                "sql": request.form.get("sql") or ""}
        if not may_pick and form["user"] != v.user:
            error, status = "You can try statements only as yourself.", 403
        elif form["user"] not in cfg.users:
            error, status = f"Unknown user {form['user']!r}.", 400
        elif form["connection"] not in cfg.connections:
            error, status = f"Unknown connection {form['connection']!r}.", 400
        elif not form["sql"].strip():
            error, status = "Type a statement to try.", 400
        elif len(form["sql"]) > MAX_SQL:
            error, status = f"The statement is longer than {MAX_SQL} characters.", 400
        else:
            result = json.dumps(explain(form["user"], form["connection"], form["sql"]),
                                indent=2)
    return render_template("policies.html", cfg=cfg, form=form, result=result, error=error,
                           may_pick=may_pick), status
