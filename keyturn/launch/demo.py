"""``keyturn demo``: a complete, throwaway set-up in one command.

Starts a PostgreSQL cluster in ``<dir>/pg``, seeds a ``shop`` database with
fake PII, writes ``<dir>/keyturn.yaml`` (users alice, bob, dana, carol; reads
allowed with customers' PII masked, writes need one approver and changes to
customers two, DDL and file access blocked), issues a token and a portal password
per user, then runs gateway and API in one process on SQLite and
prints the exact psql line and approve command. Ctrl-C stops everything.

Part of the launcher. It must not be used for anything but a throwaway set-up: its
PostgreSQL runs without fsync, and the config, the ``shop`` database and its role are
made anew on every start. It must not touch a server it did not start.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import textwrap
from pathlib import Path

from keyturn.config import load_config
from keyturn.launch.installed import install

DEMO_USERS = {
    "alice": ("engineers", "Alice Adams"),
    "bob": ("approvers", "Bob Brown"),
    "dana": ("approvers", "Dana Diaz"),
    "carol": ("auditors", "Carol Chen"),
}

DEMO_CONFIG = """\
# Keyturn demo configuration (written by `keyturn demo`).
store:
  url: sqlite:///keyturn.db

gateway:
  postgres: 127.0.0.1:{gateway_port}
  tls:
    cert_file: {cert}
    key_file: {key}

portal:
  listen: 127.0.0.1:{portal_port}
  public_url: http://127.0.0.1:{portal_port}

identity:
  users:
    alice: {{groups: [engineers], email: alice@example.com, name: Alice Adams}}
    bob:   {{groups: [approvers], email: bob@example.com, name: Bob Brown}}
    dana:  {{groups: [approvers], email: dana@example.com, name: Dana Diaz}}
    carol: {{groups: [auditors], email: carol@example.com, name: Carol Chen}}

connections:
  - name: shop
    type: postgres
    description: Demo shop database
    target:
      host: 127.0.0.1
      port: {pg_port}
      dbname: shop
      user: shop_app
      password_file: {pw_file}
    policy: shop
    # What the masking hides: results of these columns, whatever the query.
    columns:
      public.customers.email: [pii.email]
      public.customers.ssn: [pii.ssn]
      public.customers.card_number: [pci.card]
      public.customers.phone: [pii.phone]

policies:
  shop:
    default: block
    rules:
      - name: no-file-access
        match: {{class: [file, admin, privilege, procedural, unknown]}}
        action: block
        reason: file access, administration, privileges and unanalysable SQL are blocked
      - name: no-ddl
        match: {{class: ddl}}
        action: block
        reason: schema changes go through migrations, not ad-hoc SQL
      - name: reads-masked
        match: {{class: [read, transaction, session]}}
        action: mask
        reason: customers' personal data is masked for everyone
        mask:
          tags: ["pii.*", "pci.*"]
          style: full
          styles: {{pii.email: email, pci.card: "partial:4"}}
      - name: customer-changes-need-two
        match: {{class: write, tables: ["public.customers"]}}
        action: review
        reason: changing customer records needs two approvers
        review:
          approvers: [approvers]
          min_approvals: 2
          timeout: 10m
      - name: writes-need-approval
        match: {{class: [write, lock, safety]}}
        action: review
        reason: data changes, locks and turning off safety settings need a second pair of eyes
        review:
          approvers: [approvers]
          min_approvals: 1
          timeout: 10m
          mode: hold
