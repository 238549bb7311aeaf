"""SSH gateway attack run 4: recordings and keyframes, terminal sizes, user-CA
certificates, approver views and the classifier families left after run 3. End to end
through the real ssh client (or asyncssh as a client), the gateway and a throwaway OpenSSH
server; the keyframe index is read from the recordings directory directly; the terminal
emulator (proxies/ssh/terminal.py) also alone where noted. Each test asserts the safe
behaviour. The fixture is run 3's with `recording_keyframes: 1` and a user CA on web2.

Families found, now guarded:
- keyframes after a program used the alternate screen (less, vim, top) show the main
  screen the terminal returned to (the emulator models modes 47/1047/1049);
- a flood's kept tail starts at a line break or an escape sequence, never inside one
  (no parameter bytes shown as text); text drawn by cursor addressing inside the dropped
  part is a documented limit (xfail);
- the client-declared terminal size (uint32) is emulated and recorded at most 500x200:
  no memory exhaustion, no event-loop stall from a 9999-row terminal;
- a UTF-8 character split across two reads is recorded whole (one decoder per stream).

And what held:
- test_held_classifier_run4_probes[*], test_held_classifier_run4_variables[*]: cd
  variants (`cd ""`, pushd/popd, `&&`/`||`, exec cd, redirect-failed group), grep -d
  recurse, xargs after `--`, nameref/mapfile/getopts/wait -p/+=/${:=}/printf -vNAME/read
  options/sourcing.
- test_held_approver_views_escape_control_characters: reveal() escapes ESC, CR, bidi.
- test_held_certificate_good_one_logs_in (control), test_held_certificate_refused[*]
  (not yet valid, source-address, connection without the CA, no principals, `*`
  principal, force-command), test_held_certificate_no_pty_honoured.
"""
# ruff: noqa: F811 - test parameters name the fixtures imported from tests.ssh_attack_support
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest

from proxies.ssh.shell import classify
from proxies.ssh.terminal import TypedLines
from tests.conftest import Keyturn, LocalPostgres
from tests.ssh_attack_support import RISK, box, ssh, sshd, start_gateway  # noqa: F401 - fixtures
from tests.ssh_support import LocalSSHD, keygen, ssh_options


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    base = tmp_path_factory.mktemp("kt-ssh")
    keygen(base / "user_ca", "people's CA")
    k = start_gateway(pg, sshd, base, gateway="  recording_keyframes: 1\n",
                      edit=lambda text: text.replace(
                          "    policy: ssh-atk2\n",
                          f"    policy: ssh-atk2\n    user_ca: {base / 'user_ca.pub'}\n", 1))
    yield k
    k.stop()


def _file(path: Path, text: str, mode: int = 0o666) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _asnc(coro):
    return asyncio.run(coro)



def _m(box: Path) -> Path:
    return box / "made"




def _cast_of(kt, command: str) -> Path:
    """The newest recording (under kt.base) whose header names ``command``."""
    found = []
    for p in kt.base.rglob("*.cast"):
        with open(p, "rb") as f:
            head = json.loads(f.readline())
        if head.get("command") == command:
            found.append(p)
    assert found, ("no recording of", command)
    return max(found, key=lambda p: p.stat().st_mtime)


def _last_screen(kt, command: str) -> str:
    cast = _cast_of(kt, command)
    idx = cast.with_name(cast.name + ".idx")
    for _ in range(50):
        if idx.exists():
            break
        time.sleep(0.1)
    assert idx.exists(), ("no keyframe index", cast)
    frames = [json.loads(x) for x in idx.read_text().splitlines() if x.strip()]
    screens = [f["screen"] for f in frames if f.get("screen")]
    assert screens, frames
    return screens[-1]


def _plain(screen: str) -> str:
    s = pyte.Screen(80, 24)
    pyte.Stream(s).feed(screen)
    return "\n".join(s.display)


