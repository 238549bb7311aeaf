"""Portal views through the real app (Flask test client): sign-in, sessions,
CSRF, security headers, the role × route matrix, deciding, tokens."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from portal_support import (  # noqa: F401 - fixtures
    CONFIG,
    PASSWORD,
    Auth,
    app_fixture,
    auth_fixture,
    client_fixture,
    csrf_of,
    make_services,
    make_ticket,
    svc_fixture,
)

from keyturn.approvals import TicketRequest
from keyturn.config import parse_config
from keyturn.services import Services, build_services
from portal import create_app

# ---------------------------------------------------------------- sign-in


def test_login_with_password_and_bad_passwords(auth: Auth, svc: Services) -> None:
    r = auth.login("bob", "wrong-password-123")
    assert r.status_code == 401
    assert "Unknown user or wrong password." in r.text
    r = auth.login("nobody", PASSWORD)
    assert r.status_code == 401
    assert "Unknown user or wrong password." in r.text  # same answer: no user enumeration
    assert auth.client.get("/queue").status_code == 302
    r = auth.login("bob")
    assert r.status_code == 303
    assert auth.client.get("/queue").status_code == 200
    failed = [r for r in svc.audit.iter_records(kind="login") if r["outcome"] == "failed"]
    assert [r["user"] for r in failed] == ["bob", "nobody"]


def test_login_needs_csrf_token(client: FlaskClient) -> None:
    client.get("/login")
    r = client.post("/login", data={"username": "bob", "password": PASSWORD})
    assert r.status_code == 403
    assert client.get("/queue").status_code == 302


def test_next_is_never_an_open_redirect(auth: Auth) -> None:
    page = auth.client.get("/login")
    for target, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"),
                             ("/\\evil.example", "/"), ("/history?q=x", "/history?q=x")):
        auth.client.get("/logout")
        page = auth.client.get("/login")
        r = auth.client.post("/login", data={"username": "carol", "password": PASSWORD,
                                             "next": target, "csrf_token": csrf_of(page.text)})
        assert r.status_code == 303
        assert r.headers["Location"] == expected, target
        auth.client.post("/logout", data={"csrf_token": auth.csrf("/mine")})


def test_account_of_user_removed_from_config_is_refused(tmp_path: Path) -> None:
    first = make_services(tmp_path)
    # Same store, a config without carol: her account must stop working.
    cfg = parse_config((CONFIG % {"db": tmp_path / "k.db", "portal_extra": ""}).replace(
        "    carol: {groups: [auditors]}\n", ""), first.config.path)
    r = Auth(create_app(build_services(cfg)).test_client()).login("carol")
    assert r.status_code == 401


def test_session_cookie_flags_and_expiry(tmp_path: Path) -> None:
    c = create_app(make_services(tmp_path, "  public_url: https://keyturn.example\n"
                                           "  session_lifetime: 1h\n")).test_client()
    page = c.get("/login", base_url="https://keyturn.example")
    r = c.post("/login", base_url="https://keyturn.example",
               data={"username": "bob", "password": PASSWORD,
                     "csrf_token": csrf_of(page.text)})
    cookie = r.headers["Set-Cookie"]
    assert "keyturn_session=" in cookie
    for flag in ("Secure", "HttpOnly", "SameSite=Lax"):
        assert flag in cookie
    assert "Strict-Transport-Security" in r.headers
    assert c.get("/queue", base_url="https://keyturn.example").status_code == 200
    with c.session_transaction(base_url="https://keyturn.example") as s:
        s["kt_auth"]["at"] = time.time() - 3601
    r = c.get("/queue", base_url="https://keyturn.example")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_security_headers_forbid_inline_script(auth: Auth) -> None:
    r = auth.client.get("/login")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-store"
    auth.login("bob")
    for path in ("/queue", "/mine", "/tokens", "/policies"):
        html = auth.client.get(path).text
        assert "<script>" not in html and " style=" not in html and "onclick" not in html
        assert 'src="/static/htmx-2.0.11.min.js"' in html


def test_htmx_is_vendored_not_from_a_cdn(client: FlaskClient) -> None:
    r = client.get("/static/htmx-2.0.11.min.js")
    assert r.status_code == 200 and b"htmx" in r.data[:2000]
    assert "cdn" not in client.get("/login").text.lower()


# ---------------------------------------------------------------- CSRF


def test_csrf_missing_or_forged_is_refused(auth: Auth, svc: Services) -> None:
    tid = make_ticket(svc)
    auth.login("bob")
    c = auth.client
    r = c.post(f"/tickets/{tid}/approve", data={"comment": "x"})
    assert r.status_code == 403
    r = c.post(f"/tickets/{tid}/approve", data={"comment": "x", "csrf_token": "forged"})
    assert r.status_code == 403
    r = c.post(f"/tickets/{tid}/approve", headers={"X-CSRF-Token": "forged",
                                                   "HX-Request": "true"})
    assert r.status_code == 403
    # A token from another person's session does not work in this one.
    other = Auth(c.application.test_client())
    other.login("dana")
    r = c.post(f"/tickets/{tid}/approve", data={"csrf_token": other.csrf()})
    assert r.status_code == 403
    assert svc.approvals.get(tid).status == "pending"
    # The real token works, as a form field and as HTMX's header.
    r = auth.post(f"/tickets/{tid}/approve", {"comment": "fine"}, htmx=True)
    assert r.status_code == 200
    assert svc.approvals.get(tid).status == "approved"


def test_logout_needs_csrf(auth: Auth) -> None:
    auth.login("bob")
    assert auth.client.post("/logout").status_code == 403
    assert auth.client.get("/queue").status_code == 200
    r = auth.post("/logout")
    assert r.status_code == 303
    assert auth.client.get("/queue").status_code == 302


def test_api_stays_token_authenticated_without_csrf(app: Flask, svc: Services) -> None:
    token = svc.identities.create_token("bob").token
    tid = make_ticket(svc)
    r = app.test_client().post(f"/api/v1/tickets/{tid}/approve", json={},
                               headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json["ticket"]["status"] == "approved"
    r = app.test_client().get("/api/v1/tickets")
    assert r.status_code == 401 and r.json["error"] == "unauthorized"


def test_reordering_and_invisible_characters_are_shown_to_approvers(svc: Services,
                                                                    auth: Auth) -> None:
    """A right-to-left override in a comment would make the page (or a chat message) show
    the statement's end in another order than the one that runs: approvers see it named."""
    from bots.render import full_text

    sql = "DELETE FROM orders -- \u202e1 = diw ;\u202c\u200b WHERE id = 1"
    tid = make_ticket(svc, statement=sql)
    auth.login("bob")
    html = auth.client.get(f"/tickets/{tid}").get_data(as_text=True)
    assert "\u202e" not in html and "\u200b" not in html
    assert "⟨U+202E⟩" in html and "⟨U+200B⟩" in html
    queue = auth.client.get("/queue").get_data(as_text=True)
    assert "\u202e" not in queue and "⟨U+202E⟩" in queue
    shown = full_text(svc.approvals.get(tid).__dict__)
    assert "\u202e" not in shown and "⟨U+202E⟩" in shown and "⟨U+202C⟩" in shown


