"""Families from the SSH gateway's attack run 1, end to end through the real ssh, sftp and a
throwaway OpenSSH server (and the classifier alone): hidden substitutions, wrappers and
options that run other programs, pagers with a terminal, writes taken for reads, path
rules met through relative names, variables, .., other homes, // and symbolic links,
failed key logins audited, ticket lists that show escapes. Each test asserts the safe
behaviour and checks the host directly."""
# ruff: noqa: F811 - test parameters name the fixtures imported from tests.ssh_attack_support
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from proxies.ssh.shell import classify
from tests.ssh_attack_support import RISK, _argv, box, kt, ssh, sshd  # noqa: F401 - fixtures
from tests.ssh_support import TARGET_USER, keygen, ssh_options


# ---------------------------------------------------------------- classifier
@pytest.mark.parametrize("line, real", [
    ("flock /bin/ls -c 'rm -rf /x'", "destructive"),       # flock FILE -c CMD runs sh -c
    ("flock /bin/ls rm -rf /x", "destructive"),            # flock FILE CMD
    ("echo a | xargs -i rm ls /x", "destructive"),         # -i takes no separate value
    ("echo a | xargs -e rm ls /x", "destructive"),
    ("echo a | xargs -l rm ls /x", "destructive"),
    ("exec -a ls rm -rf /x", "destructive"),               # -a NAME: argv0, runs rm
    ("cat <<EOF\n$(rm -rf /x)\nEOF", "unknown"),           # heredoc bodies expand
    ("cat <<EOF\n`rm -rf /x`\nEOF", "unknown"),
    ("echo ${PATH:=/tmp/evil}; ls", "unknown"),             # sets PATH
    (": ${LD_PRELOAD=/tmp/x.so}; ls", "unknown"),
    ("printf -v PATH %s /tmp/evil; ls", "unknown"),         # printf -v assigns
    ("/usr/bin/time -o /etc/x true", "write"),
    ("uniq /etc/a /etc/x", "write"),
    ("xxd -r /tmp/a /etc/x", "write"),
    ("git log --output=/etc/x", "write"),
    ("git diff --output=/etc/x", "write"),
    ("dmesg -C", "admin"),
    ("dmesg --clear", "admin"),
    ("docker -H ps run --privileged alpine", "admin"),
    ("kubectl --namespace get delete pod x", "admin"),
    ("ip netns exec foo rm -rf /x", "destructive"),
    ("ip -b /tmp/batch", "admin"),
    ("stty -F /dev/ttyS0 raw", "admin"),
])
def test_classifier_sees_what_really_runs(line, real):
    a = classify(line)
    assert RISK[a.cls] >= RISK[real], (line, a)


@pytest.mark.parametrize("line", [
    "cat ../../etc/passwd",               # from /home/ktssh
    "cat ~/../../etc/passwd",
    "cat ~root/../etc/passwd",
    "cat /etc/{passwd,group}",
    "cd /etc; cd /tmp; cd -; cat passwd",
    "env -C /etc cat passwd",
    "ls() { cd /etc; }; cd /tmp; ls; cat passwd",
    "cat ~+/../../etc/passwd",
])
def test_paths_reach_etc_passwd(line):
    from fnmatch import fnmatchcase

    a = classify(line)
    assert a.cls == "unknown" or "*" in a.paths or any(
        fnmatchcase("/etc/passwd", p) for p in a.paths), (line, a)


# ---------------------------------------------------------------- end to end
def test_e2e_flock_runs_rm_as_a_read(kt, box):
    victim = box / "victim"
    victim.write_text("x")
    r = ssh(kt, f"flock /bin/ls -c 'rm -f {victim}'")
    assert victim.exists(), ("removed without approval", r.returncode, r.stderr)


def test_e2e_xargs_i_runs_rm_as_a_read(kt, box):
    victim = box / "victim"
    victim.write_text("x")
    r = ssh(kt, f"echo a | xargs -i rm ls {victim}")
    assert victim.exists(), ("removed without approval", r.returncode, r.stderr)


def test_e2e_exec_a_runs_rm_as_a_read(kt, box):
    victim = box / "victim"
    victim.write_text("x")
    r = ssh(kt, f"exec -a ls rm -f {victim}")
    assert victim.exists(), ("removed without approval", r.returncode, r.stderr)


def test_e2e_heredoc_command_substitution(kt, box):
    m = box / "made"
    r = ssh(kt, f"cat <<EOF\n$(touch {m})\nEOF")
    assert not m.exists(), ("created without approval", r.returncode, r.stderr)


def test_e2e_time_o_writes_a_file(kt, box):
    m = box / "written"
    r = ssh(kt, f"/usr/bin/time -o {m} true")
    assert not m.exists(), ("written without approval", r.returncode, r.stderr)