"""


def write_demo(base: Path, *, pg_port: int, gateway_port: int, portal_port: int,
               pw_file: Path, cert: Path, key: Path) -> Path:
    path = base / "keyturn.yaml"
    text = DEMO_CONFIG.format(pg_port=pg_port, gateway_port=gateway_port,
                              portal_port=portal_port, pw_file=pw_file, cert=cert, key=key)
    # Chat bots in the demo: an ``integrations:`` block kept in <dir>/integrations.yaml
    # (the config is rewritten on every start; this file is not).
    extra = base / "integrations.yaml"
    if extra.exists():
        text += "\n# from integrations.yaml\n" + extra.read_text()
    path.write_text(text)
    return path


def run_demo(directory: str, *, pg_port: int | None, gateway_port: int,
             portal_port: int) -> int:
    from keyturn.launch.demo_seed import seed_shop
    from keyturn.launch.localpg import LocalPostgres
    from keyturn.launch.runner import run
    from keyturn.services import Services
    from keyturn.tlsutil import ensure_self_signed

    base = Path(directory).resolve()
    base.mkdir(parents=True, exist_ok=True)
    print(f"keyturn demo: working directory {base}", flush=True)
    pg = LocalPostgres(base / "pg", port=pg_port, auth="scram-sha-256")
    print("starting PostgreSQL…", flush=True)
    pg.start()
    try:
        pw_file = base / "shop_app.password"
        if not pw_file.exists():
            pw_file.write_text(secrets.token_urlsafe(24))
            pw_file.chmod(0o600)
        password = pw_file.read_text().strip()
        pg.execute("DROP DATABASE IF EXISTS shop")
        pg.execute("DROP ROLE IF EXISTS shop_app")
        pg.create_role("shop_app", password, password_encryption="scram-sha-256")
        pg.create_database("shop", owner="shop_app")
        seed_shop(pg.dsn("shop", user="shop_app", password=password))
        print("seeded database shop (customers, orders)", flush=True)
        cert, key = base / "gateway.crt", base / "gateway.key"
        ensure_self_signed(cert, key)
        cfg_path = write_demo(base, pg_port=pg.port, gateway_port=gateway_port,
                              portal_port=portal_port, pw_file=pw_file, cert=cert, key=key)
        install()
        config = load_config(cfg_path)
        from portal.settings import PORTAL  # registered by install(); light to import

        public_url = PORTAL.of(config).public_url

        def ready(services: Services) -> None:
            # The portal package is imported lazily, as the runner does: the demo is a
            # composition root like the CLI, and the core never imports surfaces at import time.
            from portal.accounts import set_password

            tokens = {}
            portal_password = secrets.token_urlsafe(9)
            for user in DEMO_USERS:
                tokens[user] = services.identities.create_token(user, description="demo").token
                (base / f"{user}.token").write_text(tokens[user])
                (base / f"{user}.token").chmod(0o600)
                set_password(services.config, services.store, user, portal_password)
            (base / "portal.password").write_text(portal_password)
            (base / "portal.password").chmod(0o600)
            exe = shlex.quote(sys.argv[0]) if sys.argv[0].endswith("keyturn") else "keyturn"
            cfg = shlex.quote(str(cfg_path))
            print(textwrap.dedent(f"""
                ─────────────────────────────────────────────────────────────────────
                Keyturn demo is running.  Gateway 127.0.0.1:{gateway_port}  Portal and API {public_url}

                1. As alice (engineer), connect through the gateway:
                   PGPASSWORD={tokens['alice']} psql "host=127.0.0.1 port={gateway_port} dbname=shop user=alice sslmode=require"
                   Portal {public_url}  password for every demo user: {portal_password}
                   (bob and dana approve, alice requests, carol audits; also in {base}/portal.password)

                   shop=> SELECT full_name, email, ssn, card_number FROM customers LIMIT 3;  -- masked
                   shop=> DELETE FROM orders WHERE status = 'cancelled';   -- held: one approver
                   shop=> UPDATE customers SET city = 'Boston' WHERE id = 1; -- held: two approvers
                   shop=> DROP TABLE orders;                                -- blocked

                2. As bob or dana (approvers): the portal's queue {public_url}/queue, or
                   KEYTURN_TOKEN={tokens['bob']} {exe} -c {cfg} tickets
                   KEYTURN_TOKEN={tokens['bob']} {exe} -c {cfg} approve <ticket> --comment "ok"
                   KEYTURN_TOKEN={tokens['dana']} {exe} -c {cfg} approve <ticket>   -- the second
                   KEYTURN_TOKEN={tokens['bob']} {exe} -c {cfg} reject <ticket> --reason "why"

                3. As carol (auditor): {public_url}/audit shows every statement, the masked
                   columns of alice's reads and who approved what; check the chain with
                   {exe} -c {cfg} audit verify

                Tokens are in {base}/<user>.token.  Ctrl-C stops the demo.
                ─────────────────────────────────────────────────────────────────────
                """), flush=True)

        os.chdir(base)
        return run(config, gateway=True, portal=True, ready=ready)
    finally:
        print("stopping PostgreSQL…", flush=True)
        pg.stop()
