"""The SSH gateway end to end: a real OpenSSH server as the target, the real ssh client
through `keyturn up`, approvals through the CLI (another process), the audit trail and
the recordings checked after."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Keyturn, LocalPostgres, free_port, make_keyturn, wait_port
from tests.ssh_support import TARGET_USER, LocalSSHD, fingerprint, keygen, ssh_options

pytestmark = pytest.mark.integration

SSH_POLICY = """
  ssh-ops:
    default: block
    rules:
      - name: tmp-scratch
        match: {class: unknown, programs: [python3]}
        action: block
        reason: no interpreters on production hosts
      - name: shells   # before path rules: a shell may touch any path
        match: {class: shell}
        action: allow
      - name: no-shadow
        match: {paths: ["/etc/shadow"]}
        action: block
        reason: password hashes stay on the host
      - name: reads
        match: {class: read}
        action: allow
      - name: scratch-space
        match: {class: write, paths: ["/tmp/ktsftp-*"]}
        action: allow
      - name: changes-need-approval
        match: {class: [write, admin, destructive]}
        action: review
        review: {approvers: [approvers], timeout: 1m}
"""


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSSHD]:
    server = LocalSSHD(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    base = tmp_path_factory.mktemp("kt-ssh")
    # The key the gateway logs in to the target with (never given to clients).
    keygen(base / "target_key", "keyturn -> target")
    sshd.authorize(base / "target_key.pub")
    wrong = "SHA256:" + "A" * 43
    keygen(base / "user_ca", "people's CA")
    (base / "user_cas.pub").write_text("# the CA that signs people's keys\n" +
                                       (base / "user_ca.pub").read_text())
    k = make_keyturn(base, pg, extra=SSH_POLICY)
    sport = free_port()
    text = k.config.read_text()
    text = text.replace("gateway:\n", f"gateway:\n  ssh: 127.0.0.1:{sport}\n"
                        "  recording_keyframes: 1\n", 1)
    conns = "".join(
        f"  - name: {name}\n    type: ssh\n"
        f"    target: {{host: 127.0.0.1, port: {sshd.port}, user: {TARGET_USER}, "
        f"key_file: {base / 'target_key'}, host_key: \"{fp}\"}}\n    policy: ssh-ops\n"
        f"    user_ca: {base / 'user_cas.pub'}\n"
        for name, fp in (("web1", sshd.host_fingerprint), ("spoofed", wrong)))
    text = text.replace("connections:\n", "connections:\n" + conns, 1)
    k.config.write_text(text)
    k.ssh_port = sport  # type: ignore[attr-defined]
    for user in ("alice", "bob"):
        keygen(base / f"{user}_key", f"{user}'s laptop")
        out = k.cli("key", "add", "--user", user, str(base / f"{user}_key.pub")).stdout
        assert fingerprint(base / f"{user}_key.pub") in out
    k.start()
    wait_port(sport, proc=k.proc)
    yield k
    k.stop()


def ssh(kt: Keyturn, user: str, conn: str, command: str | None, *, extra: tuple[str, ...] = (),
        timeout: float = 60, **popen: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(kt, user, conn, command, extra), capture_output=True,
                          text=True, timeout=timeout, **popen)  # type: ignore[call-overload]


def _argv(kt: Keyturn, user: str, conn: str, command: str | None,
          extra: tuple[str, ...] = ()) -> list[str]:
    return ["ssh", *ssh_options(), "-i", str(kt.base / f"{user}_key"), "-p",
            str(kt.ssh_port), *extra, f"{user}:{conn}@127.0.0.1",  # type: ignore[attr-defined]
            *([command] if command is not None else [])]


def audit_records(kt: Keyturn, deadline: float = 20) -> list[dict]:
    """Every ssh record in the store (the ingester runs behind the gateway)."""
    out = kt.cli("audit", "export", "--format", "jsonl").stdout
    return [r for r in map(json.loads, out.splitlines()) if r.get("protocol") == "ssh"]


def wait_record(kt: Keyturn, pred, timeout: float = 20) -> dict:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hits = [r for r in audit_records(kt) if pred(r)]
        if hits:
            return hits[-1]
        time.sleep(0.3)
    raise AssertionError(f"no such audit record; ssh records: {audit_records(kt)[-8:]}")


def test_allowed_exec_runs_as_the_target_user_with_its_output_and_status(kt: Keyturn,
                                                                          sshd: LocalSSHD):
    r = ssh(kt, "alice", "web1", "echo hello; id -un; ls /nonexistent-kt")
    assert r.stdout == f"hello\n{TARGET_USER}\n", r.stderr
    assert "No such file or directory" in r.stderr
    assert r.returncode == 2  # ls's own exit status, passed through
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["statement"] == "echo hello; id -un; ls /nonexistent-kt")
    assert rec["user"] == "alice" and rec["connection"] == "web1"
    assert rec["action"] == "allow" and rec["classification"] == "read"
    assert rec["detail"]["exit_status"] == 2
    assert rec["detail"]["bytes_out"] >= len("hello\nktssh\n")
    # The recording: asciicast v2 with the output, sealed into the chain with its digest.
    seal = wait_record(kt, lambda r: r["kind"] == "recording" and
                       r["detail"].get("format") == "asciicast" and
                       r["detail"]["path"] == rec["detail"]["recording"])
    path = kt.base / "recordings" / seal["detail"]["path"]
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["command"].startswith("echo hello")
    out = "".join(e[2] for e in map(json.loads, lines[1:]) if e[1] == "o")
    assert "hello" in out and TARGET_USER in out
    import hashlib
    assert hashlib.sha256(path.read_bytes()).hexdigest() == seal["detail"]["sha256"]


def test_stdin_is_passed_through_byte_for_byte(kt: Keyturn):
    data = bytes(range(256)) * 64
    r = subprocess.run(_argv(kt, "alice", "web1", "cat"), input=data, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_blocked_exec_never_reaches_the_target(kt: Keyturn, sshd: LocalSSHD):
    marker = f"/tmp/kt-ssh-{uuid.uuid4().hex}"
    r = ssh(kt, "alice", "web1", f"python3 -c 'open(\"{marker}\", \"w\")'")
    assert r.returncode == 126
    assert "keyturn: blocked by rule tmp-scratch: no interpreters" in r.stderr
    assert r.stdout == ""
    assert not os.path.exists(marker)
    # What the analyser cannot see into and no rule names: refused by the default.
    r = ssh(kt, "alice", "web1", f"echo x > {marker}; $(echo rm) -f {marker}")
    assert r.returncode == 126 and "keyturn: blocked" in r.stderr
    assert not os.path.exists(marker)


def test_held_exec_runs_once_approved_with_a_clean_stdout(kt: Keyturn):
    marker = f"/tmp/kt-ssh-{uuid.uuid4().hex}"
    kt.skip_pending()
    proc = subprocess.Popen(_argv(kt, "alice", "web1", f"touch {marker} && echo made"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ticket = kt.wait_ticket()
    assert ticket["statement"] == f"touch {marker} && echo made"
    assert ticket["classification"] == "write"
    assert ticket["requester"] == "alice"
    time.sleep(0.5)
    assert proc.poll() is None and not os.path.exists(marker)  # held, not run
    kt.cli("approve", str(ticket["id"]), "--comment", "go", token_of="bob")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "made\n"  # stdout carries only the command's output
    assert f"held for approval — ticket {ticket['id']}" in err
    assert f"ticket {ticket['id']} approved by bob" in err
    assert os.path.exists(marker)
    os.unlink(marker)


def test_rejected_exec_exits_126_with_the_reason(kt: Keyturn):
    marker = f"/tmp/kt-ssh-{uuid.uuid4().hex}"
    kt.skip_pending()
    proc = subprocess.Popen(_argv(kt, "alice", "web1", f"rm -rf {marker}; touch {marker}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ticket = kt.wait_ticket()
    assert ticket["classification"] == "destructive"
    kt.cli("reject", str(ticket["id"]), "--reason", "not on a Friday", token_of="bob")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 126
    assert out == ""
    assert "rejected by bob" in err and "not on a Friday" in err
    assert not os.path.exists(marker)


def test_hanging_up_cancels_the_held_ticket(kt: Keyturn):
    marker = f"/tmp/kt-ssh-{uuid.uuid4().hex}"
    kt.skip_pending()
    proc = subprocess.Popen(_argv(kt, "alice", "web1", f"touch {marker}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ticket = kt.wait_ticket()
    proc.kill()  # like Ctrl-C on a non-terminal ssh: the client goes away
    proc.wait()
    end = time.monotonic() + 20
    status = ""
    while time.monotonic() < end:
        status = requests.get(f"{kt.url}/api/v1/tickets/{ticket['id']}", timeout=5,
                              headers={"Authorization": f"Bearer {kt.tokens['bob']}"}
                              ).json()["status"]
        if status == "cancelled":
            break
        time.sleep(0.2)
    assert status == "cancelled"
    # An approval now runs nothing.
    r = kt.cli("approve", str(ticket["id"]), token_of="bob", check=False)
    assert r.returncode != 0
    time.sleep(0.5)
    assert not os.path.exists(marker)


def test_requester_cannot_approve_their_own_command(kt: Keyturn):
    kt.skip_pending()
    proc = subprocess.Popen(_argv(kt, "alice", "web1", "mkdir -p /tmp/kt-ssh-own"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ticket = kt.wait_ticket()
    r = kt.cli("approve", str(ticket["id"]), token_of="alice", check=False)
    assert r.returncode != 0
    kt.cli("reject", str(ticket["id"]), "--reason", "no", token_of="bob")
    proc.communicate(timeout=60)
    assert proc.returncode == 126


def test_token_login_and_unknown_keys(kt: Keyturn, tmp_path: Path):
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{kt.tokens['alice']}'\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force",
               DISPLAY=":0")
    # ssh keeps the first value given for an option: BatchMode=no goes first.
    argv = ["ssh", "-o", "BatchMode=no", *ssh_options(), "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
            "-p", str(kt.ssh_port), "alice+web1@127.0.0.1", "whoami"]  # type: ignore[attr-defined]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{TARGET_USER}\n"
    # bob's token is not alice's password.
    askpass.write_text(f"#!/bin/sh\necho '{kt.tokens['bob']}'\n")
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and "Permission denied" in r.stderr
    # alice's key does not log in as bob.
    r = subprocess.run(["ssh", *ssh_options(), "-i", str(kt.base / "alice_key"), "-p",
                        str(kt.ssh_port), "bob:web1@127.0.0.1", "true"],  # type: ignore[attr-defined]
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 255 and "Permission denied" in r.stderr
    failed = wait_record(kt, lambda r: r["kind"] == "auth_failed" and r["user"] == "alice")
    assert "another user" in failed["reason"]
    # A key that is not the user's is a failed login too (one record per connection).
    failed = wait_record(kt, lambda r: r["kind"] == "auth_failed" and r["user"] == "bob"
                         and "public key" in (r["reason"] or ""))
    assert failed["connection"] == "web1"


def test_certificates_signed_by_the_user_ca_log_in_for_their_principal(kt: Keyturn,
                                                                         tmp_path: Path):
    """A key nobody registered logs in with a certificate the connection's user CA signed
    for the user name; another principal, an expired certificate, another CA's or one with
    a forced command do not."""
    def signed(name: str, *opts: str, ca: Path = kt.base / "user_ca") -> Path:
        key = tmp_path / name
        keygen(key, name)
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", f"{name}-id", *opts,
                        str(key) + ".pub"], check=True, capture_output=True)
        assert (tmp_path / f"{name}-cert.pub").exists()
        return key

    def login(key: Path, user: str = "alice") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *ssh_options(), "-i", str(key), "-o",
             f"CertificateFile={key}-cert.pub", "-p", str(kt.ssh_port),  # type: ignore[attr-defined]
             f"{user}:web1@127.0.0.1", "echo cert-in"],
            capture_output=True, text=True, timeout=60)

    good = signed("alice-laptop", "-n", "alice", "-V", "-5m:+1h")
    r = login(good)
    assert r.returncode == 0 and r.stdout == "cert-in\n", r.stderr
    rec = wait_record(kt, lambda x: x["kind"] == "connect" and
                      x["detail"].get("auth") == "certificate")
    assert rec["user"] == "alice"
    assert rec["detail"]["key"] == "CA " + fingerprint(kt.base / "user_ca.pub")
    # The same certificate does not make its holder bob.
    assert login(good, "bob").returncode == 255
    keygen(tmp_path / "rogue_ca", "rogue CA")
    for key in (signed("for-bob", "-n", "bob"), signed("expired", "-n", "alice", "-V",
                                                       "-2h:-1h"),
                signed("rogue", "-n", "alice", ca=tmp_path / "rogue_ca"),
                signed("no-principal")):
        r = login(key)
        assert r.returncode == 255 and "cert-in" not in r.stdout, (key.name, r.stderr)
    r = login(signed("forced", "-n", "alice", "-O", "force-command=id"))
    assert r.returncode != 0 and "cert-in" not in r.stdout
    assert "forced command" in r.stderr


def test_a_target_with_the_wrong_host_key_is_refused(kt: Keyturn):
    r = ssh(kt, "alice", "spoofed", "echo should-not-run")
    assert r.returncode == 255
    assert "does not match the configured" in r.stderr
    assert "should-not-run" not in r.stdout


def test_forwarding_is_refused(kt: Keyturn, sshd: LocalSSHD):
    r = ssh(kt, "alice", "web1", None, extra=("-W", f"127.0.0.1:{sshd.port}"),
            stdin=subprocess.DEVNULL)
    assert r.returncode == 255 and "forwarding failed" in r.stderr
    rec = wait_record(kt, lambda r: r.get("rule") == "builtin:forwarding")
    assert rec["outcome"] == "blocked"


def sftp(kt: Keyturn, batch: str, *, user: str = "alice", **popen: object) -> Any:
    argv = ["sftp", *ssh_options(), "-i", str(kt.base / f"{user}_key"), "-P",
            str(kt.ssh_port), "-b", "-", f"{user}+web1@127.0.0.1"]  # type: ignore[attr-defined]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]


def test_sftp_operations_are_judged_by_path_and_audited_with_bytes(kt: Keyturn,
                                                                   tmp_path: Path):
    d = f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}"
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(300_000))
    back = tmp_path / "back.bin"
    p = sftp(kt, "")
    out, err = p.communicate(f"mkdir {d}\nput {local} {d}/a.bin\nls -l {d}\n"
                             f"get {d}/a.bin {back}\n", timeout=60)
    assert p.returncode == 0, err
    assert back.read_bytes() == local.read_bytes()
    assert "a.bin" in out
    wrote = wait_record(kt, lambda r: r["kind"] == "statement" and
                        r["statement"] == f"sftp open-write {d}/a.bin")
    assert wrote["outcome"] == "ok" and wrote["detail"]["bytes_written"] == 300_000
    assert wrote["classification"] == "write" and wrote["rule"] == "scratch-space"
    read = wait_record(kt, lambda r: r["kind"] == "statement" and
                       r["statement"] == f"sftp open-read {d}/a.bin")
    assert read["detail"]["bytes_read"] == 300_000
    # A path rule blocks, whatever the class: the client is refused, the reason on stderr.
    p = sftp(kt, "")
    out, err = p.communicate("get /etc/shadow\n", timeout=60)
    assert p.returncode != 0
    assert "blocked by rule no-shadow" in err
    # Removing is destructive: held until someone approves it.
    kt.skip_pending()
    p = sftp(kt, "")
    assert p.stdin is not None
    p.stdin.write(f"rm {d}/a.bin\n")
    p.stdin.flush()
    ticket = kt.wait_ticket()
    assert ticket["statement"] == f"sftp remove {d}/a.bin"
    assert ticket["classification"] == "destructive"
    assert os.path.exists(f"{d}/a.bin")  # held, not run
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    out, err = p.communicate("", timeout=60)
    assert p.returncode == 0, err
    assert f"held for approval — ticket {ticket['id']}" in err
    assert not os.path.exists(f"{d}/a.bin")


def test_scp_both_ways(kt: Keyturn, tmp_path: Path):
    d = f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}"
    os.makedirs(d)
    os.chmod(d, 0o777)
    src = tmp_path / "s.txt"
    src.write_text("through the gateway\n" * 1000)
    base = ["scp", *ssh_options(), "-i", str(kt.base / "alice_key"), "-P",
            str(kt.ssh_port)]  # type: ignore[attr-defined]
    r = subprocess.run([*base, str(src), f"alice+web1@127.0.0.1:{d}/s.txt"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Path(f"{d}/s.txt").read_text() == src.read_text()
    r = subprocess.run([*base, f"alice+web1@127.0.0.1:{d}/s.txt", str(tmp_path / "t.txt")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.txt").read_text() == src.read_text()


def test_other_subsystems_are_refused(kt: Keyturn):
    r = ssh(kt, "alice", "web1", "netconf", extra=("-s",), stdin=subprocess.DEVNULL)
    assert r.returncode == 126
    assert "subsystem is not served" in r.stderr


def test_interactive_shell_is_recorded(kt: Keyturn):
    r = subprocess.run(_argv(kt, "alice", "web1", None, ("-tt",)),
                       input="echo shell-$((6*7))\nexit\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "shell-42" in r.stdout
    rec = wait_record(kt, lambda r: r["kind"] == "statement" and
                      r["statement"] == "(interactive shell)" and "recording" in r["detail"])
    assert rec["classification"] == "shell" and rec["detail"]["pty"] is True
    lines = (kt.base / "recordings" / rec["detail"]["recording"]).read_text().splitlines()
    events = [json.loads(x) for x in lines[1:]]
    typed = "".join(e[2] for e in events if e[1] == "i")
    shown = "".join(e[2] for e in events if e[1] == "o")
    assert "echo shell-$((6*7))" in typed and "shell-42" in shown
    # The lines typed, for search and the player's markers.
    assert "echo shell-$((6*7))" in rec["detail"]["lines"]
    assert ["echo shell-$((6*7))", "exit"] == [e[2] for e in events if e[1] == "m"]


def test_ssh_config_prints_host_blocks_and_the_gateway_host_key(kt: Keyturn):
    out = kt.cli("ssh-config", "--user", "alice").stdout
    assert "Host web1" in out and "User alice:web1" in out
    assert f"Port {kt.ssh_port}" in out  # type: ignore[attr-defined]
    key_line = next(ln for ln in out.splitlines() if "ssh-ed25519" in ln)
    known = kt.base / "alice_known_hosts"
    known.write_text(key_line.lstrip("# ").strip() + "\n")
    # With the printed known_hosts line, strict host key checking passes.
    r = subprocess.run(["ssh", *ssh_options(known), "-i", str(kt.base / "alice_key"), "-p",
                        str(kt.ssh_port), "alice:web1@127.0.0.1", "echo verified"],  # type: ignore[attr-defined]
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "verified\n"


def test_the_recording_re_renders_the_screen_the_client_saw(kt: Keyturn):
    import pyte

    r = subprocess.run(_argv(kt, "alice", "web1", None, ("-tt",)),
                       input=b"printf 'a\\tb\\033[1mbold\\033[0m\\n'; ls -a /\nexit\n",
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rec = wait_record(kt, lambda x: x["kind"] == "statement" and
                      "printf 'a\\tb" in " ".join(x["detail"].get("lines", [])))
    lines = (kt.base / "recordings" / rec["detail"]["recording"]).read_text().splitlines()
    header = json.loads(lines[0])

    def screen_of(chunks: list[str]) -> list[str]:
        screen = pyte.Screen(header["width"], header["height"])
        stream = pyte.Stream(screen)
        for c in chunks:
            stream.feed(c)
        return screen.display

    replayed = screen_of([e[2] for e in map(json.loads, lines[1:]) if e[1] == "o"])
    seen = screen_of([r.stdout.decode("utf-8", "replace")])
    assert replayed == seen
    assert any("bold" in row for row in replayed)


def test_recordings_page_search_replay_and_keys_in_a_browser(kt: Keyturn, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed")
    from tests.portal_support import PASSWORD, set_portal_password

    r = subprocess.run(_argv(kt, "alice", "web1", None, ("-tt",)),
                       input="echo replay-me-$((2*21))\nuptime\nexit\n", capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rec = wait_record(kt, lambda x: x["kind"] == "statement" and
                      "echo replay-me-$((2*21))" in x["detail"].get("lines", []))
    wait_record(kt, lambda x: x["kind"] == "recording" and
                x["detail"]["path"] == rec["detail"]["recording"])
    for user in ("alice", "bob"):
        set_portal_password(kt, user)
    shots = kt.base / "shots"
    shots.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        for name, size in (("laptop", {"width": 1280, "height": 800}),
                           ("phone", {"width": 390, "height": 844})):
            page = browser.new_page(viewport=size)
            errors: list[str] = []

            def note(text: str, errors: list[str] = errors) -> None:
                errors.append(text)

            page.on("console", lambda m, note=note: note(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e, note=note: note(str(e)))
            page.goto(f"{kt.url}/login")
            page.get_by_label("User name").fill("alice")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(lambda url: "/login" not in url)
            page.goto(f"{kt.url}/recordings?q=replay-me")
            rows = page.locator("#recording-list tbody tr")
            assert rows.count() == 1
            page.screenshot(path=str(shots / f"recordings-{name}.png"), full_page=True)
            rows.first.get_by_role("link", name="Replay").click()
            page.wait_for_selector(".ap-wrapper, .ap-player", timeout=20000)
            assert "matches the audit trail" in page.content()
            jump = page.get_by_role("button", name="echo replay-me-$((2*21))")
            jump.click()
            page.wait_for_function("window.keyturnPlayer && "
                                   "window.keyturnPlayer.getCurrentTime() > 0", timeout=20000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / f"replay-{name}.png"), full_page=True)
            assert "replay-me-42" in page.locator("#player").inner_text()
            assert not errors, errors
            page.close()
        # Another engineer cannot see it (bob is an approver, not an auditor).
        page = browser.new_page()
        page.goto(f"{kt.url}/login")
        page.get_by_label("User name").fill("bob")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/login" not in url)
        resp = page.goto(f"{kt.url}/recordings/{rec['seq']}")
        assert resp is not None and resp.status == 404
        assert page.goto(f"{kt.url}/recordings/{rec['seq']}.cast").status == 404
        # Keys: bob adds one in the portal and logs in to the SSH gateway with it.
        keygen(tmp_path / "bob2", "bob's second laptop")
        page.goto(f"{kt.url}/keys")
        page.get_by_label("Public key").fill("not a key")
        page.get_by_role("button", name="Add key").click()
        assert "cannot be added" in page.content()
        page.get_by_label("Public key").fill((tmp_path / "bob2.pub").read_text().strip())
        page.get_by_role("button", name="Add key").click()
        assert fingerprint(tmp_path / "bob2.pub") in page.content()
        page.screenshot(path=str(shots / "keys-laptop.png"), full_page=True)
        browser.close()
    r = subprocess.run(["ssh", *ssh_options(), "-i", str(tmp_path / "bob2"), "-p",
                        str(kt.ssh_port), "bob:web1@127.0.0.1", "echo bob-in"],  # type: ignore[attr-defined]
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "bob-in\n", r.stderr


def test_a_long_session_plays_in_parts_from_its_keyframes(kt: Keyturn, tmp_path: Path):
    """12 MB of terminal output: the recording gets a keyframe index (sealed with it); each
    keyframe's part opens on the screen the client saw at that point; the portal's player
    loads the session part by part and starts at a chosen part."""
    import pyte

    from keyturn.recording import Recorder, window

    cmd = "seq 1 1100000; sleep 1.5; echo long-session-done"
    r = subprocess.run(_argv(kt, "alice", "web1", cmd, ("-tt",)), capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"long-session-done" in r.stdout
    rec = wait_record(kt, lambda x: x["kind"] == "statement" and x["statement"] == cmd)
    seal = wait_record(kt, lambda x: x["kind"] == "recording" and
                       x["detail"]["path"] == rec["detail"]["recording"])["detail"]
    assert seal["index"] and seal["keyframes"] >= 8 and seal["bytes"] > 8 << 20
    recorder = Recorder(kt.base / "recordings")
    assert recorder.verify_file(seal) is None
    assert json.loads(kt.cli("audit", "verify", "--json").stdout)["ok"] is True
    kfs = recorder.keyframes(seal)
    path = recorder.path(seal)
    raw = path.read_bytes()
    for k in (1, len(kfs) // 2, len(kfs) - 1):
        kf = kfs[k]
        assert kf["screen"], "a terminal's keyframe holds its screen"
        cast, _ = window(path, kfs, k)
        opening = json.loads(cast.splitlines()[1])
        assert opening[0] == 0.0
        shown = pyte.Screen(kf["cols"], kf["rows"])
        pyte.Stream(shown).feed(opening[2])
        # What the client's terminal showed at that point: everything before it.
        seen = pyte.Screen(kf["cols"], kf["rows"])
        before = [json.loads(x) for x in raw[:kf["offset"]].splitlines()[1:]]
        pyte.Stream(seen).feed("".join(e[2] for e in before if e[1] == "o")[-20000:])
        assert shown.display == seen.display, k

    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed")
    from tests.portal_support import PASSWORD, set_portal_password

    set_portal_password(kt, "alice")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{kt.url}/login")
        page.get_by_label("User name").fill("alice")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda url: "/login" not in url)
        page.goto(f"{kt.url}/recordings/{rec['seq']}")
        page.wait_for_selector(".ap-wrapper, .ap-player", timeout=20000)
        part = page.get_by_label("Part")
        options = part.locator("option")
        assert options.count() >= 2
        assert "plays in parts" in page.content()
        last = options.nth(options.count() - 1).get_attribute("value")
        resp = page.request.get(f"{kt.url}/recordings/{rec['seq']}.cast?from={last}")
        assert resp.ok and len(resp.body()) <= (8 << 20) + 100_000
        part.select_option(last)
        page.evaluate("window.keyturnPlayer.play()")
        end = time.monotonic() + 30
        while "long-session-done" not in (text := page.locator("#player").inner_text()) \
                and time.monotonic() < end:
            page.wait_for_timeout(300)
        assert "1100000" in text and "\n1\n" not in text
        page.screenshot(path=str(tmp_path / "long-replay.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.on("pageerror", lambda e: errors.append(str(e)))
        phone.context.add_cookies(page.context.cookies())
        phone.goto(f"{kt.url}/recordings/{rec['seq']}")
        phone.wait_for_selector(".ap-wrapper, .ap-player", timeout=20000)
        assert phone.get_by_label("Part").is_visible()
        assert phone.get_by_label("Start at").is_visible()
        phone.screenshot(path=str(tmp_path / "long-replay-phone.png"), full_page=True)
        assert not errors, errors
        browser.close()


def test_policy_explain_classifies_a_command_line(kt: Keyturn):
    out = json.loads(kt.cli("policy", "explain", "--user", "alice", "--connection", "web1",
                            "cd /etc && sudo rm -f nginx/old.conf").stdout)
    assert out["action"] == "review" and out["rule"] == "changes-need-approval"
    assert out["class"] == "destructive"
    st = out["statements"][0]
    assert st["programs"] == ["cd", "sudo", "rm"] and st["paths"] == ["/etc/nginx/old.conf"]
    out = json.loads(kt.cli("policy", "explain", "--user", "alice", "--connection", "web1",
                            "cat /etc/shadow").stdout)
    assert out["action"] == "block" and out["rule"] == "no-shadow"


def test_recordings_export_holds_the_files_and_their_seals(kt: Keyturn, tmp_path: Path):
    import hashlib
    import tarfile

    r = ssh(kt, "alice", "web1", "echo exported-9")
    assert r.stdout == "exported-9\n"
    wait_record(kt, lambda x: x["kind"] == "statement" and
                x["statement"] == "echo exported-9" and "recording" in x["detail"])
    out = tmp_path / "rec.tar.gz"
    res = kt.cli("recordings", "export", "--out", str(out), "--user", "alice",
                 "--format", "asciicast")
    assert "recordings written" in res.stdout
    with tarfile.open(out) as tar:
        manifest = [json.loads(x) for x in
                    tar.extractfile("manifest.jsonl").read().splitlines()]  # type: ignore[union-attr]
        assert manifest and all(m["verified"] and m["format"] == "asciicast" and
                                m["user"] == "alice" for m in manifest)
        for m in manifest:
            data = tar.extractfile(f"recordings/{m['path']}").read()  # type: ignore[union-attr]
            assert hashlib.sha256(data).hexdigest() == m["sha256"]
        assert any(b"exported-9" in tar.extractfile(f"recordings/{m['path']}").read()  # type: ignore[union-attr]
                   for m in manifest)


def test_commands_reuse_the_gateway_s_login_to_the_host(kt: Keyturn, sshd: LocalSSHD):
    log = sshd.base / "sshd.log"
    ssh(kt, "alice", "web1", "true")  # a connection to the host exists now
    before = log.read_text().count("Accepted publickey for ktssh")
    for i in range(3):
        r = ssh(kt, "alice", "web1", f"echo run-{i}")
        assert r.stdout == f"run-{i}\n"
    r = ssh(kt, "bob", "web1", "echo bob-too")
    assert r.stdout == "bob-too\n"
    # Four commands, no new login of the gateway to the host: channels on one connection.
    assert log.read_text().count("Accepted publickey for ktssh") == before


def test_removing_a_key_or_revoking_a_token_ends_the_sessions_it_opened(kt: Keyturn,
                                                                        tmp_path: Path):
    keygen(tmp_path / "spare", "alice's spare")
    out = kt.cli("key", "add", "--user", "alice", str(tmp_path / "spare.pub")).stdout
    key_id = out.split()[1]
    shell = subprocess.Popen(["ssh", *ssh_options(), "-tt", "-i", str(tmp_path / "spare"),
                              "-p", str(kt.ssh_port), "alice:web1@127.0.0.1"],  # type: ignore[attr-defined]
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    time.sleep(3)
    assert shell.poll() is None  # logged in, the shell is open
    kt.cli("key", "remove", key_id)
    try:
        out_b, err_b = shell.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        shell.kill()
        raise AssertionError("the session outlived its key") from None
    assert "session ended: your SSH key was removed" in err_b.decode()
    rec = wait_record(kt, lambda r: r["kind"] == "session_ended" and r["user"] == "alice")
    assert rec["reason"] == "your SSH key was removed"
    # A token: a session opened with it ends when it is revoked.
    token = kt.cli("token", "create", "--user", "alice", "-q").stdout.strip()
    token_id = kt.cli("token", "list", "--user", "alice").stdout.strip().splitlines()[-1].split()[0]
    askpass = tmp_path / "askpass.sh"
    askpass.write_text(f"#!/bin/sh\necho '{token}'\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    shell = subprocess.Popen(["ssh", "-o", "BatchMode=no", *ssh_options(), "-tt", "-o",
                              "PubkeyAuthentication=no", "-o",
                              "PreferredAuthentications=password", "-p",
                              str(kt.ssh_port), "alice:web1@127.0.0.1"],  # type: ignore[attr-defined]
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)
    time.sleep(3)
    assert shell.poll() is None
    kt.cli("token", "revoke", token_id)
    try:
        _, err_b = shell.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        shell.kill()
        raise AssertionError("the session outlived its token") from None
    assert "session ended: your access token was revoked" in err_b.decode()