def test_e2e_uniq_writes_a_file(kt, box):
    m = box / "written"
    r = ssh(kt, f"uniq /etc/os-release {m}")
    assert not m.exists(), ("written without approval", r.returncode, r.stderr)


@pytest.mark.parametrize("cmd", [
    "cat ../../etc/passwd", "cat ~/../../etc/passwd", "cat ~root/../etc/passwd",
    "cat /etc/{passwd,group}", "cd /etc; cd /tmp; cd -; cat passwd",
    "env -C /etc cat passwd", "cat /etc/hostnam?", "cat //etc/passwd",
])
def test_e2e_blocked_path_is_read(kt, cmd):
    r = ssh(kt, cmd)
    assert "root:x:0:0" not in r.stdout and r.returncode == 126, (cmd, r.stdout[:80],
                                                                  r.stderr)


def test_e2e_printf_v_path(kt, box):
    bindir = box / "bin"
    bindir.mkdir()
    os.chmod(bindir, 0o755)
    m = box / "pwned"
    (bindir / "ls").write_text(f"#!/bin/sh\n/usr/bin/touch {m}\necho PWNED\n")
    os.chmod(bindir / "ls", 0o755)
    r = ssh(kt, f"printf -v PATH %s {bindir}; ls")
    assert not m.exists(), ("ran an arbitrary program", r.returncode, r.stdout, r.stderr)
    assert "PWNED" not in r.stdout, (r.returncode, r.stdout, r.stderr)


def test_e2e_cdpath_default_assignment(kt):
    r = ssh(kt, ": ${CDPATH:=/}; cd etc; cat passwd")
    assert "root:x:0:0" not in r.stdout, (r.returncode, r.stdout[:60], r.stderr)


def test_e2e_tilde_user_dotdot(kt):
    r = ssh(kt, f"cat ~{TARGET_USER}/../../etc/passwd")
    assert "root:x:0:0" not in r.stdout, (r.returncode, r.stdout[:60], r.stderr)


def test_e2e_function_cd(kt):
    r = ssh(kt, "ls() { cd /etc; }; cd /tmp; ls; cat passwd")
    assert "root:x:0:0" not in r.stdout, (r.returncode, r.stdout[:60], r.stderr)


def test_e2e_xargs_i_runs_rm_as_a_read_no_path_rules(kt, box):
    victim = box / "victim"
    victim.write_text("x")
    r = ssh(kt, f"echo a | xargs -i rm ls {victim}", conn="web2")
    assert victim.exists(), ("removed without approval", r.returncode, r.stderr)


def test_e2e_cd_then_relative_name(kt):
    r = ssh(kt, "cd /etc && cat passwd")
    assert "root:x:0:0" not in r.stdout, (r.returncode, r.stdout[:60], r.stderr)


def test_e2e_sort_uo_writes(kt, box):
    m = box / "written"
    r = ssh(kt, f"sort -uo {m} /etc/os-release")
    assert not m.exists(), ("written without approval", r.returncode, r.stderr)


def test_e2e_tar_checkpoint_act_abbreviation(kt, box):
    m = box / "pwned"
    arch = box / "a.tar"
    subprocess.run(["tar", "-cf", str(arch), "-C", "/etc", "os-release"], check=True)
    os.chmod(arch, 0o644)
    r = ssh(kt, f"tar -tf {arch} --checkpoint=1 --checkpoint-act=exec='touch {m}'")
    assert not m.exists(), ("arbitrary command ran", r.returncode, r.stdout, r.stderr)


def test_e2e_git_grep_open_in_pager(kt, box):
    m = box / "pwned"
    r = ssh(kt, f"cd /tmp && git grep --no-index -O'touch {m}' NAME /etc/os-release")
    assert not m.exists(), ("arbitrary command ran", r.returncode, r.stdout, r.stderr)


def test_e2e_bash_rcfile_interactive(kt, box):
    m = box / "pwned"
    rc = box / "rc"
    rc.write_text(f"/usr/bin/touch {m}\n")
    os.chmod(rc, 0o644)
    r = ssh(kt, f"bash --rcfile {rc} -ic true")
    assert not m.exists(), ("arbitrary command ran", r.returncode, r.stdout, r.stderr)


def test_e2e_less_plus_bang_with_pty(kt, box):
    m = box / "pwned"
    p = subprocess.Popen(_argv(kt, "alice", "web1", f"less '+!touch {m}' /etc/os-release",
                               extra=("-tt",)), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4)
    try:
        p.stdin.write(b"\rq")
        p.stdin.flush()
        p.communicate(timeout=15)
    except Exception:
        p.kill()
    assert not m.exists(), "less +!cmd ran a command"


