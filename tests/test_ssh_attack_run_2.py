"""Families from the SSH gateway's attack run 2, end to end through the real ssh client,
the gateway and a throwaway OpenSSH server (and the classifier alone where the effect
needs root): GNU long options abbreviated, brace expansion and variables that become
options, values of bundled short options and old-style tar options taken for the command,
paths inside options, read programs with write modes, /proc magic links (exec and sftp),
admin actions taken for reads (ionice -p, top, systemd tools' subcommands, ss -K), pagers
with a terminal, and a gateway stalled by classifying long command lines. Each test
asserts the safe behaviour and checks the host directly; the held_* tests are things tried
that the gateway already handled."""
# ruff: noqa: F811 - test parameters name the fixtures imported from tests.ssh_attack_support
from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from proxies.ssh.shell import classify
from tests.ssh_attack_support import RISK, _argv, box, kt, ssh, sshd  # noqa: F401 - fixtures
from tests.ssh_support import TARGET_USER


def _file(path: Path, text: str, mode: int = 0o666) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _asnc(coro):
    return asyncio.run(coro)


async def _sftp(kt, conn, fn, user="alice"):
    import asyncssh
    key = asyncssh.read_private_key(str(kt.base / f"{user}_key"))
    async with asyncssh.connect("127.0.0.1", kt.ssh_port, username=f"{user}+{conn}",
                                client_keys=[key], known_hosts=None,
                                agent_path=None) as c:
        async with c.start_sftp_client() as sftp:
            return await fn(sftp)


