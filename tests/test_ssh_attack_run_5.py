"""SSH gateway attack run 5: what runs (and keeps running) on the host, end to end through
the real ssh client (or asyncssh as a client), the gateway and a throwaway OpenSSH server,
with the shared fixtures of tests/ssh_attack_support.py. Each test asserts the safe
behaviour. The fixture is the shared one plus web4, reviewed in defer mode.

Families found:
- a program named by a path through `..` (`/tmp/x/l/../../../usr/bin/ls`) was classed as
  the system program its lexical form names; the host resolves `..` through symbolic
  links, so a planted script ran as a read;
- a held command or sftp operation whose channel the client closed (the connection
  staying, as with ssh's ControlMaster) still ran once approved (sftp), or consumed the
  approval and failed with an internal error (exec): the ticket is now cancelled;
- one user's commands took every login the gateway may hold to a host (16 x 8 channels)
  and everyone else's waited 30 s and failed;
- in defer mode, an approval given for a command without a terminal was claimed by the
  same text with one (where its pager runs shell commands);
- an sftp path that is not UTF-8, held for review: the ticket could not be stored and the
  client was sent the gateway's SQL; the bytes are now shown escaped, and unexpected
  errors are not sent to clients;
- sftp sessions each made a new login to the host, outside the pool's cap of logins.

And what held: a held command's stdin arrives whole once approved; a hung-up client's
command ends on the host; an sftp path over PATH_MAX makes no ticket.
"""
# ruff: noqa: F811 - test parameters name the fixtures imported from tests.ssh_attack_support
from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import asyncssh
import pytest

from proxies.ssh.shell import classify
from tests.conftest import Keyturn, LocalPostgres
from tests.ssh_attack_support import _argv, box, ssh, sshd, start_gateway  # noqa: F401 - fixtures
from tests.ssh_support import LocalSSHD

#: web4: changes and unknown commands are reviewed in defer mode (the ticket is made, the
#: client runs the identical command again once it is approved).
DEFER_POLICY = """
  ssh-atk5d:
    default: block
    rules:
      - name: reads
        match: {class: read}
        action: allow
      - name: deferred
        match: {class: [write, forward, admin, destructive, unknown]}
        action: review
        review: {approvers: [approvers], timeout: 10m, mode: defer}
"""


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    """tests/ssh_attack_support.py's gateway (web1-3) and web4 (DEFER_POLICY)."""
    k = start_gateway(pg, sshd, tmp_path_factory.mktemp("kt-ssh"), policies=DEFER_POLICY,
                      connections=(("web4", "ssh-atk5d"),))
    yield k
    k.stop()

pytestmark = pytest.mark.timeout(180) if hasattr(pytest.mark, "timeout") else []


def _connect(kt, user="alice", conn="web1"):
    key = asyncssh.read_private_key(str(kt.base / f"{user}_key"))
    return asyncssh.connect("127.0.0.1", kt.ssh_port, username=f"{user}:{conn}",
                            client_keys=[key], known_hosts=None, agent_path=None)


def _pgrep(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-af", "--", pattern], capture_output=True, text=True,
                       check=False)
    return [ln for ln in r.stdout.splitlines() if "pgrep" not in ln]


# ---- 1. a program named by a path through `..`: the host resolves it through symbolic
# links, the classifier resolved it lexically (`/tmp/x/l/../../../usr/bin/ls` was `ls`).

@pytest.mark.parametrize("line", [
    "/tmp/x/l/../../../usr/bin/ls",
    "/tmp/x/l/../../../bin/cat /etc/os-release",
    "/usr/bin/../bin/ls",
    "sudo /tmp/x/l/../../../usr/bin/id",
    "env /tmp/x/l/../../../usr/bin/ls",
])
def test_classifier_program_path_through_dotdot_is_unknown(line):
    a = classify(line)
    assert a.cls == "unknown", (line, a.cls, a.reasons)