# ---------------------------------------------------------------- findings
def test_terminal_snapshot_unit_alt_screen_and_flood():
    """Unit level of the two keyframe findings below: the snapshot (a keyframe's screen)
    after (a) a program used the alternate screen and left it, (b) a flood over the
    emulator's budget that drew text with cursor addressing, compared with what a terminal
    shows."""
    tl = TypedLines(80, 24)
    tl.output(b"EVIDENCE-MAIN\r\n\x1b[?1049h\x1b[H\x1b[2Jinnocuous\x1b[?1049l")
    alt = _plain(tl.snapshot())
    flood = b"A" * 150000 + b"\x1b[1;1HEVIDENCE" + b"\x1b[24;1Hx" * 30000
    tl2 = TypedLines(80, 24)
    for i in range(0, len(flood), 32768):
        tl2.output(flood[i:i + 32768])
    fl = _plain(tl2.snapshot())
    assert "EVIDENCE-MAIN" in alt and "innocuous" not in alt, alt[:200]
    assert "1H" not in fl and ";1" not in fl, fl[:200]  # no cut escape shown as text


@pytest.mark.xfail(strict=True, reason=(
    "known limit (docs/ssh-gateway.md, Recordings): output beyond the emulator's budget "
    "is emulated from its tail; text drawn earlier by cursor addressing is missing from "
    "keyframes until the next redraw (the recording itself has every byte)"))
def test_flood_keeps_text_drawn_before_the_tail():
    tl = TypedLines(80, 24)
    flood = b"A" * 150000 + b"\x1b[1;1HEVIDENCE" + b"\x1b[24;1Hx" * 30000
    for i in range(0, len(flood), 32768):
        tl.output(flood[i:i + 32768])
    assert "EVIDENCE" in _plain(tl.snapshot())


def test_e2e_keyframe_after_alternate_screen_shows_another_screen(kt):
    """A full-screen program (less, vim, top) draws on the alternate screen and leaves
    it: the terminal shows the main screen again. pyte has no alternate screen, so the
    keyframe written next holds the alternate screen's text: a portal part (`?from=K`)
    or a "Start at" opens on a picture the user never had, and hides what was on the
    main screen. Here the line's output is `EVIDENCE-MAIN`, then `innocuous` on the
    alternate screen, then back; the keyframe (recording_keyframes: 1) is taken before
    the `z` two seconds later."""
    cmd = ("printf 'EVIDENCE-MAIN\\r\\n\\033[?1049h\\033[H\\033[2Jinnocuous\\033[?1049l'; "
           "sleep 2; printf z")
    r = ssh(kt, cmd, conn="web2", extra=("-tt",))
    assert r.returncode == 0, r.stderr
    screen = _plain(_last_screen(kt, cmd))
    assert "EVIDENCE-MAIN" in screen and "innocuous" not in screen, screen[:300]


def test_e2e_keyframe_after_flood_loses_text_that_is_on_screen(kt, box):
    """Output over the emulator's budget (32 KiB/s, 64 KiB burst) is dropped but for
    its last screenful of bytes, fed from a line break. Text drawn by cursor addressing
    inside the dropped part (here `EVIDENCE` at row 1, then 240 KB of `ESC[24;1Hx`) is on
    the user's screen but never reaches the emulator: the keyframe, and the part the
    portal opens on it, do not show it (docs: "after a flood the keyframe's text is
    exact"). And a kept tail with no line break is fed from wherever the byte count cut
    it, mid escape sequence: its parameters (`24;1H`) appear as text the terminal never
    showed (an OSC title cut after `ESC ]` would show the title as screen text)."""
    f = box / "flood"
    f.write_bytes(b"A" * 400000 + b"\x1b[1;1HEVIDENCE" + b"\x1b[24;1Hx" * 30000)
    os.chmod(f, 0o644)
    cmd = f"cat {f}; sleep 2; printf z"
    r = ssh(kt, cmd, conn="web2", extra=("-tt",))
    assert r.returncode == 0, r.stderr
    screen = _plain(_last_screen(kt, cmd))
    # The text drawn inside the dropped part is a documented limit (the xfail above);
    # what the keyframe shows must never be text the terminal did not show.
    assert "1H" not in screen and ";1" not in screen, screen