# ---------------------------------------------------------------- classifier only
@pytest.mark.parametrize("line, real", [
    # GNU getopt_long takes any unambiguous prefix, down to one letter after "--"
    ("date --se=2000-01-01", "admin"),              # --set
    ("date -s@0", "admin"),                         # -s with its value attached
    ("sed --in s/a/b/ /etc/x", "write"),            # --in-place
    ("sort --o=/etc/x /etc/os-release", "write"),   # --output
    ("/usr/bin/time --ou=/etc/x true", "write"),    # --output
    ("sed --e='1e rm -rf /x' p /etc/os-release", "unknown"),  # --expression
    ("journalctl --fl", "admin"),                   # --flush
    # brace expansion / variables that become options
    ("sort {-o,/etc/x} /etc/os-release", "write"),
    ("find /srv {-delete,-print}", "destructive"),
    ("o=-o; sort $o /etc/x /etc/os-release", "write"),
    ("x=-delete; find /srv $x", "destructive"),
    ("o=-i; sed -e s/a/b/ $o /etc/x", "write"),
    # the value of a bundled short option taken for the command
    ("flock -nE 0 /usr/bin/ls rm -rf /x", "destructive"),
    ("echo /x | xargs -rI ls rm -rf ls", "destructive"),
    ("xargs -0a ls rm -rf /x", "destructive"),
    ("xargs --arg ls rm -rf /x", "destructive"),
    # old-style (dash-less) tar options
    ("tar tIf 'sh -c \"rm -rf /x\" x' a.tar", "unknown"),
    ("tar tFf /tmp/script a.tar", "unknown"),
    # read-table programs that write or change things
    ("yq -i .a=1 /etc/x.yml", "write"),
    ("yq --in-place .a=1 /etc/x.yml", "write"),
    ("xxd /etc/os-release /etc/x", "write"),
    ("ionice -c3 -p 1", "admin"),
    ("ionice -c1 -P 1", "admin"),
    # programs with read subcommands that are also in the READ table: any other
    # subcommand falls through to "read"
    ("loginctl terminate-user ktssh", "admin"),
    ("loginctl kill-session 1", "admin"),
    ("timedatectl set-time 2000-01-01", "admin"),
    ("timedatectl set-ntp false", "admin"),
    ("hostnamectl set-hostname evil", "admin"),
    ("ss -K dst 10.0.0.1", "admin"),               # ss --kill closes sockets
    # read-table programs that open a pager (a shell escape) under a terminal
    ("journalctl --help", "unknown"),
    # top takes `k` (kill) and `r` (renice) commands: admin unless in batch mode (-b)
    ("top", "admin"),
    ("htop", "admin"),
])
def test_classifier_misses_option_tricks(line, real):
    """The classifier alone; ``classify(line)`` counts on a terminal (the gateway says
    whether there is one). Expectation changed after the run: `top` was expected unknown;
    admin is what it can do (kill, renice), held for approval like any admin action."""
    a = classify(line)
    assert RISK[a.cls] >= RISK[real], (line, a.cls, a.reasons)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("tmpl, check", [
    ("sed --in s/NAME/PWNED/ {f}", "edit"),
    ("sed --in-pl=.bak s/NAME/PWNED/ {f}", "edit"),
    ("sed --e='1e touch {m}' p /etc/os-release", "made"),
    ("sed --fi={s} p /etc/os-release", "made"),
    ("sort --o={m} /etc/os-release", "made"),
    ("/usr/bin/time --ou={m} true", "made"),
])
def test_e2e_gnu_long_option_abbreviation(kt, box, tmpl, check):
    """GNU programs accept any unambiguous prefix of a long option (getopt_long), even
    `--i` or `--o=`; the classifier only knows full names or prefixes of 5+ chars."""
    f = _file(box / "f.txt", "NAME\n")
    m = box / "made"
    s = _file(box / "s.sed", f"1e touch {m}\n", 0o644)
    cmd = tmpl.format(f=f, m=m, s=s)
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert f.read_text() == "NAME\n" and not m.exists(), (
        "changed without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("tmpl", [
    "sort {{-o,{m}}} /etc/os-release",
    "find {d} {{-delete,-print}}",
])
def test_e2e_brace_expansion_makes_an_option(kt, box, tmpl):
    """Brace expansion in an argument produces option words (`{-o,FILE}` -> `-o FILE`)
    that the classifier never sees as options."""
    m = box / "made"
    d = box / "d"
    d.mkdir()
    os.chmod(d, 0o777)
    _file(d / "keep", "x")
    cmd = tmpl.format(m=m, d=d)
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert not m.exists() and (d / "keep").exists(), (
        "changed without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("tmpl", [
    "o=-o; sort $o {m} /etc/os-release",
    "x=-delete; find {d} $x",
    "o=-i; sed -e s/NAME/PWNED/ $o {f}",
    "o=-I; tar -t $o \"sh -c 'touch {m}' x\" -f {arch}",
])
def test_e2e_variable_expands_to_an_option(kt, box, tmpl):
    """A lower-case variable (allowed) holding an option: the classifier checks options
    by their literal text, `$o` is taken for an operand. web2: no path rules."""
    m = box / "made"
    d = box / "d"
    d.mkdir()
    os.chmod(d, 0o777)
    _file(d / "keep", "x")
    f = _file(box / "f.txt", "NAME\n")
    arch = box / "a.tar"
    subprocess.run(["tar", "-cf", str(arch), "-C", "/etc", "os-release"], check=True)
    os.chmod(arch, 0o644)
    cmd = tmpl.format(m=m, d=d, f=f, arch=arch)
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2")
    assert not m.exists() and (d / "keep").exists() and f.read_text() == "NAME\n", (
        "changed without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("tmpl, conn", [
    ("flock -nE 0 /usr/bin/ls rm -f {v}", "web1"),
    ("echo {v} | xargs -rI ls rm ls", "web2"),
    ("printf %s {v} | xargs -0I ls rm ls", "web2"),
])
def test_e2e_bundled_short_option_takes_the_value(kt, box, tmpl, conn):
    """A wrapper's valued option bundled after a flag (`-nE 0`, `-rI ls`): the classifier
    skips the bundle as a flag and takes the option's value for the program it runs."""
    v = _file(box / "victim", "x")
    cmd = tmpl.format(v=v)
    a = classify(cmd)
    r = ssh(kt, cmd, conn=conn)
    assert v.exists(), ("removed without approval", cmd, a.cls, r.returncode, r.stderr)


def test_e2e_xargs_abbreviated_arg_file_value(kt, box):
    """`xargs --arg FILE CMD` (--arg-file abbreviated, value in the next word): FILE is
    taken for the program."""
    v = _file(box / "victim", "x")
    _file(box / "ls", f"{v}\n", 0o644)
    cmd = f"cd {box} && xargs --arg ls rm -f"
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2")
    assert v.exists(), ("removed without approval", a.cls, r.returncode, r.stderr)