def test_e2e_program_path_through_a_symlink_and_dotdot_runs_a_planted_script(kt, box):
    """A script planted at BOX/usr/bin/ls (a write the user was allowed, or any file
    the target user may write) runs as the read `ls` through BOX/l/../../../usr/bin/ls,
    where BOX/l links three directories down."""
    made = box / "made"
    (box / "a" / "b" / "c").mkdir(parents=True)
    (box / "usr" / "bin").mkdir(parents=True)
    script = box / "usr" / "bin" / "ls"
    script.write_text(f"#!/bin/sh\ntouch {made}\n")
    os.chmod(script, 0o755)
    for d in (box / "a", box / "a" / "b", box / "a" / "b" / "c", box / "usr",
              box / "usr" / "bin"):
        os.chmod(d, 0o777)
    (box / "l").symlink_to(box / "a" / "b" / "c")
    depth = len(box.parts) - 1  # enough `..` to climb lexically from BOX to /
    cmd = str(box / "l") + "/.." * (depth + 1) + "/usr/bin/ls"
    r = ssh(kt, cmd, conn="web2")
    assert not made.exists(), ("a planted script ran as `ls`", classify(cmd).cls,
                               r.returncode, r.stderr)


# ---- 2. a held command whose channel the client closes (a multiplexed ssh, ControlMaster,
# keeps the connection): approving it later must run nothing.

def test_closed_channel_cancels_a_held_command(kt, box):
    made = box / "made"

    async def go():
        async with _connect(kt) as conn:
            proc = await conn.create_process(f"touch {made}")
            ticket = await asyncio.to_thread(kt.wait_ticket)
            proc.close()  # the channel only: the connection stays (as with ControlMaster)
            await asyncio.sleep(1.0)
            r = await asyncio.to_thread(kt.cli, "approve", str(ticket["id"]),
                                        token_of="bob", check=False)
            await asyncio.sleep(2.0)
            return ticket, r
    kt.skip_pending()
    ticket, r = asyncio.run(go())
    assert not made.exists(), ("ran after the client closed its channel", r.stdout,
                               r.stderr)
    # The ticket ends when the channel does: nothing is left to approve (it was claimed
    # by a holder that then failed to tell the gone client, an internal error).
    assert r.returncode != 0 and "cancel" in (r.stdout + r.stderr), (r.stdout, r.stderr)


# ---- 3. a client that goes away while its command runs: the command must not keep
# running on the host (sshd ends it when its session goes: a closed pipe, a hang-up), and
# its recording must be sealed.