@pytest.mark.parametrize("how", ["open", "resize"])
def test_terminal_size_from_the_client_is_unbounded(how, tmp_path):
    """The gateway builds each PTY channel's emulator (TypedLines) at the size the client
    declares in pty-req, and resizes it on window-change; SSH carries sizes as uint32 and
    neither asyncssh nor the gateway bounds them. pyte marks every row dirty
    (`set(range(rows))`) at creation and on resize: 10**7 rows cost 1.3 s of the event
    loop and 0.6 GB, 2**32-1 rows exhaust memory (the kernel's OOM killer, or a
    MemoryError on the loop). Run here in a child with a 2 GB address-space limit and a
    30 s timeout; the safe behaviour is a clamped size (done in well under a second)."""
    code = ("from proxies.ssh.terminal import TypedLines\n"
            + ("TypedLines(80, 2**32 - 1)\n" if how == "open" else
               "t = TypedLines(80, 24)\nt.resize(80, 2**32 - 1)\nt.snapshot()\n"))
    t0 = time.monotonic()
    try:
        r = subprocess.run(["bash", "-c", "ulimit -v 2000000; exec \"$0\" -c \"$1\"",
                            sys.executable, code], capture_output=True, text=True,
                           timeout=30, cwd=Path(__file__).resolve().parents[1])
        rc, err = r.returncode, r.stderr[-300:]
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    assert rc == 0 and time.monotonic() - t0 < 10, (how, rc, err)


def test_e2e_recording_splits_utf8_across_reads(kt):
    """Low severity. Each read of output is decoded on its own (`decode("utf-8",
    "replace")` in Recording.write): a character whose bytes arrive in two reads is
    recorded as two U+FFFD, so the replay shows text other than the client's (here `€`
    arrives as `\\xe2\\x82`, a second later `\\xac`). An incremental decoder per stream
    keeps it."""
    cmd = "printf '\\342\\202'; sleep 1; printf '\\254\\n'"
    r = ssh(kt, cmd, conn="web2")
    assert r.returncode == 0 and r.stdout == "\u20ac\n", (r.stdout, r.stderr)
    cast = _cast_of(kt, cmd)
    out = "".join(e[2] for e in map(json.loads, cast.read_text().splitlines()[1:])
                  if e[1] == "o")
    assert out == "\u20ac\n", repr(out)


# ---------------------------------------------------------------- held
@pytest.mark.parametrize("line", [
    'cd /etc; cd "" && cat passwd',
    "cd /tmp; pushd /etc && cat passwd",
    "cd /etc; pushd /tmp; popd; cat passwd",
    "cd /etc && cd /tmp || cat passwd",
    "cd /etc; cd /tmp & wait; cat passwd",
    "cd /etc; exec cd /tmp; cat passwd",
    "cd /etc; { cd /tmp; } >/dev/full && cat passwd",
    "grep -d recurse root:x /etc",
    "grep --direc=recurse root:x /etc",
    "find /etc -name passwd | xargs cat --",
    "ls /etc | xargs -I F cat -- /etc/F",
    "zgrep -r root /etc",
    "tail -n+1 /etc/passw?",
])
def test_held_classifier_run4_probes(line):
    """HELD: each names /etc/passwd (or `*`, or a glob meeting it) or is unknown."""
    a = classify(line)
    assert a.cls == "unknown" or any(
        p in ("*", "/etc/passwd", "/etc/*") or p.startswith("/etc/passw")
        for p in a.paths), (line, a.cls, a.paths)


@pytest.mark.parametrize("line", [
    "x=-o; declare -n r=x; sort $r /tmp/m /etc/os-release",
    "mapfile o < /dev/stdin; sort $o /tmp/m",
    "o=x; getopts ab o; sort $o /tmp/m /etc/os-release",
    "o=x; wait -n -p o; sort $o /tmp/m",
    "o=x; o+=' -o'; sort $o /tmp/m /etc/os-release",
    "o=x; : ${o:=-o}; sort $o /tmp/m",
    "o=x; printf -vo -- -o; sort $o /tmp/m /etc/os-release",
    "o=x; read -r -- o; sort $o /tmp/m /etc/os-release",
    "o=x; read -sp '' o; sort $o /tmp/m",
    "o=x; typeset -n o=q; q=-o; sort $o /tmp/m",
    "o=x; . /dev/null; sort $o /tmp/m",
    "x='a[$(touch /tmp/m)]'; test -v \"$x\"",
])
def test_held_classifier_run4_variables(line):
    """HELD: variables changed by nameref, mapfile, getopts, wait -p, +=, ${:=},
    printf -vNAME, read with options, sourcing: at least write/unknown."""
    a = classify(line)
    assert RISK[a.cls] >= RISK["write"], (line, a.cls, a.paths)


def test_held_approver_views_escape_control_characters():
    """HELD: the text approvers see (portal, chat, CLI) writes control and format
    characters (ESC, CR, bidi overrides) as visible escapes."""
    from keyturn.wording import reveal
    t = reveal("touch /tmp/x #\x1b[2K\r\u202els")
    assert "\x1b" not in t and "\r" not in t and "\u202e" not in t, t


