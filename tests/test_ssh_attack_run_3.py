"""Families from the SSH gateway's attack run 3, end to end through the real ssh client,
the gateway and a throwaway OpenSSH server (the classifier alone where noted): a `cd`
that does not happen (it fails, is skipped by `&&`/`||`, or runs in a subshell, a
background job or a pipeline: the shell may still be where it was, so relative paths are
resolved against every directory it may be in), arithmetic evaluation that expands an
escaped substitution again (subscripts of names given to builtins, values assigned where
`declare -i` may be on: unknown), variables changed unseen (prefix assignments on `eval`
/ `bash -c`, `printf -v 'o[0]'`, builtins, loops, nested code: unknown from there on),
`$0`/`$1` of `sh -c BODY ARG0 ...` chosen by the line, a shell's script operand before
`-c` (options end at the first operand), xargs/find placeholders inside a shell body
(input lines and file names become code), tar options that write in list mode, and
recursive programs reaching what is below a directory operand (recorded as `DIR/*`).
Each test asserts the safe behaviour and checks the host directly; the held_* tests are
things tried that the gateway already handled. No expectation was changed from the run's
findings."""
# ruff: noqa: F811 - test parameters name the fixtures imported from tests.ssh_attack_support
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from proxies.ssh.shell import classify
from tests.ssh_attack_support import RISK, _argv, box, kt, ssh, sshd  # noqa: F401 - fixtures


def _file(path: Path, text: str, mode: int = 0o666) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _asnc(coro):
    return asyncio.run(coro)



def _m(box: Path) -> Path:
    return box / "made"


# ---------------------------------------------------------------- findings
@pytest.mark.parametrize("cmd", [
    "cd /etc; cd /nonexistent-kt; cat passwd",
    "cd /etc; (cd /tmp); cat passwd",
    "cd /etc; cd /tmp & cat passwd",
    "cd /etc; echo | cd /tmp; cat passwd",
    "cd /etc; false && cd /tmp; cat passwd",
])
def test_e2e_cd_that_does_not_happen_escapes_path_rule(kt, cmd):
    """The classifier moves its tracked directory on every `cd`, whether or not the shell
    does: a `cd` that fails (no such directory), runs in a subshell (parentheses, a
    background job, a pipeline) or is skipped by `&&` leaves the shell in /etc while the
    classifier resolves `passwd` against the other directory; the block rule on
    /etc/passwd never sees it."""
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert "root:x:0:0" not in r.stdout, (cmd, a.cls, a.paths, r.returncode)


@pytest.mark.parametrize("tmpl, stdin", [
    ("declare -i y; y=b[\\$\\(touch\\ {m}\\)]", None),
    ("x=b[\\$\\(touch\\ {m}\\)]; printf -v 'a[x]' 1", None),
    ("x=b[\\$\\(touch\\ {m}\\)]; read 'a[x]'", "1\n"),
])
def test_e2e_arithmetic_evaluation_runs_escaped_substitution(kt, box, tmpl, stdin):
    """The raw-text check for `$(` is dodged with backslashes: `b[\\$\\(cmd\\)]` is the
    literal text `b[$(cmd)]`. Bash evaluates it as arithmetic where a value is assigned to
    an integer variable (`declare -i`) or to an array element named in a string
    (`printf -v 'a[x]'`, `read 'a[x]'`: the subscript `x` is evaluated, then x's value),
    and an array subscript inside arithmetic is expanded: the command substitution runs.
    Classified read (declare/printf/read only set variables)."""
    m = _m(box)
    cmd = tmpl.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2", input=stdin)
    assert not m.exists(), ("ran a command without approval", cmd, a.cls, r.returncode,
                            r.stderr)