def test_held_command_ends_when_the_client_hangs_up(kt, box):
    log_file = box / "log"
    log_file.write_text("start\n")
    os.chmod(log_file, 0o666)
    marker = f"--sleep-interval=0.{uuid.uuid4().int % 90 + 10}"
    cmd = f"tail -f {marker} {log_file}"
    stop = threading.Event()

    def feed():
        while not stop.is_set():
            with open(log_file, "a") as f:
                f.write("tick\n")
            time.sleep(0.1)
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        p = subprocess.Popen(_argv(kt, "alice", "web1", cmd), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not _pgrep(marker):
            time.sleep(0.1)
        assert _pgrep(marker), "the command never started"
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _pgrep(marker):
            time.sleep(0.2)
        left = _pgrep(marker)
    finally:
        stop.set()
        t.join()
        subprocess.run(["pkill", "-f", "--", marker], check=False)
    assert not left, ("still running on the host after the client hung up", left)


# ---- 4. one user's commands take every login the gateway may hold to a host (16 logins
# x 8 channels): everyone else's commands wait 30 s and fail. `sleep` is a read.

def test_one_user_starves_everyone_else_of_the_host(kt):
    marker = f"{40 + uuid.uuid4().int % 1000 / 1000:.3f}"
    ready = threading.Event()
    done = threading.Event()

    async def flood():
        conns = []
        procs = []
        try:
            for _ in range(14):
                conns.append(await _connect(kt).__aenter__())
            for c in conns:
                for _ in range(10):
                    try:
                        procs.append(await c.create_process(f"sleep {marker}"))
                    except (asyncssh.Error, OSError):
                        pass
            await asyncio.sleep(4)  # the gateway acquires upstream channels
            ready.set()
            await asyncio.to_thread(done.wait, 120)
        finally:
            for c in conns:
                c.close()

    t = threading.Thread(target=lambda: asyncio.run(flood()), daemon=True)
    t.start()
    try:
        assert ready.wait(90), "the flood never started"
        t0 = time.monotonic()
        r = ssh(kt, "echo alive", user="bob", timeout=90)
        took = time.monotonic() - t0
    finally:
        done.set()
        t.join(timeout=60)
        subprocess.run(["pkill", "-f", f"sleep {marker}"], check=False)
    assert r.stdout == "alive\n" and took < 15, ("bob was starved", round(took, 1),
                                                 r.returncode, r.stderr[-300:])


# ---- 5. defer mode: an approval is claimed by the identical command text, with or without
# a terminal; with one, the approved command's pager (less) runs shell commands typed in
# it. The approver approved `sudo journalctl -n 5` without a terminal (the ticket says so).

def test_deferred_approval_without_a_terminal_is_claimed_with_one(kt):
    cmd = "sudo journalctl -n 5"
    kt.skip_pending()
    first = ssh(kt, cmd, conn="web4")
    assert first.returncode == 126 and "deferred" in first.stderr, first.stderr
    ticket = kt.wait_ticket()
    assert ticket["detail"]["pty"] is False if "detail" in ticket else True
    kt.cli("approve", str(ticket["id"]), token_of="bob")
    again = ssh(kt, cmd, conn="web4", extra=("-tt",), stdin=subprocess.DEVNULL)
    assert f"running ticket {ticket['id']}" not in again.stderr, \
        ("the approval made without a terminal ran the command with one", again.stderr)


# ---- 6. a held command's stdin, sent while it waits, reaches the command whole once it is
# approved (scripts pipe data into approved commands).

def test_held_stdin_of_a_held_command_arrives_whole(kt, box):
    out = box / "out"
    data = os.urandom(8 << 20)
    kt.skip_pending()
    p = subprocess.Popen(_argv(kt, "alice", "web1", f"cat > {out}"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def approve():
        ticket = kt.wait_ticket()
        kt.cli("approve", str(ticket["id"]), token_of="bob")
    t = threading.Thread(target=approve, daemon=True)
    t.start()
    _, err = p.communicate(input=data, timeout=120)
    t.join(timeout=30)
    assert p.returncode == 0, err
    assert out.read_bytes() == data, (out.stat().st_size, len(data))



# ---- 8. a held sftp operation whose channel the client closes (the connection stays):
# approving it later must run nothing, as with an exec.

def test_closed_channel_cancels_a_held_sftp_operation(kt, box):
    victim = box / "keep"
    victim.write_text("keep me\n")
    os.chmod(victim, 0o666)

    async def go():
        async with _connect(kt, conn="web2") as conn:
            sftp = await conn.start_sftp_client()
            op = asyncio.ensure_future(sftp.remove(str(victim)))
            ticket = await asyncio.to_thread(kt.wait_ticket)
            sftp.exit()  # the sftp channel only
            await asyncio.sleep(1.0)
            r = await asyncio.to_thread(kt.cli, "approve", str(ticket["id"]),
                                        token_of="bob", check=False)
            await asyncio.sleep(2.0)
            op.cancel()
            return r
    kt.skip_pending()
    r = asyncio.run(go())
    assert victim.exists(), ("removed after the client closed its sftp channel",
                             r.stdout, r.stderr)



# ---- 9. an sftp path that is not UTF-8 (file names are bytes) in an operation held for
# review: making the ticket failed, and the client was sent the gateway's SQL and its
# parameters ("Uncaught exception: ... INSERT INTO tickets ..."). The ticket shows the
# bytes escaped; approved, the operation runs.

def test_sftp_non_utf8_path_held_for_review(kt, box):
    name = str(box).encode() + b"/d\xff\xfe"

    async def go():
        async with _connect(kt, conn="web2") as conn:
            async with conn.start_sftp_client() as sftp:
                op = asyncio.ensure_future(sftp.mkdir(name))
                done, _ = await asyncio.wait([op, asyncio.ensure_future(
                    asyncio.to_thread(kt.wait_ticket, timeout=10))],
                    return_when=asyncio.FIRST_COMPLETED)
                if op in done:
                    return None, repr(op.exception())
                tickets = await asyncio.to_thread(
                    kt.cli, "tickets", token_of="bob")
                tid = kt.last_ticket
                await asyncio.to_thread(kt.cli, "approve", str(tid), token_of="bob")
                try:
                    await asyncio.wait_for(op, 20)
                    return tickets.stdout, "ok"
                except Exception as exc:  # noqa: BLE001
                    return tickets.stdout, repr(exc)
    kt.skip_pending()
    shown, result = asyncio.run(go())
    assert "INSERT" not in result and "SQL" not in result, result[:300]
    assert result == "ok", result[:300]
    assert os.path.isdir(name), os.listdir(box)


# ---- 10. sftp sessions each logged in to the host anew, outside the pool's cap of logins
# to a host (UpstreamPool.LOGINS): one user's sftp sessions made as many logins as they
# liked (the host's MaxStartups then drops everyone's new logins).

def test_sftp_sessions_stay_within_the_hosts_login_cap(kt, sshd):
    from proxies.ssh.gateway import UpstreamPool

    def logins() -> int:
        r = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{sshd.port} )"],
                           capture_output=True, text=True, check=False)
        return len(r.stdout.splitlines())

    async def go():
        conns, clients, most = [], [], 0
        try:
            for _ in range(3):  # 30 sessions: within one user's share of the host
                conns.append(await _connect(kt, conn="web2").__aenter__())
            for c in conns:
                for _ in range(10):
                    try:
                        s = await c.start_sftp_client()
                        await s.stat("/")
                        clients.append(s)
                    except (asyncssh.Error, OSError):
                        pass
                    most = max(most, logins())
            await asyncio.sleep(0.5)
            return max(most, logins()), len(clients)
        finally:
            for c in conns:
                c.close()
    most, opened = asyncio.run(go())
    assert opened == 30, opened
    assert most <= UpstreamPool.LOGINS, ("logins to the host", most, "sftp sessions", opened)


# ---- 11. an sftp path far longer than any the host accepts (PATH_MAX, 4096 bytes) was
# judged and held: a ticket of 100 KB of text for approvers (exec lines are capped at
# 8 KiB). It is refused before it is judged.

def test_held_sftp_huge_path_makes_no_ticket(kt, box):
    name = str(box) + "/" + "x" * 100_000

    async def go():
        async with _connect(kt, conn="web2") as conn:
            async with conn.start_sftp_client() as sftp:
                try:
                    await asyncio.wait_for(sftp.mkdir(name), 15)
                    return "ok"
                except Exception as exc:  # noqa: BLE001
                    return repr(exc)[:200]
    kt.skip_pending()
    before = kt.last_ticket
    result = asyncio.run(go())
    try:
        kt.wait_ticket(timeout=1)
    except TimeoutError:
        pass
    assert kt.last_ticket == before, ("a ticket for a 100 KB path", result)
    assert result != "ok"


# ---- 12. channels of one connection run concurrently (ssh's ControlMaster, parallel
# scp): two were given the same number while their lines were classified, their
# recordings the same file, and the second failed ("internal error", FileExistsError).

def test_concurrent_channels_of_one_connection_all_run(kt):
    async def go():
        async with _connect(kt) as conn:
            return await asyncio.gather(*(conn.run(f"echo {i}", timeout=60)
                                          for i in range(10)), return_exceptions=True)
    results = asyncio.run(go())
    bad = [(i, r) for i, r in enumerate(results)
           if isinstance(r, BaseException) or r.exit_status != 0 or r.stdout != f"{i}\n"]
    assert not bad, bad[:3]