def _signed(kt, tmp: Path, name: str, *opts: str) -> Path:
    key = tmp / name
    keygen(key, name)
    subprocess.run(["ssh-keygen", "-q", "-s", str(kt.base / "user_ca"), "-I", f"{name}-id",
                    *opts, str(key) + ".pub"], check=True, capture_output=True)
    return key


def _cert_ssh(kt, key: Path, conn: str, cmd: str, extra=()):
    return subprocess.run(
        ["ssh", *ssh_options(), "-i", str(key), "-o", f"CertificateFile={key}-cert.pub",
         "-p", str(kt.ssh_port), *extra, f"alice:{conn}@127.0.0.1", cmd],
        capture_output=True, text=True, timeout=60)


def test_held_certificate_good_one_logs_in(kt, tmp_path):
    """HELD (control): a certificate for principal alice logs in on web2 (user_ca)."""
    key = _signed(kt, tmp_path, "good", "-n", "alice", "-V", "-5m:+1h")
    r = _cert_ssh(kt, key, "web2", "echo cert-in")
    assert r.returncode == 0 and r.stdout == "cert-in\n", r.stderr


@pytest.mark.parametrize("name, opts, conn", [
    ("not-yet", ("-n", "alice", "-V", "+1h:+2h"), "web2"),
    ("elsewhere", ("-n", "alice", "-V", "-5m:+1h", "-O", "source-address=10.9.9.9/32"),
     "web2"),
    ("other-conn", ("-n", "alice", "-V", "-5m:+1h"), "web1"),   # web1 has no user_ca
    ("empty-principals", ("-V", "-5m:+1h"), "web2"),
    ("wild-principal", ("-n", "*", "-V", "-5m:+1h"), "web2"),
    ("force", ("-n", "alice", "-V", "-5m:+1h", "-O", "force-command=echo hi"), "web2"),
])
def test_held_certificate_refused(kt, tmp_path, name, opts, conn):
    """HELD: not yet valid, another source address, a connection without the CA, no
    principals (valid for anyone in OpenSSH without a principals option), a `*`
    principal, a forced command: no login."""
    key = _signed(kt, tmp_path, name, *opts)
    r = _cert_ssh(kt, key, conn, "echo cert-in")
    assert r.returncode != 0 and "cert-in" not in r.stdout, (name, r.stderr)


def test_held_certificate_no_pty_honoured(kt, tmp_path):
    """HELD: a certificate without permit-pty gets no terminal (`ssh -tt` then `tty`)."""
    key = _signed(kt, tmp_path, "nopty", "-n", "alice", "-V", "-5m:+1h", "-O", "no-pty")
    r = _cert_ssh(kt, key, "web2", "tty", extra=("-tt",))
    assert "/dev/pts" not in r.stdout, (r.returncode, r.stdout, r.stderr)


# ------------------------------------------------ stalls (last: it froze the gateway)
def test_e2e_tall_terminal_stalls_the_whole_gateway(kt):
    """The gateway emulates every PTY channel's output in pyte on its event loop, with
    the terminal size the client declares (pty-req / window-change; nothing bounds it).
    At 9999 rows every line feed at the bottom scrolls: pyte marks all rows dirty and
    moves every row (O(rows) per line). A user allowed one read
    (`seq 1 20000; sleep 2; echo x`, ~10000
    scrolls; the over-budget tail is emulated at the next keyframe, here when `x` comes)
    holds the loop for tens of seconds: every other user's commands, logins and holds
    stop meanwhile. Asserts bob's `echo` still answers within 8 s."""
    import asyncssh

    async def alice():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web2",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as c:
            p = await c.run("seq 1 20000; sleep 2; echo x", term_type="xterm", term_size=(80, 9999),
                            encoding=None, timeout=300)
            return p.exit_status

    result = {}
    th = threading.Thread(target=lambda: result.update(rc=_asnc(alice())))
    th.start()
    time.sleep(4)
    t0 = time.monotonic()
    try:
        r = ssh(kt, "echo alive", user="bob", conn="web2", timeout=300)
        took = time.monotonic() - t0
    finally:
        th.join(300)
    print("bob took", took, "alice", result)
    assert r.returncode == 0 and "alive" in r.stdout, r.stderr
    assert took < 8, f"bob waited {took:.1f}s while alice's terminal was emulated"