@pytest.mark.parametrize("tmpl", [
    "o=x; o=-o eval sort \\$o {m} /etc/os-release",
    "o=x; o=-o bash -c 'sort $o {m} /etc/os-release'",
    "o=x; printf -v 'o[0]' -- -o; sort $o {m} /etc/os-release",
])
def test_e2e_variable_changed_unseen(kt, box, tmpl):
    """A variable set to a literal is followed into later words (`o=x` makes `$o` an
    operand). It changes without the classifier noticing: a prefix assignment on `eval`
    or `bash -c` is what the nested code sees (the classifier still uses `x`), and
    `printf -v 'o[0]'` sets element 0, which is what `$o` expands to. web2: no path
    rules."""
    m = _m(box)
    cmd = tmpl.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2")
    assert not m.exists(), ("wrote without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("tmpl", [
    "sh -c 'sort $0 {m} /etc/os-release' -o",
    "bash -c 'sort \"$0\" {m} /etc/os-release' --output",
])
def test_e2e_dollar_zero_of_sh_c_becomes_an_option(kt, box, tmpl):
    """`$0` in an `sh -c BODY ARG0` body is ARG0, chosen on the same line; the
    classifier treats `$0` like `$$`/`$#` (never an option)."""
    m = _m(box)
    cmd = tmpl.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2")
    assert not m.exists(), ("wrote without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("prog", ["bash", "sh"])
def test_e2e_shell_script_operand_then_c(kt, box, prog):
    """A shell stops reading options at its first operand: `bash FILE -c ls` runs FILE
    with `-c ls` as its arguments. The classifier looks for `-c` anywhere and analyses
    `ls`. FILE=/dev/stdin runs what the client sends (web1, even with path rules)."""
    m = _m(box)
    cmd = f"{prog} /dev/stdin -c ls"
    a = classify(cmd)
    r = ssh(kt, cmd, input=f"touch {m}\n")
    assert not m.exists(), ("ran stdin as a script", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("tmpl, stdin", [
    ("xargs -i sh -c 'ls {{}}'", "; touch {m}\n"),
    ("xargs -I ls sh -c ls", "touch {m}\n"),
    ("xargs --replace sh -c 'echo {{}}'", "; touch {m}\n"),
])
def test_e2e_xargs_replace_string_in_shell_body(kt, box, tmpl, stdin):
    """xargs -I R (or -i, --replace: R is `{}`) replaces R in its arguments with each
    input line, also inside an `sh -c` body: the body the classifier analyses (`ls {}`)
    is not the body that runs (`ls ; touch M`)."""
    m = _m(box)
    cmd = tmpl.format(m=m)
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2", input=stdin.format(m=m))
    assert not m.exists(), ("input ran as shell code", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("line", [
    "find /srv -exec sh -c 'ls {}' \\;",
    "find /srv -execdir bash -c 'cat {}' +",
    "echo x | xargs -i sh -c 'ls {}'",
    "bash /tmp/script.sh -c ls",
])
def test_classifier_find_exec_shell_body_with_placeholder(line):
    """find replaces `{}` inside an argument too: a found file named `x;rm -rf ~` becomes
    shell code in `sh -c 'ls {}'` (file names are anyone's to choose); xargs the same
    with its input; `bash FILE -c ls` runs FILE."""
    a = classify(line)
    assert a.cls == "unknown", (line, a.cls, a.reasons)


@pytest.mark.parametrize("opt", ["--index-file", "--volno-file"])
def test_e2e_tar_list_writes_a_file(kt, box, opt):
    """`tar -t` is a read; `--index-file=F` (verbose output to F) and `--volno-file=F`
    write F (or truncate an existing file)."""
    m = _m(box)
    arch = box / "a.tar"
    subprocess.run(["tar", "-cf", str(arch), "-C", "/etc", "os-release"], check=True)
    os.chmod(arch, 0o644)
    cmd = f"tar -tvf {arch} {opt}={m}"
    a = classify(cmd)
    r = ssh(kt, cmd, conn="web2")
    assert not m.exists(), ("wrote without approval", cmd, a.cls, r.returncode, r.stderr)


@pytest.mark.parametrize("cmd", [
    "grep -r root:x:0: /etc",
    "grep -rh root:x:0: /etc --include=pass*",
])
def test_e2e_recursive_read_of_a_parent_directory(kt, cmd):
    """A path rule on /etc/passwd is matched against the operands as written: a
    recursive read of /etc (grep -r, rg, diff -r, tar -c, du -a...) reaches it."""
    a = classify(cmd)
    r = ssh(kt, cmd)
    assert "root:x:0:0" not in r.stdout, (cmd, a.cls, a.paths, r.returncode)


# ---------------------------------------------------------------- held
@pytest.mark.parametrize("line", [
    "cat <<-E\n\tE\ntouch /tmp/x\nE",       # <<- strips tabs: bashlex agrees / unknown
    "cat <<\\E\nE\ntouch /tmp/x",
    "[[ -v a[x] ]]",
    "select x in a; do touch /tmp/x; done",
    "x=b[\\$\\(touch\\ /tmp/m\\)]; a[x]=1",
    "x=b[\\$\\(touch\\ /tmp/m\\)]; echo $[x]",
    "x=b[\\$\\(touch\\ /tmp/m\\)]; (( x ))",
    "x=b[\\$\\(touch\\ /tmp/m\\)]; let x",
    "o=x; o[0]=-o; sort $o /tmp/m /etc/os-release",
    "a=(-o); sort $a /tmp/m /etc/os-release",
    "hash -p /bin/rm ls; ls x",
    "enable -n echo; echo x",
    "trap 'rm -f x' EXIT; ls",
    "set -o xtrace; ls",
    "coproc rm -f x",
    "case x in x) rm -f y;; esac",
    "command -p rm -f x",
    "builtin eval 'rm -f x'",
    "exec 3>/etc/x",
    "ls # \\\nrm -f x",
])
def test_held_classifier_families(line):
    """HELD: these were seen as at least write/unknown."""
    a = classify(line)
    assert RISK[a.cls] >= RISK["write"], (line, a.cls, a.reasons)


def test_held_xargs_replace_does_not_touch_the_program(kt, box):
    """HELD: xargs -I R does not replace R in the program name itself (GNU xargs), so
    `xargs -I ls ls -f V` with input `rm` runs ls."""
    v = _file(box / "victim", "x")
    r = ssh(kt, f"xargs -I ls ls -f {v}", conn="web2", input="rm\n")
    assert v.exists(), (r.returncode, r.stderr)


def test_held_sftp_stays_at_version_3(kt):
    """HELD: SFTP v5/v6 open (open56), which asyncssh's base server serves from the
    gateway's own file system, is unreachable: the gateway negotiates version 3."""
    import asyncssh

    async def go():
        key = asyncssh.read_private_key(str(kt.base / "alice_key"))
        async with asyncssh.connect("127.0.0.1", kt.ssh_port, username="alice+web2",
                                    client_keys=[key], known_hosts=None,
                                    agent_path=None) as c:
            async with c.start_sftp_client(sftp_version=6) as sftp:
                return sftp.version
    assert _asnc(go()) == 3