def test_e2e_tar_old_style_bundled_exec_option(kt, box):
    """Old-style tar options (`tar tIf PROG ARCHIVE`, no dash) are not checked for the
    options that run programs (-I, -F): `t` makes it a read."""
    m = box / "made"
    arch = box / "a.tar"
    subprocess.run(["tar", "-cf", str(arch), "-C", "/etc", "os-release"], check=True)
    os.chmod(arch, 0o644)
    cmd = f"tar tIf \"sh -c 'touch {m}' x\" {arch}"
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert not m.exists(), ("tar ran a program", a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("cmd", [
    "diff --from-file=/etc/passwd /dev/null",
    "date -f/etc/passwd",
    "wc --files0-from=/etc/passwd",
    "date --fil=/etc/passwd",
])
def test_e2e_option_attached_path_escapes_path_rule(kt, cmd):
    """A file named in an option's attached value (`--opt=/path`, `-f/path`) is not a
    path for policy: the block rule on /etc/passwd never sees it."""
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert "root:x:0:0" not in r.stdout + r.stderr, (cmd, a.cls, a.paths, r.returncode)


def test_e2e_attached_target_dir_escapes_scratch_rule(kt, box):
    """web3 allows writes whose every path is under /tmp/ktsftp-*; `cp -t DIR`'s attached
    directory is no path, so a copy into any directory passes as a scratch write."""
    d = Path(f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    os.chmod(d, 0o755)
    try:
        _file(d / "payload", "planted\n", 0o644)
        cmd = f"cp -t{box} {d}/payload"
        a = classify(cmd)
        r = ssh(kt, cmd, conn="web3")
        assert not (box / "payload").exists(), (
            "wrote outside scratch without approval", a.cls, a.paths, r.returncode,
            r.stderr)
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.mark.parametrize("tmpl", ["yq -i -y .a=2 {y}", "yq --in-place -y .a=2 {y}",
                                  "xxd /etc/os-release {m}"])
def test_e2e_read_program_that_writes(kt, box, tmpl):
    """Programs in the read table with a write mode: yq -i edits in place, xxd IN OUT
    writes OUT (like uniq IN OUT, fixed in run 1)."""
    y = _file(box / "c.yml", "a: 1\n")
    m = box / "made"
    cmd = tmpl.format(y=y, m=m)
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert y.read_text() == "a: 1\n" and not m.exists(), (
        "written without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("how", ["exec", "sftp"])
def test_e2e_proc_self_root_escapes_path_rule(kt, how):
    """/proc/self/root (and /proc/self/cwd, /proc/<pid>/root) is a symbolic link every
    process has: no planting needed to name a blocked file by another path."""
    p = "/proc/self/root/etc/passwd"
    if how == "exec":
        r = ssh(kt, f"cat {p}")
        got = r.stdout
    else:
        async def go(sftp):
            try:
                async with sftp.open(p, "rb") as f:
                    return (await f.read()).decode()
            except Exception as exc:  # noqa: BLE001
                return f"refused {exc}"
        got = _asnc(_sftp(kt, "web1", go))
    assert "root:x:0:0" not in got, (how, got[:60])


def test_e2e_ionice_p_changes_another_process(kt):
    """`ionice -c3 -p PID` (no command) changes another process's I/O class: a wrapper
    with no command is taken for a read."""
    sleeper = subprocess.Popen(["runuser", "-u", TARGET_USER, "--", "sleep", "60"])
    try:
        time.sleep(0.5)
        pid = int(subprocess.run(["pgrep", "-P", str(sleeper.pid), "sleep"],
                                 capture_output=True, text=True).stdout.split()[0]
                  or sleeper.pid)
    except (IndexError, ValueError):
        pid = sleeper.pid
    try:
        before = subprocess.run(["ionice", "-p", str(pid)], capture_output=True,
                                text=True).stdout
        r = ssh(kt, f"ionice -c3 -p {pid}")
        after = subprocess.run(["ionice", "-p", str(pid)], capture_output=True,
                               text=True).stdout
        assert after == before, ("changed without approval", before, after, r.returncode,
                                 r.stderr)
    finally:
        sleeper.kill()


def test_held_systemd_tool_pager_shell_escape_with_pty(kt, box):
    """HELD: journalctl pipes its output through less when it has a terminal; less's
    `!cmd` runs a shell command. Here systemd's pager sets LESSSECURE ("Command not
    available"), but only because this host has no logind session: the classifier now
    counts it unknown with a terminal unless --no-pager or its output is piped."""
    m = box / "pwned"
    p = subprocess.Popen(_argv(kt, "alice", "web1", "journalctl --help", extra=("-tt",)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(4)
    try:
        p.stdin.write(f"!touch {m}\r".encode())
        p.stdin.flush()
        time.sleep(3)
        p.stdin.write(b"\rq")
        p.stdin.flush()
        p.communicate(timeout=15)
    except Exception:
        p.kill()
    assert not m.exists(), "journalctl's pager ran a shell command typed in it"


def _sleeper():
    p = subprocess.Popen(["runuser", "-u", TARGET_USER, "--", "sleep", "120"])
    time.sleep(0.5)
    out = subprocess.run(["pgrep", "-u", TARGET_USER, "-n", "-x", "sleep"],
                         capture_output=True, text=True).stdout.split()
    return p, int(out[0]) if out else p.pid


def test_e2e_top_kills_a_process_with_pty(kt):
    """top is in the read table; with a terminal its `k` command sends any signal to any
    process of the target user (and `r` renices): an admin action typed into a read."""
    holder, pid = _sleeper()
    try:
        p = subprocess.Popen(_argv(kt, "alice", "web1", "top", extra=("-tt",)),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        time.sleep(3)
        try:
            for chunk in (b"k", f"{pid}\r".encode(), b"9\r"):
                p.stdin.write(chunk)
                p.stdin.flush()
                time.sleep(1)
            p.stdin.write(b"q")
            p.stdin.flush()
            p.communicate(timeout=15)
        except Exception:
            p.kill()
        alive = subprocess.run(["kill", "-0", str(pid)]).returncode == 0
        assert alive, "top (class read) killed a process"
    finally:
        holder.kill()


# ---------------------------------------------------------------- held
@pytest.mark.parametrize("line", [
    "echo $'\\x72m' x",                    # ANSI-C quoting -> unknown
    "f() { rm -f x; }; f",                 # function -> unknown
    "alias ls=rm; ls x",                   # alias builtin -> unknown
    "IFS=/; ls",                           # IFS
    "cat <<<$(rm x)",                      # substitution in here-string
    "x=rm; $x -f y",                       # variable in command position
    "\\rm -f x",                           # quoting undone -> rm
    "/usr/bin/env -S 'rm x'",              # -S refused
    "busybox rm x",
    "ls\nrm -f x",                          # newline list
    "ls & rm -f x",
    "cat <<EOF\nhi\nEOF\nrm -f x",           # command after a here-document
    "sort --compress-prog=sh /etc/os-release",
    "git status",                           # git is unknown
    "tar -tf a.tar -I 'sh -c x'",
])
def test_held_classifier_families(line):
    """HELD: these were seen as at least destructive/unknown."""
    a = classify(line)
    assert RISK[a.cls] >= RISK["destructive"], (line, a.cls, a.reasons)


def test_held_sftp_nul_in_path(kt):
    """HELD: a NUL inside an sftp path (policy sees /etc/passwd\\0x, the target's sftp
    server would read a C string) is rejected by OpenSSH's sftp-server."""
    async def go(sftp):
        try:
            async with sftp.open(b"/etc/passwd\x00x", "rb") as f:
                return (await f.read()).decode()
        except Exception as exc:  # noqa: BLE001
            return f"refused {exc}"
    try:
        got = _asnc(_sftp(kt, "web1", go))
    except Exception as exc:  # noqa: BLE001
        got = f"connection failed {exc}"
    assert "root:x:0:0" not in got, got[:80]


@pytest.mark.parametrize("extra", [
    ("-o", "SetEnv=LD_PRELOAD=/tmp/nonexistent.so BASH_ENV=/etc/passwd"),
])
def test_held_client_env_not_passed(kt, extra):
    """HELD: SetEnv is not passed to the target."""
    r = ssh(kt, "printenv LD_PRELOAD BASH_ENV; echo done", extra=extra)
    assert "nonexistent" not in r.stdout and "done" in r.stdout, (r.stdout, r.stderr)


def test_held_subsystem_and_forwarding(kt):
    """HELD: other subsystems, -L and -W are refused."""
    r = ssh(kt, "netconf", extra=("-s",))
    assert r.returncode != 0
    r = ssh(kt, None, extra=("-W", "127.0.0.1:22"), timeout=20, input="")
    assert "SSH-2.0" not in r.stdout, r.stdout[:60]


def test_gateway_stalls_while_classifying_long_commands(kt):
    """classify() runs bashlex synchronously on the gateway's event loop; a 64 KiB line
    of `ls|ls|...` takes seconds, and one connection may open many channels: every other
    user's login and command waits (no per-connection channel cap, no thread offload)."""
    import threading

    import asyncssh
    heavy = ("ls|" * 21700)[:65000].rstrip("|") + "|ls"

    async def flood():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice:web1",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            async def one():
                try:
                    await conn.run(heavy, timeout=120)
                except Exception:  # noqa: BLE001
                    pass
            await asyncio.gather(*(one() for _ in range(8)))

    t = threading.Thread(target=lambda: asyncio.run(flood()))
    t.start()
    time.sleep(2)
    t0 = time.monotonic()
    r = ssh(kt, "echo alive", user="bob", timeout=180)
    took = time.monotonic() - t0
    t.join(timeout=180)
    assert r.stdout == "alive\n" and took < 8, ("bob waited", round(took, 1), r.stderr)
