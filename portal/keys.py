"""Keys: your SSH public keys, which log you in to the SSH gateway.

Only ever the viewer's own keys: the list is filtered by user and removing passes the
user to ``Identities.remove_key``, which answers "no key" for someone else's id. The
gateway's own host key is shown so people can check what their client is told.

It must not touch another user's keys.
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from keyturn.errors import NotFound
from keyturn.identity import BadKey
from keyturn.services import Services
from portal.roles import require, viewer

bp = Blueprint("keys", __name__)


def services() -> Services:
    return current_app.extensions["keyturn"]


def _gateway_key() -> str | None:
    """The SSH gateway's host key fingerprint, when it has made one."""
    import asyncssh  # the portal shows it; only the gateway generates it

    from proxies.ssh.gateway import host_key_path

    path = host_key_path(services().config)
    if not path.exists():
        return None
    try:
        return str(asyncssh.read_private_key(str(path)).get_fingerprint("sha256"))
    except (OSError, ValueError, asyncssh.KeyImportError):
        return None


def _page(status: int = 200, **extra):  # type: ignore[no-untyped-def]
    rows = services().identities.list_keys(viewer().user)
    cfg = services().config
    ssh = [c.name for c in cfg.connections.values() if c.type == "ssh"]
    listen = cfg.gateway.listener("ssh")
    return render_template("keys.html", keys=rows, connections=ssh, listen=listen,
                           gateway_key=_gateway_key() if ssh else None, **extra), status


@bp.get("/keys")
@require()
def index():  # type: ignore[no-untyped-def]
    return _page()


@bp.post("/keys")
@require()
def add():  # type: ignore[no-untyped-def]
    svc = services()
    text = (request.form.get("key") or "").strip()
    if not text:
        return _page(400, error="Paste one public key (the contents of a .pub file).")
    if len(text) > 16384 or len(text.splitlines()) > 1:
        return _page(400, error="Paste one key at a time, on one line.", pasted=text[:16384])
    try:
        row = svc.identities.add_key(viewer().user, text)
    except BadKey as exc:
        return _page(400, error=f"That key cannot be added: {exc.message}.", pasted=text)
    svc.record_audit(kind="key", user=viewer().user, action="add",
                     detail={"key_id": row.id, "fingerprint": row.fingerprint,
                             "by": "portal"})
    return _page(201, message=f"Key {row.fingerprint} added.")


@bp.post("/keys/<int:key_id>/remove")
@require()
def remove(key_id: int):  # type: ignore[no-untyped-def]
    svc = services()
    try:
        row = svc.identities.remove_key(key_id, user=viewer().user)
    except NotFound:
        return _page(404, error=f"You have no key {key_id}.")
    svc.record_audit(kind="key", user=viewer().user, action="remove",
                     detail={"key_id": row.id, "fingerprint": row.fingerprint,
                             "by": "portal"})
    return _page(message=f"Key {row.fingerprint} removed. It no longer logs you in.")