@pytest.mark.parametrize("prog", ["less", "more"])
def test_e2e_pager_shell_escape_with_pty(kt, box, prog):
    m = box / f"pwned-{prog}"
    big = box / "big.txt"
    big.write_text("line\n" * 500)
    os.chmod(big, 0o644)
    p = subprocess.Popen(_argv(kt, "alice", "web1", f"{prog} {big}", extra=("-tt",)),
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
    assert not m.exists(), f"{prog} (class read) ran a shell command typed in it"


def test_gateway_serves_others_while_many_idle_unauthenticated(kt):
    import socket
    socks = []
    try:
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", kt.ssh_port), timeout=5)
            s.sendall(b"SSH-2.0-idle\r\n")
            socks.append(s)
        t0 = time.monotonic()
        r = ssh(kt, "echo alive", timeout=60)
        assert r.stdout == "alive\n", (r.returncode, r.stderr)
        assert time.monotonic() - t0 < 20
    finally:
        for s in socks:
            s.close()


def test_gateway_serves_others_while_a_command_is_held(kt, box):
    m = box / "held"
    p = subprocess.Popen(_argv(kt, "alice", "web1", f"touch {m}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    r = ssh(kt, "echo alive", user="bob", timeout=30)
    p.communicate(timeout=30)
    assert r.stdout == "alive\n", r.stderr
    assert not m.exists()


def _sftp_read(kt, path: str) -> bytes | str:
    import asyncio

    import asyncssh

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web1",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                try:
                    async with sftp.open(path, "rb") as f:
                        return await f.read()
                except asyncssh.SFTPError as exc:
                    return f"refused: {exc}"
    return asyncio.run(go())


@pytest.mark.parametrize("path", ["../../etc/passwd", "x/../../../etc/passwd",
                                  "/etc/passwd", "//etc/passwd", "/etc/./passwd"])
def test_sftp_relative_dotdot_reaches_blocked_path(kt, path):
    got = _sftp_read(kt, path)
    assert not (isinstance(got, bytes) and b"root:x:0:0" in got), (path, got[:40])


@pytest.mark.parametrize("tmpl", [
    "echo ${{x:-$(touch {m})}}",          # substitution inside ${...:-...}
    "echo \"${{x:-$(touch {m})}}\"",
    "echo ${{x[$(touch {m})]}}",          # in an array index
    "echo ${{x/a/`touch {m}`}}",
    "echo ~$(touch {m})",                 # after a tilde
    "cat <<EOF\n${{x:-$(touch {m})}}\nEOF",
])
def test_e2e_hidden_command_substitution(kt, box, tmpl):
    m = box / "made"
    cmd = tmpl.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert not m.exists(), ("ran a hidden command", a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("opt", ["-f{s}", "--fil={s}", "-nf{s}"])
def test_e2e_sed_script_file_attached(kt, box, opt):
    m = box / "made"
    s = box / "script.sed"
    s.write_text(f"1e touch {m}\n")
    os.chmod(s, 0o644)
    cmd = f"sed {opt.format(s=s)} p /etc/os-release"
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert not m.exists(), ("sed script file ran a command", a.cls, r.returncode, r.stderr)


def test_sftp_scratch_symlink_chain_escapes_scratch(kt):
    """Policy: writes allowed only under /tmp/ktsftp-*. Symlinks whose targets are
    lexically inside the scratch dir resolve physically to /; a write through them lands
    outside scratch without a ticket."""
    import asyncio

    import asyncssh
    d = f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}"
    victim = Path(f"/tmp/ktatk-victim-{uuid.uuid4().hex[:8]}")
    victim.mkdir()
    os.chmod(victim, 0o777)

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web3",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.mkdir(d)
                await sftp.symlink(d, f"{d}/s0")                  # -> /tmp/ktsftp-x
                await sftp.symlink(f"{d}/s0/..", f"{d}/s1")       # lexically d, really /tmp
                await sftp.symlink(f"{d}/s1/..", f"{d}/s2")       # lexically d, really /
                rel = str(victim).lstrip("/")
                async with sftp.open(f"{d}/s2/{rel}/planted", "wb") as f:
                    await f.write(b"outside scratch\n")
    try:
        asyncio.run(go())
    except Exception as exc:  # noqa: BLE001
        print("sftp error", exc)
    try:
        assert not (victim / "planted").exists(), "wrote outside scratch without approval"
    finally:
        subprocess.run(["rm", "-rf", str(victim), d], check=False)


def test_exec_of_an_empty_command_opens_a_shell_upstream(kt, box):
    """A non-OpenSSH client may send exec with an empty command: classified as nothing
    (read), but the gateway's own client turns '' into a *shell* request upstream, which
    runs whatever arrives on stdin. The policy here blocks shells (no rule: default)."""
    import asyncio

    import asyncssh
    from asyncssh.channel import SSHClientChannel
    from asyncssh.packet import String
    m = box / "made-by-stdin"
    orig = SSHClientChannel._make_request

    async def patched(self, request, *args):
        if request == b"shell":
            return await orig(self, b"exec", String(""))
        return await orig(self, request, *args)

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice:web1",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            SSHClientChannel._make_request = patched
            try:
                r = await conn.run(input=f"touch {m}; id -un\nexit\n", timeout=30)
            except BrokenPipeError:
                # the gateway refused and closed the channel before the input went out
                return None
            finally:
                SSHClientChannel._make_request = orig
            return r
    r = asyncio.run(go())
    if r is not None:
        print("exit", r.exit_status, "out", r.stdout, "err", r.stderr)
        assert r.exit_status != 0, ("an empty exec succeeded", r.stdout, r.stderr)
    assert not m.exists(), "a shell ran stdin"



def test_ticket_list_prints_terminal_escapes_to_the_approver(kt, box):
    """A comment in the command carries escape sequences; `keyturn tickets` prints the
    statement raw, so the approver's terminal can be made to show another row."""
    fake = "\x1b[2K\x1b[G*  99 pending alice web1 read ls"
    cmd = f"rm -rf ~/x #{fake}"
    kt.skip_pending()
    p = subprocess.Popen(_argv(kt, "alice", "web1", cmd), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    kt.wait_ticket()
    out = kt.cli("tickets", token_of="bob").stdout
    p.communicate(timeout=30)
    print("TICKETS", repr(out[-300:]))
    assert "\x1b" not in out, "raw escape sequence printed to the approver's terminal"


def test_failed_key_logins_are_audited(kt, tmp_path):
    keygen(tmp_path / "stranger", "stranger")
    for user in ("alice:web1", "nosuchuser:web1", "alice:nosuchconn"):
        r = subprocess.run(["ssh", *ssh_options(), "-i", str(tmp_path / "stranger"), "-p",
                            str(kt.ssh_port), f"{user}@127.0.0.1", "true"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 255
    time.sleep(3)
    out = kt.cli("audit", "export", "--format", "jsonl").stdout
    fails = [json.loads(x) for x in out.splitlines() if '"auth_failed"' in x]
    print("FAILS", [(f.get("user"), f.get("reason")) for f in fails])
    assert len(fails) >= 3, "failed public-key logins leave no auth_failed record"


@pytest.mark.parametrize("form", ["env '-Stouch {m}'", "env -S'touch {m}'",
                                  "env -iS'touch {m}'"])
def test_e2e_env_split_string_attached(kt, box, form):
    m = box / "made"
    cmd = form.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert not m.exists(), ("env -S ran a command", a.cls, r.returncode, r.stderr)


def test_e2e_git_status_runs_repo_config_hook_planted_in_scratch(kt, box):
    """Only allowed operations: sftp writes under /tmp/ktsftp-* (scratch rule), then a
    read (`git status`). The repo's core.fsmonitor runs a command of the caller's choosing."""
    import asyncio

    import asyncssh
    m = box / "made-by-fsmonitor"
    d = f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}"

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web3",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                for sub in ("", "/.git", "/.git/objects", "/.git/refs"):
                    await sftp.mkdir(d + sub)
                async with sftp.open(f"{d}/.git/HEAD", "wb") as f:
                    await f.write(b"ref: refs/heads/main\n")
                async with sftp.open(f"{d}/.git/config", "wb") as f:
                    await f.write(f'[core]\n\trepositoryformatversion = 0\n'
                                  f'\tfsmonitor = "touch {m}"\n'.encode())
    asyncio.run(go())
    cmd = f"cd {d} && git status"
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web3")
    # (the scratch dir is owned by ktssh; left behind)
    assert not m.exists(), ("git status ran the repo's hook", a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("cmd", ["f=/etc/passwd; cat $f", "cat ${nothing}/etc/passwd",
                                 "cat $PWD/../../etc/passwd"])
def test_e2e_variable_in_a_read_argument_drops_the_path(kt, cmd):
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert "root:x:0:0" not in r.stdout, (cmd, a.cls, a.paths, r.returncode)


def test_sftp_create_with_mode_is_not_an_admin_change(kt):
    """setstat that changes permissions is admin (reviewed); the same mode given in the
    open (create) request is judged a plain write (allowed in scratch)."""
    import asyncio
    import stat as st

    import asyncssh
    d = f"/tmp/ktsftp-{uuid.uuid4().hex[:8]}"

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web3",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.mkdir(d, asyncssh.SFTPAttrs(permissions=0o777))
                async with sftp.open(f"{d}/tool", "wb",
                                     asyncssh.SFTPAttrs(permissions=0o6777)) as f:
                    await f.write(b"#!/bin/sh\n")
    asyncio.run(go())
    mode = os.stat(f"{d}/tool").st_mode
    assert not (mode & (st.S_ISUID | st.S_IWOTH)), oct(mode)