# ---------------------------------------------------------------- authorization matrix

ROUTES = ["/queue", "/mine", "/history", "/audit", "/audit/chain", "/export", "/tokens",
          "/policies", "/dashboard", "/audit/sessions/s-abc123"]
ALLOWED = {
    "alice": {"/mine", "/tokens", "/policies"},                             # engineer
    "bob": {"/queue", "/mine", "/tokens", "/policies"},                     # approver
    "carol": {"/mine", "/history", "/audit", "/audit/chain", "/export", "/tokens", "/policies",
              "/audit/sessions/s-abc123"},                                  # auditor
    "mona": {"/queue", "/mine", "/history", "/tokens", "/policies", "/dashboard"},  # manager
    "adam": set(ROUTES),                                                    # admin
}


@pytest.mark.parametrize("user", sorted(ALLOWED))
def test_role_route_matrix(app: Flask, svc: Services, user: str) -> None:
    make_ticket(svc)
    anon = app.test_client()
    a = Auth(app.test_client())
    a.login(user)
    for path in ROUTES:
        assert anon.get(path).status_code == 302, path  # to the sign-in page
        status = a.client.get(path).status_code
        assert status == (200 if path in ALLOWED[user] else 403), (user, path, status)


@pytest.mark.parametrize("user, status", [("alice", 200), ("bob", 200), ("carol", 200),
                                          ("mona", 200), ("adam", 200), ("erin", 200)])
def test_ticket_visibility(app: Flask, svc: Services, user: str, status: int) -> None:
    tid = make_ticket(svc)
    a = Auth(app.test_client())
    a.login(user)
    assert a.client.get(f"/tickets/{tid}").status_code == status


def test_idor_ticket_of_someone_else(app: Flask, svc: Services) -> None:
    # erin's ticket for the dbas group: alice (engineer) and bob (other approver group)
    # may not see it, nor decide it by posting directly.
    tid = make_ticket(svc, "erin", approvers=("dbas",))
    for user in ("alice", "bob"):
        a = Auth(app.test_client())
        a.login(user)
        assert a.client.get(f"/tickets/{tid}").status_code == 403
        assert a.post(f"/tickets/{tid}/approve").status_code == 403
        assert a.post(f"/tickets/{tid}/reject", {"reason": "no"}).status_code == 403
    assert svc.approvals.get(tid).status == "pending"
    a = Auth(app.test_client())
    a.login("alice")
    assert a.client.get("/tickets/999999").status_code == 404


# ---------------------------------------------------------------- deciding


def _as(flask_app: Flask, user: str) -> Auth:
    a = Auth(flask_app.test_client())
    a.login(user)
    return a


def test_approve_with_comment(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    bob = _as(app, "bob")
    page = bob.client.get(f"/tickets/{tid}").text
    assert f'action="/tickets/{tid}/approve"' in page
    r = bob.post(f"/tickets/{tid}/approve", {"comment": "checked with finance"},
                 page=f"/tickets/{tid}")
    assert r.status_code == 200
    assert f"Ticket {tid} approved." in r.text
    t = svc.approvals.get(tid)
    assert (t.status, t.decided_by, t.decision_comment) == ("approved", "bob",
                                                            "checked with finance")
    votes = svc.approvals.detail(tid)["votes"]
    assert votes[0]["via"] == "portal"


def test_reject_needs_a_reason_and_keeps_what_was_typed(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    bob = _as(app, "bob")
    r = bob.post(f"/tickets/{tid}/reject", {"reason": "   "}, htmx=True)
    assert r.status_code == 400
    assert "A rejection needs a reason" in r.text
    assert svc.approvals.get(tid).status == "pending"
    r = bob.post(f"/tickets/{tid}/reject", {"reason": "use the admin tool"}, htmx=True)
    assert r.status_code == 200
    t = svc.approvals.get(tid)
    assert (t.status, t.decision_comment) == ("rejected", "use the admin tool")


def test_separation_of_duties(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc, "erin")  # erin is an approver too
    erin = _as(app, "erin")
    page = erin.client.get(f"/tickets/{tid}").text
    assert "Approve</button>" not in page
    assert "another approver must decide it" in page
    r = erin.post(f"/tickets/{tid}/approve", {"comment": "mine"}, htmx=True)
    assert r.status_code == 403
    assert "separation of duties" in r.text
    assert svc.approvals.get(tid).status == "pending"


@pytest.mark.parametrize("user", ["alice", "carol", "mona", "adam"])
def test_non_approvers_cannot_decide(app: Flask, svc: Services, user: str) -> None:
    tid = make_ticket(svc, "erin")
    a = _as(app, user)
    assert "Approve</button>" not in a.client.get(f"/tickets/{tid}").text
    r = a.post(f"/tickets/{tid}/approve", {"comment": "x"})
    assert r.status_code == 403
    # alice may not even see erin's ticket; the others see it but cannot vote
    assert ("You may not see" if user == "alice" else "not in an approver group") in r.text
    assert svc.approvals.get(tid).status == "pending"


def test_decided_elsewhere_shows_the_outcome(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    dana = _as(app, "dana")
    token = dana.csrf(f"/tickets/{tid}")  # dana has the page open...
    svc.approvals.vote(tid, svc.identities.identity_of("bob"), "reject", "wrong table",
                       via="slack")  # ...while bob rejects in chat
    r = dana.client.post(f"/tickets/{tid}/approve", data={"comment": "ok"},
                         headers={"X-CSRF-Token": token, "HX-Request": "true"})
    assert r.status_code == 409
    assert "already decided elsewhere" in r.text
    assert "rejected by bob (“wrong table”)" in r.text
    assert svc.approvals.get(tid).status == "rejected"


def test_a_ticket_of_any_protocol_shows_its_own_facts(app: Flask, svc: Services) -> None:
    """The page knows no protocol: the action's language names and formats it, and the
    protocol's labelled facts are listed as given."""
    t = svc.approvals.create(TicketRequest(
        requester="alice", requester_groups=("engineers",), connection="shop",
        statement="systemctl restart nginx && rm -rf /tmp/cache", classification="admin",
        rule="restarts", reason="services", approver_groups=("approvers",), min_approvals=1,
        timeout=600, protocol="ssh", language="shell",
        facts=(("Class", "admin"), ("Programs", "systemctl, rm"), ("Host key", "verified"))))
    html = _as(app, "dana").client.get(f"/tickets/{t.id}").text
    assert ">Command</h2>" in html and ">Statement</h2>" not in html
    # Highlighted as the shell reads it, never reformatted: the text is the text that runs.
    assert '<pre class="shell highlight"><code>systemctl<span class="w"> </span>restart' in html
    assert '<span class="o">&amp;&amp;</span>' in html
    assert re.sub(r"<[^>]+>", "", html.split('<pre class="shell highlight">')[1]
                  .split("</pre>")[0]) == "systemctl restart nginx &amp;&amp; rm -rf /tmp/cache"
    for label, value in (("Programs", "systemctl, rm"), ("Host key", "verified")):
        assert f"<dt>{label}</dt><dd>{value}</dd>" in html
    assert "Estimated rows" not in html


def test_ticket_page_shows_the_context(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc, statement="delete from orders where status='cancelled' and id<10")
    svc.approvals.vote(tid, svc.identities.identity_of("bob"), "approve", "go", via="api")
    svc.approvals.finish(tid, "execute", rows=7)
    html = _as(app, "dana").client.get(f"/tickets/{tid}").text
    for needle in ("alice", "engineers", "shop", "10.0.0.7", "psql", "writes",
                   "data changes need a second pair of eyes", "42 (EXPLAIN)", "1 of 1",
                   "<dt>Transaction open</dt><dd>no</dd>",
                   "alice&#39;s request held for approval by rule writes",
                   "bob approved: <q>go</q>", "in the API",
                   "approved: enough approvals to run it", "Approved by bob", "executed: 7 rows",
                   '<span class="k">DELETE</span>', '<span class="s1">\'cancelled\'</span>'):
        assert needle in html, needle
    # The timeline reads as sentences: no internal event names reach a person.
    timeline = html[html.index('id="ticket-timeline"'):]
    for internal in ("vote:approve", "<b>decided</b>", "<b>created</b>"):
        assert internal not in timeline, internal
    # pretty-printed: the WHERE clause starts its own line
    assert "\n<span class=\"k\">WHERE</span>" in html


def test_statement_markup_is_escaped(app: Flask, svc: Services) -> None:
    evil = "UPDATE t SET a = '</code><script>alert(1)</script>' -- <img src=x onerror=y>"
    tid = make_ticket(svc, statement=evil)
    bob = _as(app, "bob")
    for html in (bob.client.get(f"/tickets/{tid}").text, bob.client.get("/queue").text):
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;" in html


def test_live_ticket_poll_only_swaps_on_change(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc)
    bob = _as(app, "bob")
    hx = {"HX-Request": "true"}
    r = bob.client.get(f"/tickets/{tid}?v=pending.1", headers=hx)
    assert r.status_code == 204
    svc.approvals.vote(tid, svc.identities.identity_of("dana"), "approve", None)
    r = bob.client.get(f"/tickets/{tid}?v=pending.1", headers=hx)
    assert r.status_code == 200 and "<html" not in r.text
    assert "approved" in r.text and "dana" in r.text


# ---------------------------------------------------------------- queue and mine


def test_queue_filters_marks_and_fragment(app: Flask, svc: Services) -> None:
    now = time.time()
    a = make_ticket(svc, "alice", connection="shop", now=now - 3600, timeout=7200)
    b = make_ticket(svc, "erin", connection="billing", rule="writes", now=now - 60)
    c = make_ticket(svc, "alice", approvers=("dbas",))  # not bob's to see
    bob = _as(app, "bob")
    html = bob.client.get("/queue").text
    assert f'data-ticket="{a}"' in html and f'data-ticket="{b}"' in html
    assert f'data-ticket="{c}"' not in html
    assert html.count("● you can decide") == 2
    assert f'age <b class="age" data-since="{now - 3600}">1h 00m</b>' in html
    r = bob.client.get("/queue?connection=billing", headers={"HX-Request": "true"})
    assert "HX-Request" in r.headers["Vary"]
    assert "<html" not in r.text and r.text.lstrip().startswith("<section id=\"queue\"")
    assert f'data-ticket="{b}"' in r.text and f'data-ticket="{a}"' not in r.text
    assert f'data-ticket="{a}"' in bob.client.get("/queue?requester=alice").text
    r = bob.client.get("/queue?age=30m").text
    assert f'data-ticket="{a}"' in r and f'data-ticket="{b}"' not in r
    assert bob.client.get("/queue?age=soon").status_code == 400
    # erin's own ticket is listed for her but not marked as hers to decide
    erin = _as(app, "erin").client.get("/queue").text
    assert erin.count("● you can decide") == 1
    # a manager sees every queue, decides nothing
    mona = _as(app, "mona").client.get("/queue").text
    assert f'data-ticket="{c}"' in mona and "● you can decide" not in mona
    svc.approvals.vote(a, svc.identities.identity_of("dana"), "approve", None)
    assert f'data-ticket="{a}"' not in bob.client.get("/queue",
                                                      headers={"HX-Request": "true"}).text


def test_empty_queue_and_my_requests(app: Flask, svc: Services) -> None:
    bob = _as(app, "bob")
    assert "Nothing waiting" in bob.client.get("/queue").text
    alice = _as(app, "alice")
    assert "No requests yet" in alice.client.get("/mine").text
    tid = make_ticket(svc, "alice")
    make_ticket(svc, "erin")
    html = alice.client.get("/mine", headers={"HX-Request": "true"}).text
    assert f"#{tid}" in html and html.count("<tr>") == 2  # header + alice's one
    svc.approvals.vote(tid, svc.identities.identity_of("bob"), "reject", "not today")
    html = alice.client.get("/mine", headers={"HX-Request": "true"}).text
    assert "rejected" in html and "not today" in html


def test_error_pages(app: Flask) -> None:
    alice = _as(app, "alice")
    r = alice.client.get("/nope")
    assert r.status_code == 404 and "Not found" in r.text and "<html" in r.text
    r = alice.client.get("/audit")
    assert r.status_code == 403 and "Not allowed" in r.text
    r = alice.client.get("/audit", headers={"HX-Request": "true"})
    assert r.status_code == 403 and r.headers["HX-Retarget"] == "#flash"


# ---------------------------------------------------------------- tokens


def test_tokens_create_shown_once_list_revoke(app: Flask, svc: Services) -> None:
    alice = _as(app, "alice")
    r = alice.post("/tokens", {"description": "laptop", "ttl": "7d"})
    assert r.status_code == 201
    token = r.text.split('class="token" readonly value="')[1].split('"')[0]
    assert token.startswith("kt_")
    assert svc.identities.authenticate_token(token).user == "alice"
    page = alice.client.get("/tokens").text
    assert token not in page and "laptop" in page and token[:10] in page
    tid = svc.identities.list_tokens("alice")[-1].id
    r = alice.post(f"/tokens/{tid}/revoke")
    assert r.status_code == 200 and "revoked" in r.text
    with pytest.raises(Exception, match="revoked"):
        svc.identities.authenticate_token(token)
    kinds = [(r["action"], r["user"]) for r in svc.audit.iter_records(kind="token")]
    assert kinds == [("create", "alice"), ("revoke", "alice")]


def test_tokens_idor_and_bad_input(app: Flask, svc: Services) -> None:
    bobs = svc.identities.create_token("bob", description="bob's")
    alice = _as(app, "alice")
    r = alice.post(f"/tokens/{bobs.id}/revoke")
    assert r.status_code == 404 and f"You have no token {bobs.id}" in r.text
    assert svc.identities.authenticate_token(bobs.token).user == "bob"
    assert "bob's" not in alice.client.get("/tokens").text
    r = alice.post("/tokens", {"description": "x", "ttl": "100y"})
    assert r.status_code == 400 and "lifetimes" in r.text
    assert svc.identities.list_tokens("alice") == []


# ---------------------------------------------------------------- policies


def test_try_a_statement_shows_policy_explain(app: Flask) -> None:
    alice = _as(app, "alice")
    r = alice.post("/policies", {"user": "alice", "connection": "shop",
                                 "sql": "DELETE FROM orders"}, page="/policies")
    assert r.status_code == 200
    assert "&#34;action&#34;: &#34;review&#34;" in r.text
    assert "&#34;rule&#34;: &#34;writes&#34;" in r.text
    r = alice.post("/policies", {"user": "bob", "connection": "shop", "sql": "DROP TABLE x"},
                   page="/policies")
    assert r.status_code == 403 and "only as yourself" in r.text
    r = alice.post("/policies", {"user": "alice", "connection": "nope", "sql": "select 1"},
                   page="/policies")
    assert r.status_code == 400 and "Unknown connection" in r.text
    mona = _as(app, "mona")
    r = mona.post("/policies", {"user": "bob", "connection": "shop", "sql": "DROP TABLE x"},
                  page="/policies")
    assert r.status_code == 200 and "&#34;action&#34;: &#34;block&#34;" in r.text
    page = mona.client.get("/policies").text
    assert "no-ddl" in page and "1 of approvers" in page


# ---------------------------------------------------------------- dashboard


def test_dashboard_figures(app: Flask, svc: Services) -> None:
    now = time.time()
    bob = svc.identities.identity_of("bob")
    for took in (60, 120, 180, 240, 3600):
        tid = make_ticket(svc, now=now - 7200, timeout=7200)
        svc.approvals.vote(tid, bob, "approve", None, now=now - 7200 + took)
    make_ticket(svc, "erin", now=now - 500, timeout=600)  # stale: past half its timeout
    make_ticket(svc, "alice", connection="billing")
    html = _as(app, "mona").client.get("/dashboard").text
    assert '<span class="num">2</span><span>pending now</span>' in html
    assert '<span class="num">1</span><span>stale' in html
    # shop: 5 decisions, median 3m, p95 1h
    assert "<td>shop</td><td>5</td><td>3m 00s</td><td>1h 00m</td>" in html
    assert "<td>approvers</td><td>5</td><td>3m 00s</td><td>1h 00m</td>" in html
    assert "<svg class=\"chart\"" in html and "<rect class=\"bar\"" in html
    assert "<span>alice</span><b>6</b>" in html


def test_password_guessing_is_throttled(app: Flask, svc: Services) -> None:
    a = Auth(app.test_client())
    for _ in range(5):
        assert a.login("bob", "guess-guess-guess").status_code == 401
    r = a.login("bob")  # the right password, but too late
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    assert a.client.get("/queue").status_code == 302
    # Another user from another address is not affected...
    other = app.test_client()
    page = other.get("/login", environ_base={"REMOTE_ADDR": "10.9.9.9"})
    r = other.post("/login", environ_base={"REMOTE_ADDR": "10.9.9.9"},
                   data={"username": "dana", "password": PASSWORD,
                         "csrf_token": csrf_of(page.text)})
    assert r.status_code == 303
    outcomes = [x["outcome"] for x in svc.audit.iter_records(kind="login")]
    assert outcomes == ["failed"] * 5 + ["throttled", "ok"]


def test_throttle_window_passes() -> None:
    from portal.throttle import LoginThrottle

    t = LoginThrottle(limit=2, window=60)
    t.failed("bob", "1.1.1.1", now=0)
    t.failed("bob", "2.2.2.2", now=10)
    assert t.wait_seconds("BOB", "3.3.3.3", now=20) == 40  # by user name, any case
    assert t.wait_seconds("dana", "1.1.1.1", now=20) == 0
    assert t.wait_seconds("bob", "3.3.3.3", now=61) == 0


def test_api_visibility_follows_portal_roles(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc, "erin", approvers=("dbas",))
    c = app.test_client()
    for user, sees in (("mona", True), ("adam", True), ("carol", True), ("bob", False),
                       ("alice", False)):
        token = svc.identities.create_token(user).token
        r = c.get(f"/api/v1/tickets/{tid}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == (200 if sees else 403), user


def test_two_person_rule_in_the_portal(app: Flask, svc: Services) -> None:
    tid = make_ticket(svc, "alice", n=2)
    bob, dana = _as(app, "bob"), _as(app, "dana")
    r = bob.post(f"/tickets/{tid}/approve", {"comment": "looks right"}, htmx=True)
    assert r.status_code == 200 and "1 of 2 needed" in r.text
    assert svc.approvals.get(tid).status == "pending"
    row = bob.client.get("/queue").text.split(f'data-ticket="{tid}"')[1].split("</li>")[0]
    assert "you approved" in row and "you can decide" not in row
    r = bob.post(f"/tickets/{tid}/approve", htmx=True)
    assert r.status_code == 409 and "already voted" in r.text
    r = dana.post(f"/tickets/{tid}/approve", htmx=True)
    assert r.status_code == 200 and f"Ticket {tid} approved." in r.text
    assert svc.approvals.get(tid).decided_by == "bob, dana"


def test_signed_in_visit_to_login_goes_home(app: Flask) -> None:
    bob = _as(app, "bob")
    r = bob.client.get("/login")
    assert r.status_code == 302 and r.headers["Location"] == "/"


PUBLIC = {"static", "auth.login", "auth.sso_start", "auth.sso_callback", "healthz"}


def _concrete(rule: str) -> str:
    return (rule.replace("<int:ticket_id>", "1").replace("<int:token_id>", "1")
            .replace("<int:link_id>", "1").replace("<int:key_id>", "1").replace("<int:seq>", "1")
            .replace("<any(approve, reject):vote>", "approve").replace("<session_id>", "s"))


def test_every_state_changing_route_needs_the_csrf_token(app: Flask, svc: Services) -> None:
    make_ticket(svc)
    svc.identities.create_token("adam")
    adam = _as(app, "adam")
    checked = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api.") or rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"GET", "HEAD", "OPTIONS"}):
            r = adam.client.open(_concrete(rule.rule), method=method, data={"x": "1"})
            assert r.status_code == 403, (rule.rule, method, r.status_code)
            checked.append(rule.endpoint)
    assert {"tickets.decide", "tokens.create", "tokens.revoke", "export.download",
            "configview.connections", "auth.logout", "auth.login", "chatlinks.claim",
            "chatlinks.unlink", "keys.add", "keys.remove"} <= set(checked)


def test_every_page_needs_sign_in(app: Flask) -> None:
    anon = app.test_client()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC or rule.endpoint.startswith("api."):
            continue
        r = anon.get(_concrete(rule.rule))
        if rule.endpoint.startswith("live."):  # an event stream cannot show a sign-in form
            assert r.status_code == 401, rule.rule
            continue
        assert r.status_code in (302, 405), rule.rule
        if r.status_code == 302:
            assert r.headers["Location"].startswith("/login"), rule.rule
